"""The client-neutral part of the client options: the security settings in effect."""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from streamvi.config import KafkaSettings


def security_settings(settings: KafkaSettings) -> dict[str, Any]:
    """The SASL and TLS settings in effect (the TLS ones only over SSL), by setting name, paths as
    text and secrets in clear text: each client's options module renames them. Never log it."""
    values: dict[str, Any] = {
        "sasl_mechanism": settings.sasl_mechanism,
        "sasl_username": settings.sasl_username,
        "sasl_password": _revealed(settings.sasl_password),
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        values["ssl_check_hostname"] = settings.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(settings, name)
            values[name] = None if path is None else str(path)
        values["ssl_password"] = _revealed(settings.ssl_password)
    return {name: value for name, value in values.items() if value is not None}


def _revealed(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()
