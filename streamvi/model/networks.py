"""Multi-layer perceptrons for the encoder and decoder (tf-keras layers, checkpoint-tracked)."""

from __future__ import annotations

import tf_keras


def mlp(
    input_dim: int,
    hidden: list[int],
    output_dim: int,
    activation: str,
    dtype_policy: str,
    name: str,
    seed: int = 0,
) -> tf_keras.Sequential:
    """A dense network; hidden layers may compute in reduced precision, the output is float32.

    Every layer's initialiser is seeded from ``seed`` so that a configured seed fixes the model.
    """
    layers: list[tf_keras.layers.Layer] = [tf_keras.Input(shape=(input_dim,))]
    for index, width in enumerate(hidden):
        layers.append(
            tf_keras.layers.Dense(
                width,
                activation=activation,
                dtype=dtype_policy,
                kernel_initializer=tf_keras.initializers.GlorotUniform(seed=seed + index),
                name=f"{name}_hidden_{index}",
            )
        )
    layers.append(
        tf_keras.layers.Dense(
            output_dim,
            dtype="float32",
            kernel_initializer=tf_keras.initializers.GlorotUniform(seed=seed + len(hidden)),
            name=f"{name}_out",
        )
    )
    return tf_keras.Sequential(layers, name=name)
