"""Explanations of an anomaly score: which input dimensions (or features) a record's reconstruction
term blames most, from the per-group log-likelihood ``VAE.dimension_log_likelihood`` computes at
the posterior location, as the JSON a latents message carries in its ``explanation`` field."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import orjson
import tensorflow as tf

from streamvi.features.schema import FeatureLayout
from streamvi.model.mixed import FeatureInputs
from streamvi.model.vae import VAE


def group_names(model_or_layout: VAE | FeatureLayout | None, input_dim: int | None = None) -> list[str]:
    """Names of the column groups of ``dimension_log_likelihood``: feature names under a schema,
    else ``x[0]``, ``x[1]``, ... over ``input_dim`` (the model's input dim when not given)."""
    layout = model_or_layout
    if isinstance(layout, VAE):
        if input_dim is None:
            input_dim = layout.input_dim
        layout = layout.inputs.layout if isinstance(layout.inputs, FeatureInputs) else None
    if isinstance(layout, FeatureLayout):
        return [feature.name for feature in layout.features]
    if input_dim is None:
        raise ValueError("group_names: input_dim is needed without a model or feature layout")
    return [f"x[{d}]" for d in range(input_dim)]


def top_contributions(per_group: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The k groups of lowest log-likelihood per record, most negative first: (indices int32
    [B, k], values float32 [B, k]); k is clipped to the number of groups G."""
    per_group = tf.cast(per_group, tf.float32)
    groups = per_group.shape[-1]
    kept = max(0, min(k, groups)) if groups is not None else tf.minimum(k, tf.shape(per_group)[-1])
    negated, indices = tf.math.top_k(-per_group, k=kept, sorted=True)
    return tf.cast(indices, tf.int32), -negated


def explanation_json(indices: np.ndarray, values: np.ndarray, names: Sequence[str]) -> list[bytes]:
    """Per record a JSON array of {"feature": name, "log_likelihood": value}, in the given order,
    for a latents message's ``explanation`` field; non-finite values become null."""
    indices = np.asarray(indices)
    values = np.asarray(values, dtype=np.float32)
    out = []
    for row_indices, row_values in zip(indices, values, strict=True):
        items = [
            {"feature": names[int(i)], "log_likelihood": v if math.isfinite(v) else None}
            for i, v in zip(row_indices, row_values, strict=True)
        ]
        out.append(orjson.dumps(items, option=orjson.OPT_SERIALIZE_NUMPY))
    return out
