"""Export a snapshot's encoder as a SavedModel for TF Serving: x (and c) to z mean and z scale.

The ``serving_default`` signature takes ``x`` [batch, input.dim] float32 (plus ``c`` [batch,
input.context_dim] when the model is conditioned on a context) and returns ``z_mean`` and
``z_scale`` [batch, summary size] (latent_dim for Gaussian latents, M x K class probabilities
for Gumbel-softmax ones), computed exactly as the daemon computes the latents it
publishes. The model's variables are exported; no optimizer state, no Python objects.

Under a feature schema ``x`` holds the raw value of each feature in schema order (NaN where not
observed, a categorical's vocabulary index, a hashed one's bucket): the online normaliser's state
is part of the export, so clients send raw values. ``assets.extra/streamvi_export.json`` lists
the features.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tensorflow as tf

from streamvi.config import Settings
from streamvi.errors import StreamVIError
from streamvi.model.vae import VAE
from streamvi.snapshots.store import SnapshotInfo

SIGNATURE = "serving_default"
#: Written into the export's assets.extra (TF Serving ignores it): where the model came from.
EXPORT_INFO = "streamvi_export.json"


def context_dim(settings: Settings) -> int:
    """Width of the conditioning context c; 0 when the model takes x alone."""
    return settings.input.context_dim


class EncoderExport(tf.Module):
    """The amortised encoder q(z|x) wrapped in a fixed serving signature."""

    def __init__(self, model: VAE, input_dim: int, context_width: int) -> None:
        super().__init__(name="streamvi_encoder")
        self.model = model
        x_spec = tf.TensorSpec([None, input_dim], tf.float32, name="x")
        if context_width > 0:
            c_spec = tf.TensorSpec([None, context_width], tf.float32, name="c")
            self.serve = tf.function(self._serve_with_context, input_signature=[x_spec, c_spec])
        else:
            self.serve = tf.function(self._serve, input_signature=[x_spec])

    def _encode(self, x: tf.Tensor, c: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        context = tf.zeros([tf.shape(x)[0], 0]) if c is None else c
        params = self.model.encode(x, context)
        # The summary of q does not depend on the step (only Gumbel-softmax sampling does).
        z_mean, z_scale = self.model.latent.summary(params, tf.constant(0, tf.int64))
        return {
            "z_mean": tf.identity(tf.cast(z_mean, tf.float32), name="z_mean"),
            "z_scale": tf.identity(tf.cast(z_scale, tf.float32), name="z_scale"),
        }

    def _serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._encode(x)

    def _serve_with_context(self, x: tf.Tensor, c: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._encode(x, c)


def export_saved_model(info: SnapshotInfo, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the snapshot's encoder as a SavedModel into ``directory`` (atomically) and return it.

    TF Serving expects ``<model_base_path>/<version>/saved_model.pb``; pass such a versioned
    directory, e.g. ``models/streamvi/<step>``.
    """
    from streamvi.snapshots.loading import load_trainer

    target = Path(directory)
    occupied = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if occupied and not overwrite:
        raise StreamVIError(f"{target}: already exists and is not empty (use --overwrite)")
    settings, trainer = load_trainer(info)
    module = EncoderExport(trainer.model, settings.input.dim, context_dim(settings))
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tf.saved_model.save(module, str(temp), signatures={SIGNATURE: module.serve.get_concrete_function()})
        extra = temp / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / EXPORT_INFO).write_text(json.dumps(_export_info(info, settings), indent=2, sort_keys=True))
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        temp.rename(target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def _summary_size(settings: Settings) -> int:
    model = settings.model
    return model.latent_dim if model.latent == "gaussian" else model.categorical_variables * model.categories


def _export_info(info: SnapshotInfo, settings: Settings) -> dict[str, Any]:
    return {
        "snapshot": info.path.name,
        "model_step": info.step,
        "input_dim": settings.input.dim,
        "context_dim": context_dim(settings),
        "latent": settings.model.latent,
        "summary_size": _summary_size(settings),
        "features": settings.public_dict()["input"].get("features"),
        "versions": info.meta.get("versions", {}),
    }
