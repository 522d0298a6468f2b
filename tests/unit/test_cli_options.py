"""The shared options (--config, --set, --log-level) before or after the subcommand, and the log's noise."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from streamvi.cli.logs import LIBRARY_LOGGERS, configure_logging, drop_native_noise
from streamvi.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]


def shown(*args: str, env: dict[str, str] | None = None) -> dict:
    """``streamvi <args>`` ending in ``config show``, in this process; the effective config it printed."""
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("training: {batch_size: 11}\nkafka: {group_id: from-first}\n")
    second.write_text("training: {batch_size: 22}\n")
    return str(first), str(second)


def test_config_and_set_after_the_subcommand_mean_what_they_mean_before_it(files):
    first, _ = files
    before = shown("--config", first, "--set", "model.latent_dim=3", "config", "show")
    after = shown("config", "show", "--config", first, "--set", "model.latent_dim=3")
    middle = shown("config", "--config", first, "show", "--set", "model.latent_dim=3")
    assert before == after == middle
    assert after["training"]["batch_size"] == 11 and after["model"]["latent_dim"] == 3
    assert after["kafka"]["group_id"] == "from-first"


def test_given_in_both_places_the_later_one_wins_and_set_still_beats_the_file(files):
    first, second = files
    both = shown("--config", first, "--set", "training.batch_size=5", "config", "show", "--config", second)
    # --set wins over any file, wherever each was given
    assert both["training"]["batch_size"] == 5
    # the file after the subcommand replaces the one before it (second.yaml sets no group_id)
    assert both["kafka"]["group_id"] == "streamvi"
    sets = shown("--set", "training.batch_size=5", "config", "show", "--set", "training.batch_size=6")
    assert sets["training"]["batch_size"] == 6


def test_the_environment_is_below_options_after_the_subcommand(files):
    first, second = files
    env = {"STREAMVI_CONFIG": first, "STREAMVI_TRAINING__BATCH_SIZE": "33"}
    from_env = shown("config", "show", env=env)
    assert from_env["kafka"]["group_id"] == "from-first" and from_env["training"]["batch_size"] == 33
    overridden = shown("config", "show", "--config", second, "--set", "training.batch_size=44", env=env)
    assert overridden["kafka"]["group_id"] == "streamvi" and overridden["training"]["batch_size"] == 44


def test_a_bad_setting_after_the_subcommand_fails_naming_it():
    result = CliRunner().invoke(cli, ["config", "validate", "--set", "training.batch_size=-1"])
    assert result.exit_code == 2 and "training.batch_size" in result.output


def test_every_subcommand_accepts_the_shared_options():
    def walk(group, path):
        for name, command in group.commands.items():
            yield [*path, name], command
            if hasattr(command, "commands"):
                yield from walk(command, [*path, name])

    commands = list(walk(cli, []))
    assert len(commands) >= 10
    for path, command in commands:
        flags = {opt for param in command.params for opt in param.opts}
        assert {"--config", "--set", "--log-level"} <= flags, path
        helped = CliRunner().invoke(cli, [*path, "--help"])
        assert helped.exit_code == 0 and "--log-level" in helped.output, path


def test_log_level_after_the_subcommand_wins_and_libraries_are_quiet_unless_debug():
    root = logging.getLogger()
    level = root.level
    try:
        CliRunner().invoke(cli, ["--log-level", "debug", "config", "validate", "--log-level", "warning"])
        assert root.level == logging.WARNING
        configure_logging("info")
        for name in LIBRARY_LOGGERS:  # kafka-python's event-loop warnings, absl, TensorFlow
            assert not logging.getLogger(f"{name}.anything").isEnabledFor(logging.WARNING), name
        assert logging.getLogger("streamvi.runtime").isEnabledFor(logging.INFO)
        configure_logging("debug")
        for name in LIBRARY_LOGGERS:
            assert logging.getLogger(f"{name}.anything").isEnabledFor(logging.DEBUG), name
    finally:
        configure_logging("info")
        root.setLevel(level)


def test_native_start_up_noise_is_recognised_and_other_lines_kept():
    captured = "\n".join(
        [
            "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
            "I0000 00:00:1796227419.330122   12606 cudart_stub.cc:31] Could not find cuda drivers on "
            "your machine, GPU will not be used.",
            "E0000 00:00:1796227435.444646   12606 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
            "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
            "W0000 00:00:1796227435.444646   12606 cpu_feature_guard.cc:210] This TensorFlow binary is "
            "optimized to use available CPU instructions in performance-critical operations.",
            "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
            "with the appropriate compiler flags.",
            "E0000 00:00:1796227435.444646   12606 op_kernel.cc:1800] OP_REQUIRES failed at x.cc:1",
            "Traceback (most recent call last):",
        ]
    )
    assert drop_native_noise(captured) == [
        "E0000 00:00:1796227435.444646   12606 op_kernel.cc:1800] OP_REQUIRES failed at x.cc:1",
        "Traceback (most recent call last):",
    ]


def test_debug_brings_tensorflows_native_start_up_lines_back():
    """In a fresh process (TensorFlow reads its log level once, at import). The default's silence
    is checked on the whole daemon in tests/integration/test_first_minutes.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "from streamvi.cli.logs import configure_logging; configure_logging('debug'); "
        "import tensorflow as tf; tf.constant(1.0); print('imported')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr
    native = [line for line in result.stderr.splitlines() if line.strip() and not drop_native_noise(line)]
    assert native, f"no native TensorFlow line at debug level: {result.stderr!r}"
