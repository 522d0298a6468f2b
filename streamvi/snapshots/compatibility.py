"""Whether a snapshot fits the config in force: the settings that shape its checkpoint must agree.

A snapshot records the whole config it was written under (``meta.json`` → ``config``). Restoring it
into a model built from other structural settings fails deep inside TensorFlow with a shape error,
or worse, succeeds and silently changes what the model means; so the daemon compares first and
refuses to start, naming each differing setting and leaving the snapshot untouched.

A setting that does not apply under one side's choices (``model.categories`` with a gaussian latent)
is shown as such and compares as its default: it shapes nothing there, and a differing choice (the
latent family) is named anyway.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from streamvi.config import Settings, inapplicable_reason
from streamvi.errors import ConfigError, SnapshotError

#: The settings a snapshot must share with the config in force, each with why; ``section.*`` means
#: every field of that section, including fields added later.
STRUCTURAL_SETTINGS: dict[str, str] = {
    "model.*": "the encoder, decoder, latent family and likelihood: their variables and what z means",
    "input.dim": "the width of the encoder's input and of the decoder's output",
    "input.context_dim": "the width of the conditioning context fed to encoder and decoder",
    "input.features": "what each column of the model vector is, and the decoder's likelihood per feature",
    "input.normalise": "whether the model holds a normaliser and learns on standardised values",
    "training.estimator": "the estimator's own variables (e.g. its baseline) are checkpointed",
    "training.baseline": "which control-variate baseline exists, and so which variables are checkpointed",
    "training.baseline_hidden": "the width of the learned baseline's network",
    "training.optimizer": "the optimizer's slot variables are checkpointed",
    "training.mixed_precision": "a loss-scale optimizer wraps the optimizer and adds its own variables",
    "training.rehearsal_window_records": "the rehearsal window's rows are checkpointed with the model",
}


@dataclass(frozen=True)
class SettingDifference:
    """One structural setting whose value in a snapshot differs from the config in force."""

    name: str
    snapshot_value: Any
    config_value: Any


class SnapshotConfigMismatchError(ConfigError, SnapshotError):
    """The newest trusted snapshot was written under other structural settings than the config in force."""

    def __init__(self, snapshot_path: Path, differences: Sequence[SettingDifference]) -> None:
        self.snapshot_path = snapshot_path
        self.differences = tuple(differences)
        super().__init__(mismatch_message(snapshot_path, self.differences))


def _section_model(section: str) -> type[BaseModel]:
    """The pydantic model of one top-level config section (``model`` → ``ModelSettings``)."""
    annotation = Settings.model_fields[section].annotation
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        raise TypeError(f"config section {section!r} is not a settings model")
    return annotation


def structural_setting_names() -> list[str]:
    """Every structural setting as a dotted name, ``section.*`` expanded to the section's fields."""
    names: list[str] = []
    for pattern in STRUCTURAL_SETTINGS:
        section, key = pattern.split(".", 1)
        if key == "*":
            names.extend(f"{section}.{field}" for field in _section_model(section).model_fields)
        else:
            names.append(pattern)
    return names


class _Marker:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_NO_DEFAULT = _Marker("(not set)")
#: The value of a setting that does not apply under that config's choices (it shapes nothing there).
NOT_APPLICABLE = _Marker("(does not apply)")


def _default_value(section: str, key: str) -> Any:
    """A setting's default as JSON data: the value a config that predates the setting implies."""
    field = _section_model(section).model_fields.get(key)
    if field is None:
        return _NO_DEFAULT
    default = field.get_default(call_default_factory=True)
    return _NO_DEFAULT if default is PydanticUndefined else to_jsonable_python(default)


def _value_in(config: Mapping[str, Any], name: str) -> Any:
    """A dotted setting's value in a config dict; its default when the config has no such key, and
    ``NOT_APPLICABLE`` when it does not apply there (whether or not an older snapshot recorded it)."""
    if inapplicable_reason(config, name) is not None:
        return NOT_APPLICABLE
    section, key = name.split(".", 1)
    values = config.get(section)
    if isinstance(values, Mapping) and key in values:
        return values[key]
    return _default_value(section, key)


def _as_config_dict(config: Settings | Mapping[str, Any]) -> Mapping[str, Any]:
    """Settings as the JSON data a snapshot records, so both sides compare alike."""
    return config.public_dict() if isinstance(config, Settings) else config


def setting_differences(
    snapshot_config: Settings | Mapping[str, Any], config: Settings | Mapping[str, Any]
) -> list[SettingDifference]:
    """The structural settings whose values differ, in ``STRUCTURAL_SETTINGS`` order.

    A key missing from either side (a snapshot written before that setting existed) stands for the
    setting's default, and so does a setting that does not apply on that side.
    """
    snapshot_values, config_values = _as_config_dict(snapshot_config), _as_config_dict(config)
    differences = []
    for name in structural_setting_names():
        before, now = _value_in(snapshot_values, name), _value_in(config_values, name)
        if _compared(before, name) != _compared(now, name):
            differences.append(SettingDifference(name, before, now))
    return differences


def _compared(value: Any, name: str) -> Any:
    """What a value compares as: a setting that does not apply, as its default."""
    return _default_value(*name.split(".", 1)) if value is NOT_APPLICABLE else value


def _yaml_value(value: Any) -> str:
    """``value`` written so that ``--set`` (which parses YAML scalars) reads it back unchanged."""
    if isinstance(value, _Marker):
        return value.text
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and yaml.safe_load(text) != value:  # YAML 1.1 floats need a dot and a signed exponent
            mantissa, exponent = text.split("e")
            mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
            exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
            text = f"{mantissa}e{exponent}"
        return text
    if isinstance(value, str):
        return value if value and yaml.safe_load(value) == value else json.dumps(value)
    return json.dumps(value)


def set_overrides(differences: Sequence[SettingDifference]) -> list[str]:
    """The ``--set`` options, shell-quoted, that make a config build the snapshot's model again.

    A setting that does not apply to the snapshot's model gets none: it would be refused there.
    """
    return [
        f"--set {shlex.quote(f'{d.name}={_yaml_value(d.snapshot_value)}')}"
        for d in differences
        if not isinstance(d.snapshot_value, _Marker)
    ]


def settings_to_remove(differences: Sequence[SettingDifference]) -> list[str]:
    """Settings the config gives (they differ from their defaults) that do not apply to the
    snapshot's model: with its settings (``set_overrides``) the config is refused until they go."""
    return [
        d.name
        for d in differences
        if d.snapshot_value is NOT_APPLICABLE and not isinstance(d.config_value, _Marker)
    ]


def mismatch_message(snapshot_path: Path, differences: Sequence[SettingDifference]) -> str:
    """What differs between a snapshot and the config in force, and the two ways to go on."""
    lines = [
        f"snapshot {snapshot_path} was written under other model settings than the config in force:",
        *(
            f"  {d.name}: snapshot {_yaml_value(d.snapshot_value)}, config {_yaml_value(d.config_value)}"
            for d in differences
        ),
        "Its checkpoint does not fit the model this config builds; it was not restored and is left as it is.",
        "Either:",
        f"  - start a new model: point snapshots.dir at a new directory (now {snapshot_path.parent}), or",
        "  - continue this model: run with the snapshot's settings: " + " ".join(set_overrides(differences)),
    ]
    if remove := settings_to_remove(differences):
        lines.append(
            f"    and remove {', '.join(remove)} from the config: the snapshot's model has no such setting"
        )
    return "\n".join(lines)


def check_snapshot_matches(
    snapshot_path: Path,
    snapshot_config: Settings | Mapping[str, Any],
    config: Settings | Mapping[str, Any],
) -> None:
    """Raise SnapshotConfigMismatchError naming every structural setting the two configs differ in."""
    differences = setting_differences(snapshot_config, config)
    if differences:
        raise SnapshotConfigMismatchError(snapshot_path, differences)
