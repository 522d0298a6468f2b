"""The baseline: a straightforward consumer loop written by hand, as most first versions look.

stdlib ``json`` decoding, one ``tf.function`` training step per poll of up to 100 records (so the
step retraces for every new partial-batch shape), one latent message per record built as a Python
dict, and an offset commit after every poll. Same model and objective as the daemon (a VAE with
SGVB estimator B), so the comparison isolates the plumbing.
"""

from __future__ import annotations

import json
import time

import numpy as np
import tensorflow as tf
import tf_keras
from kafka import KafkaConsumer, KafkaProducer

from streamvi.config import Settings
from streamvi.estimators import SGVBAnalyticKL
from streamvi.model import VAE, build_vae

#: Records per poll, and so per training step.
BASELINE_BATCH = 100


def run_handwritten(settings: Settings, count: int, group: str) -> tuple[float, VAE]:
    """Consume ``count`` records of ``kafka.input_topic``; return records/s and the trained model."""
    model = build_vae(settings.model, settings.training, settings.input.dim)
    optimizer = tf_keras.optimizers.Adam(settings.training.learning_rate)
    estimator = SGVBAnalyticKL()

    @tf.function
    def step(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        c = tf.zeros([tf.shape(x)[0], 0])
        with tf.GradientTape() as tape:
            terms = estimator.terms(model, x, c, seed, tf.constant(0, tf.int64))
            loss = -tf.reduce_mean(terms.bound)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return terms.bound

    consumer = KafkaConsumer(
        settings.kafka.input_topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    seen = 0
    started = None
    number = 0
    while seen < count:
        polled = consumer.poll(timeout_ms=500, max_records=min(BASELINE_BATCH, count - seen))
        messages = [m for batch in polled.values() for m in batch]
        if not messages:
            continue
        if started is None:
            started = time.perf_counter()
        documents = [json.loads(m.value) for m in messages]
        x = np.array([d["x"] for d in documents], dtype=np.float32)
        bound = step(tf.constant(x), tf.constant([0, number], tf.int32)).numpy()
        number += 1
        mean, _ = model.latent.summary(model.encode(tf.constant(x), tf.zeros([len(x), 0])), tf.constant(0))
        for m, d, z, b in zip(messages, documents, mean.numpy(), bound, strict=True):
            payload = {"id": d.get("id"), "offset": m.offset, "z_mean": z.tolist(), "elbo": float(b)}
            producer.send(settings.kafka.latents_topic, key=m.key, value=json.dumps(payload).encode())
        producer.flush()
        consumer.commit()
        seen += len(messages)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    producer.close()
    return seen / elapsed, model
