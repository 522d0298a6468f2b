"""Draw blocks: the single-process layout of an N-worker step's draws (see training/distributed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from streamvi.config import load_settings
from streamvi.estimators import build_estimator
from streamvi.estimators.base import BoundTerms
from streamvi.model.vae import build_vae
from streamvi.training.trainer import Trainer, block_seed, concat_terms


def trainer(draw_blocks: int, batch_size: int = 8) -> Trainer:
    settings = load_settings(
        overrides=[
            "input.dim=4",
            "model.latent_dim=2",
            "model.encoder_hidden=[8]",
            "training.jit_compile=false",
        ],
        environ={},
    )
    model = build_vae(settings.model, settings.training, 4)
    training = settings.training.model_copy(update={"batch_size": batch_size})
    return Trainer.from_settings(model, build_estimator(settings), training, draw_blocks=draw_blocks)


def test_blocks_must_divide_the_batch():
    with pytest.raises(ValueError, match="draw_blocks must divide batch_size 8"):
        trainer(3)


def test_block_k_draws_as_a_batch_of_one_block_with_the_folded_seed():
    """Block 1 of a 2-block batch scores like a half-size batch drawn with block_seed(seed, 1)."""
    x = (np.random.default_rng(0).random((8, 4)) < 0.5).astype(np.float32)
    whole, half = trainer(2), trainer(1, batch_size=4)
    seed = tf.constant([5, 9], tf.int32)
    blocked = whole._terms(tf.constant(x), tf.zeros((8, 0)), seed)
    alone = half._terms(tf.constant(x[4:]), tf.zeros((4, 0)), block_seed(seed, 1))
    np.testing.assert_allclose(blocked.bound.numpy()[4:], alone.bound.numpy(), rtol=1e-6)
    first = half._terms(tf.constant(x[:4]), tf.zeros((4, 0)), seed)
    assert not np.allclose(blocked.bound.numpy()[:4], first.bound.numpy())  # block 0 is folded too


def test_concat_terms_keeps_a_missing_signal_missing():
    part = BoundTerms(*(tf.zeros([2]) for _ in range(6)))
    joined = concat_terms([part, part])
    assert joined.signal is None and joined.bound.shape == (4,)
