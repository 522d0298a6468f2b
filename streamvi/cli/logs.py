"""The CLI's logging: streamvi's own lines by default, library noise only with ``--log-level debug``.

A daemon's log should open with what it is doing. TensorFlow, absl and the Kafka clients print a
lot at start-up that says nothing about that: TensorFlow's C++ start-up lines (written to file
descriptor 2 by native code before any Python logging is configured, so ``TF_CPP_MIN_LOG_LEVEL``
cannot filter all of them), a ``cuInit`` error on every machine without a GPU, and kafka-python's
warnings about its own event loop (a rebalance callback that checkpoints takes longer than it
likes). By default:

- ``TF_CPP_MIN_LOG_LEVEL`` is set to 2 (errors only) unless the user set it, before TensorFlow is
  imported (it is read once, at import);
- the first ``import tensorflow`` and TensorFlow's device discovery run with file descriptor 2
  captured; the known start-up lines are dropped and anything else is written out unchanged;
- the ``absl``, ``tensorflow``, ``kafka`` and ``rdkafka`` Python loggers pass only errors.

``--log-level debug`` leaves all of that alone, so every library line comes back.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from types import ModuleType

#: Python loggers of libraries, quiet (errors only) unless the level is DEBUG.
LIBRARY_LOGGERS = ("absl", "tensorflow", "kafka", "rdkafka")
#: The user's own TF_CPP_MIN_LOG_LEVEL, if any, which always wins.
_USER_TF_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Native start-up lines that say nothing about what the daemon does: absl's pre-init notice,
#: TensorFlow/XLA INFO and WARNING lines, and the CUDA probing errors of a machine without a GPU.
_NOISE = re.compile(
    r"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\] .*"
    r"|E\d{4} [\d:.]+\s+\d+ \S+:\d+\] .*(?:cuInit|CUDA|cuda|cuDNN|cuFFT|cuBLAS).*"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."
    r"|\s*)$"
)


def configure_logging(level: str) -> None:
    """Log streamvi's lines at ``level`` to stderr; library noise as the module docstring says.

    Safe to call again (the CLI does when ``--log-level`` also follows the subcommand): the last
    call wins, as long as TensorFlow has not been imported yet.
    """
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, format=_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(numeric)
    debug = numeric <= logging.DEBUG
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.ERROR)
    if _USER_TF_LEVEL is None and "tensorflow" not in sys.modules:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if debug else "2"
    _QuietTensorFlowImport.install(not debug)


def drop_native_noise(text: str) -> list[str]:
    """The lines of ``text`` (captured from file descriptor 2) that are not known start-up noise."""
    return [line for line in text.splitlines() if not _NOISE.match(line)]


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Imports ``tensorflow`` (once, whoever asks first) and lists its devices with fd 2 captured.

    Device discovery is where the CUDA probe reports ``failed call to cuInit`` on a machine
    without a GPU; doing it here, inside the capture, keeps that line out of the log. Listing
    physical devices does not initialise the runtime, so device settings can still be changed.
    """

    @classmethod
    def install(cls, enabled: bool) -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, cls)]
        if enabled and "tensorflow" not in sys.modules:
            sys.meta_path.insert(0, cls())

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CapturingLoader(spec.loader)
        return spec


class _CapturingLoader(importlib.abc.Loader):
    """Runs the real loader with fd 2 captured, then writes out what was not start-up noise."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module keeps its real loader (resource readers and reloads go through it)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self._loader.exec_module(module)
                _discover_devices(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                kept = drop_native_noise(captured.read().decode("utf-8", errors="replace"))
                if kept:
                    sys.stderr.write("\n".join(kept) + "\n")
                    sys.stderr.flush()


def _discover_devices(tensorflow: ModuleType) -> None:
    """TensorFlow's device discovery (the CUDA probe), so that it happens inside the capture."""
    try:
        tensorflow.config.list_physical_devices()
    except Exception:  # the first real use of a device meets the same error and reports it
        logging.getLogger(__name__).debug("listing TensorFlow's devices failed", exc_info=True)
