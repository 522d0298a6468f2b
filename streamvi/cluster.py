"""The trainer cluster: which workers train one model together, and which one this process is.

Resolved once at start from ``distribution.*`` or, with ``distribution.workers`` empty, from the
``TF_CONFIG`` environment variable as TensorFlow reads it::

    {"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": 0}}

(a ``chief`` job of one address may come first: it is worker 0). Every problem is a
:class:`ConfigError` naming the setting or the ``TF_CONFIG`` field at fault, before TensorFlow's
collectives start (a bad cluster there surfaces as a hang or an opaque gRPC error).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from streamvi.config import DistributionSettings, Settings
from streamvi.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

TF_CONFIG = "TF_CONFIG"


@dataclass(frozen=True)
class Cluster:
    """The workers' ``host:port`` addresses in worker order and this worker's index (0: the chief)."""

    workers: tuple[str, ...]
    index: int
    #: Where the cluster came from: the settings or the TF_CONFIG environment variable.
    source: Literal["settings", "TF_CONFIG"]
    collective_timeout_seconds: float = 60.0
    #: TF_CONFIG's job names, in order (``chief``/``worker``), so its resolver can be rebuilt as given.
    jobs: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def resolve_cluster(
    settings: DistributionSettings, environ: Mapping[str, str] | None = None
) -> Cluster | None:
    """The cluster ``settings`` describe; None for ``distribution.strategy=none`` (one process,
    as without this section: TF_CONFIG is then ignored)."""
    if settings.strategy == "none":
        return None
    env = os.environ if environ is None else environ
    timeout = settings.collective_timeout_seconds
    if settings.workers:
        if env.get(TF_CONFIG):
            raise ConfigError(
                "distribution.workers and the TF_CONFIG environment variable are both set: give the "
                "cluster once (empty distribution.workers reads TF_CONFIG)"
            )
        workers = tuple(_address(a, "distribution.workers") for a in settings.workers)
        _no_duplicates(workers, "distribution.workers")
        assert settings.worker_index is not None  # checked by the settings
        return Cluster(workers, settings.worker_index, "settings", timeout, (("worker", workers),))
    raw = env.get(TF_CONFIG)
    if not raw:
        raise ConfigError(
            "distribution.strategy=multi_worker needs the cluster: set distribution.workers and "
            "distribution.worker_index, or the TF_CONFIG environment variable"
        )
    return _from_tf_config(raw, timeout)


def _from_tf_config(raw: str, timeout: float) -> Cluster:
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError("TF_CONFIG must be a JSON object with 'cluster' and 'task' objects")
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise ConfigError(
            f"TF_CONFIG.cluster: jobs {unknown} are not trainer workers (only 'chief' and 'worker'; "
            "parameter servers and evaluators are not part of synchronous training)"
        )
    jobs: list[tuple[str, tuple[str, ...]]] = []
    for job in ("chief", "worker"):
        if job in cluster:
            addresses = cluster[job]
            if not isinstance(addresses, list) or not addresses:
                raise ConfigError(f"TF_CONFIG.cluster.{job} must be a non-empty list of host:port")
            jobs.append((job, tuple(_address(a, f"TF_CONFIG.cluster.{job}") for a in addresses)))
    if not jobs:
        raise ConfigError("TF_CONFIG.cluster has no 'worker' list")
    if jobs[0][0] == "chief" and len(jobs[0][1]) != 1:
        raise ConfigError("TF_CONFIG.cluster.chief must hold exactly one address")
    workers = tuple(address for _, addresses in jobs for address in addresses)
    _no_duplicates(workers, "TF_CONFIG.cluster")
    return Cluster(workers, _task_index(task, dict(jobs)), "TF_CONFIG", timeout, tuple(jobs))


def _task_index(task: dict[str, Any], jobs: dict[str, tuple[str, ...]]) -> int:
    """This worker's position among all workers (the chief first) from TF_CONFIG's task."""
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in jobs:
        raise ConfigError(f"TF_CONFIG.task.type must be one of {sorted(jobs)}, got {kind!r}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(jobs[kind]):
        raise ConfigError(
            f"TF_CONFIG.task.index must be 0..{len(jobs[kind]) - 1} for job {kind!r}, got {index!r}"
        )
    offset = len(jobs.get("chief", ())) if kind == "worker" else 0
    return offset + index


def _address(value: Any, where: str) -> str:
    """``host:port`` with a port in 1..65535, or an error naming ``where``."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {value!r} is not host:port with a port in 1..65535")
    return text


def _no_duplicates(addresses: tuple[str, ...], where: str) -> None:
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise ConfigError(f"{where}: each worker needs its own address; repeated: {', '.join(repeated)}")


def start_cluster(settings: Settings) -> tuple[Cluster | None, tf.distribute.Strategy | None]:
    """Resolve the trainer cluster (every bad setting or TF_CONFIG field is named) and, for a
    multi-worker one, start its collective strategy: before any other TensorFlow op of the process,
    and once every worker's server is up. None, None: one trainer process, as without the section."""
    cluster = resolve_cluster(settings.distribution)
    if cluster is None:
        return None, None
    from streamvi.training.distributed import build_strategy

    log.info(
        "trainer worker %d of %d (%s); waiting for the other workers",
        cluster.index,
        cluster.size,
        "chief" if cluster.is_chief else "not the chief",
    )
    return cluster, build_strategy(cluster)


def progress_file(cluster: Cluster | None) -> str:
    """The output-progress file of this trainer: one per worker, in the snapshot store they share."""
    from streamvi.snapshots.store import PROGRESS_FILE  # not at import: it loads TensorFlow

    return PROGRESS_FILE if cluster is None or cluster.is_chief else f"progress-worker-{cluster.index}.json"
