"""Every command in README.md and deploy/README.md, checked: a documented command or flag that
stops working fails here.

Commands are found in the documents themselves, not listed here, so commands documented later are
checked too:

- every ``streamvi`` command (fenced ``sh`` blocks, inline code, and the arguments of a
  ``docker run streamvi:...``) must name real subcommands and options, with values its options
  accept; its ``--help`` must work; its ``--config`` file and ``--set`` values must load;
- the ones that need no broker (config, snapshots, encode, report) and are complete commands (in a
  fenced block, no placeholder) run for real, in a directory holding a snapshot made here;
- ``make`` targets exist and dry-run; ``python bench/*.py`` flags exist; ``STREAMVI_*`` variables
  name settings; docker compose files, services and build arguments, and kustomize directories
  exist; promtool commands run when promtool is installed;
- ``make demo`` runs as documented (marked slow).
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from streamvi.cli.main import cli
from streamvi.config import Settings, load_settings
from streamvi.datasets import encode_record, load_digits
from streamvi.io.base import RawRecord
from streamvi.io.codecs import RecordDecoder, Support
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.runtime import build_trainer, evaluation_policy, snapshot_meta
from streamvi.snapshots import SnapshotStore
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md"]
#: Programs whose inline code spans are commands (elsewhere a span is a name, a value, a path).
PROGRAMS = ("streamvi", "make", "python", "docker", "kubectl", "promtool", "curl", "kcat", "cd")
#: streamvi commands that need no broker: run for real when documented as a complete command.
RUNNABLE = {
    ("config", "show"),
    ("config", "validate"),
    ("snapshots", "list"),
    ("snapshots", "show"),
    ("snapshots", "export"),
    ("encode",),
    ("report",),
    ("schema", "infer"),
}
#: Shell operators after which a documented command's own words end.
REDIRECTIONS = frozenset({">", ">>", "<", "|", "2>", "2>&1", "&>"})
PLACEHOLDER = re.compile(r"^(?:\.\.\.|[A-Z][A-Z_]*|<.*>|.*\.\.\..*)$")


@dataclass(frozen=True)
class Documented:
    """One command as a document gives it: where, its text, and whether it is meant to be pasted
    whole (a fenced block) or is a reference in the prose (inline code)."""

    where: str
    text: str
    fenced: bool

    def words(self) -> list[str]:
        """The command's words, without a shell redirection or pipe and what follows it."""
        words = shlex.split(self.text, comments=True)
        for i, word in enumerate(words):
            if word in REDIRECTIONS:
                return words[:i]
        return words


def _spans_outside_fences(text: str) -> Iterator[tuple[int, str]]:
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            for span in re.findall(r"`([^`]+)`", line):
                yield number, span


def _fenced_lines(text: str) -> Iterator[tuple[int, str]]:
    language: str | None = None
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            language = None if language is not None else (stripped[3:].strip() or "text")
            continue
        if language not in ("sh", "bash", "shell", "console"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command, pending = (pending + stripped).removeprefix("$ "), ""
        if command and not command.startswith("#"):
            yield start, command


def documented() -> list[Documented]:
    """Every command in the documents, each ``&&``-chained part on its own (``cd`` kept in front)."""
    found: list[Documented] = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        name = doc.relative_to(ROOT)
        sources = [(n, c, True) for n, c in _fenced_lines(text)]
        sources += [(n, s, False) for n, s in _spans_outside_fences(text) if s.split(" ", 1)[0] in PROGRAMS]
        for number, command, fenced in sources:
            if command.split(" ", 1)[0] not in PROGRAMS or " " not in command:
                continue
            found.append(Documented(f"{name}:{number}", command, fenced))
    return found


COMMANDS = documented()


# -- streamvi commands, statically: subcommands, options, values, --set, --config -----------------
@dataclass
class Parsed:
    path: tuple[str, ...]
    arguments: list[str]
    overrides: list[str]
    config: str | None
    placeholders: bool
    #: The command's words with optional arguments shown in brackets left out, as a user runs it.
    words: list[str]


def _option(command: click.Command, name: str) -> click.Option | None:
    for param in command.params:
        if isinstance(param, click.Option) and (name in param.opts or name in param.secondary_opts):
            return param
    return None


def parse_streamvi(item: Documented, words: list[str]) -> Parsed:
    """Resolve ``streamvi <words>`` against the CLI's own definition, as click would parse it."""
    command: click.Command = cli
    path: list[str] = []
    parsed = Parsed((), [], [], None, False, [w for w in words if not re.fullmatch(r"\[.*\]", w)])
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if re.fullmatch(r"\[.*\]", word):  # an optional argument shown in brackets: left out
            continue
        if PLACEHOLDER.match(word):
            parsed.placeholders = True
            if word == "...":
                break
            parsed.arguments.append(word)
            continue
        if word.startswith("-"):
            name, has_inline, inline = word.partition("=")
            if name in ("-h", "--help", "--version"):
                continue
            option = _option(command, name)
            assert option is not None, (
                f"{item.where}: `{item.text}`: {name} is not an option of `streamvi {' '.join(path)}`"
            )
            if option.is_flag or option.count:
                continue
            if not has_inline:
                assert i < len(words), f"{item.where}: `{item.text}`: {name} needs a value"
                inline, i = words[i], i + 1
            if PLACEHOLDER.match(inline):
                parsed.placeholders = True
            elif isinstance(
                option.type, click.Choice | click.types.IntParamType | click.types.FloatParamType
            ):
                option.type.convert(inline, option, None)  # raises click.BadParameter
            if option.name == "overrides":
                parsed.overrides.append(inline)
            elif option.name == "config_path":
                parsed.config = inline
            continue
        if isinstance(command, click.Group) and not parsed.arguments:
            assert word in command.commands, (
                f"{item.where}: `{item.text}`: `streamvi {' '.join(path)}` has no command {word!r}"
            )
            command = command.commands[word]
            path.append(word)
            continue
        parsed.arguments.append(word)
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    allowed = sum(max(p.nargs, 0) if p.nargs >= 0 else 1_000 for p in arguments)
    assert len(parsed.arguments) <= allowed, (
        f"{item.where}: `{item.text}`: `streamvi {' '.join(path)}` takes {allowed} argument(s)"
    )
    parsed.path = tuple(path)
    return parsed


def streamvi_words(item: Documented) -> list[str] | None:
    """The streamvi arguments of a documented command: ``streamvi ...``, or the command given to
    the image in ``docker run ... streamvi:TAG ...``."""
    words = item.words()
    while words and words[0] == "cd":
        words = words[2:]
    if words[:1] == ["streamvi"]:
        return words[1:]
    if words[:2] == ["docker", "run"]:
        valued = {"-e", "-v", "-p", "--gpus", "--name", "--network", "-w", "--entrypoint"}
        i = 2
        while i < len(words) and words[i].startswith("-"):
            i += 2 if words[i] in valued else 1
        if i < len(words) and words[i].startswith("streamvi:"):
            return words[i + 1 :] or None  # the image's CMD (``run``) when none is given
    return None


def _parts(item: Documented) -> list[Documented]:
    return [
        Documented(item.where, part.strip(), item.fenced) for part in item.text.split("&&") if part.strip()
    ]


def streamvi_commands() -> list[tuple[Documented, Parsed]]:
    found = []
    for item in COMMANDS:
        for part in _parts(item):
            words = streamvi_words(part)
            if words is not None:
                found.append((part, parse_streamvi(part, words)))
    return found


def test_documented_streamvi_commands_name_real_commands_options_and_settings():
    commands = streamvi_commands()
    assert len(commands) >= 20, [c.text for c, _ in commands]
    for path in sorted({parsed.path for _, parsed in commands}):
        helped = CliRunner().invoke(cli, [*path, "--help"])
        assert helped.exit_code == 0 and "Usage:" in helped.output, (path, helped.output)
    # files the documents write with `> FILE` (e.g. an inferred schema) exist only once that ran:
    # commands reading them run for real in test_documented_commands_that_need_no_broker_run
    written = {target for item, _ in commands if (target := redirected_to(item)) is not None}
    for item, parsed in commands:
        if any(PLACEHOLDER.match(value.partition("=")[2]) for value in parsed.overrides):
            continue
        if any(value.partition("=")[2] in written for value in parsed.overrides):
            continue
        config = ROOT / parsed.config if parsed.config else None
        if config is not None:
            assert config.is_file(), f"{item.where}: `{item.text}`: no config file {parsed.config}"
        load_settings(config, parsed.overrides, environ={})  # raises ConfigError naming the setting
    # the documented environment variables name settings, and their example values load
    for doc in DOCS:
        for name, value in re.findall(r"\b(STREAMVI_[A-Z]+__[A-Z_]+)(?:=([^\s`]+))?", doc.read_text()):
            load_settings(environ={name: value or _any_value(name)})


def _any_value(name: str) -> str:
    """A valid value for a setting named only by its variable (a secret or a path in the docs)."""
    section, key = name.removeprefix("STREAMVI_").lower().split("__", 1)
    default = getattr(getattr(Settings(), section), key)
    return "x" if default is None else str(default)


# -- the cheap ones, for real ------------------------------------------------------------------
def make_snapshot(directory: Path) -> None:
    """A small snapshot under the shipped defaults (a smaller network, so it is quick to make)."""
    settings = load_settings(
        overrides=[
            f"snapshots.dir={directory}",
            "model.encoder_hidden=[32]",
            "training.batch_size=32",
            "training.jit_compile=false",
            "evaluation.heldout_fraction=0.2",
        ],
        environ={},
    )
    digits = load_digits()
    records = [
        RawRecord(
            "streamvi.input", 0, i, f"digits-{i}".encode(), encode_record(digits.x[i], f"digits-{i}", "json")
        )
        for i in range(192)
    ]
    loop = OnlineLoop(
        source=MemorySource(records),
        sink=MemorySink(),
        decoder=RecordDecoder("json", 64, 4096, support=Support.of_likelihood("bernoulli")),
        trainer=build_trainer(settings),
        store=SnapshotStore(directory),
        topics=OutputTopics("streamvi.latents", "streamvi.metrics", "streamvi.dead-letter"),
        policy=CheckpointPolicy(every_steps=1000, every_seconds=3600),
        max_batch_latency_seconds=5.0,
        snapshot_meta=snapshot_meta(settings),
        evaluation=evaluation_policy(settings),
    )
    loop.restore()
    loop.run(max_records=len(records))


def redirected_to(item: Documented) -> str | None:
    """The file a documented command's standard output is redirected to (``> FILE``), if any."""
    words = shlex.split(item.text, comments=True)
    for word, following in itertools.pairwise(words):
        if word == ">":
            return following
    return None


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory like the repository's top for the documented relative paths, with a
    snapshot in ``snapshots/`` (snapshots.dir's default) and a ``data.npy`` of digits rows."""
    for name in ("configs", "deploy", "bench"):
        (tmp_path / name).symlink_to(ROOT / name)
    make_snapshot(tmp_path / "snapshots")
    np.save(tmp_path / "data.npy", load_digits().x[:100])
    # raw events as the README's worked example shows them, for `schema infer --input sample.jsonl`
    events = [
        {
            "id": f"web-{i % 3}/{i:04d}",
            "host": f"web-{i % 3}",
            "kind": ["web", "batch", "cron"][i % 3],
            "up": i % 7 != 0,
            "metrics": {"cpu": (i % 10) / 10, "mem_mb": 1000.0 + i, "latency_ms": 20.0 + i % 30},
            "errors": i % 4,
        }
        for i in range(200)
    ]
    (tmp_path / "sample.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for name in [n for n in os.environ if n.startswith("STREAMVI_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_documented_commands_that_need_no_broker_run(sandbox):
    ran: set[tuple[str, ...]] = set()
    for item, parsed in streamvi_commands():
        if not item.fenced or parsed.placeholders or parsed.path not in RUNNABLE:
            continue
        if any(word.startswith("/") for word in parsed.words):
            continue  # a path inside the container image
        result = CliRunner().invoke(cli, parsed.words)
        assert result.exit_code == 0, f"{item.where}: `{item.text}` failed:\n{result.output}"
        target = redirected_to(item)
        if target is not None:  # `> FILE`: what the next documented command reads
            (sandbox / target).write_text(result.stdout)
        ran.add(parsed.path)
    assert ran == RUNNABLE, f"documented complete commands that ran: {sorted(ran)}"
    assert {p.name for p in (sandbox / "report").iterdir()} == {
        "history.png",
        "latents.png",
        "reconstructions.png",
    }


# -- everything else the documents run -------------------------------------------------------
def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, flags=re.MULTILINE))


def _argparse_flags(script: Path) -> set[str]:
    flags: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    flags.add(str(arg.value))
                    if any(
                        isinstance(k.value, ast.Attribute) and k.value.attr == "BooleanOptionalAction"
                        for k in node.keywords
                    ):
                        flags.add("--no-" + str(arg.value)[2:])
    return flags


def _check_compose(item: Documented, words: list[str]) -> None:
    i, files = 2, []
    while i < len(words) and words[i].startswith("-"):
        if words[i] == "-f":
            files.append(words[i + 1])
            i += 2
        else:
            i += 1
    if not files:
        return  # compose in general, not this stack's file
    services: set[str] = set()
    for name in files:
        assert (ROOT / name).is_file(), f"{item.where}: no {name}"
        services |= set(yaml.safe_load((ROOT / name).read_text())["services"])
    subcommand, rest = words[i], words[i + 1 :]
    named = [w for w in rest if not w.startswith("-")]
    if subcommand in ("run", "exec"):
        named = named[:1]
    for service in named if subcommand in ("run", "exec", "logs", "stop", "start", "restart", "up") else []:
        assert service in services, f"{item.where}: `{item.text}`: no service {service!r} in {files}"


def test_documented_make_targets_scripts_and_deploy_commands_exist():
    targets = _make_targets()
    checked = 0
    for whole in COMMANDS:
        cwd = ROOT
        for item in _parts(whole):
            words = item.words()
            if words[0] == "cd":
                cwd = cwd / words[1]
                assert cwd.is_dir(), f"{item.where}: `{item.text}`: no directory {words[1]}"
                continue
            checked += 1
            if words[0] == "make":
                for target in [w for w in words[1:] if not w.startswith("-")]:
                    assert target in targets, f"{item.where}: `{item.text}`: no make target {target!r}"
                    dry = subprocess.run(
                        ["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True
                    )
                    assert dry.returncode == 0, f"{item.where}: make -n {target}: {dry.stderr}"
            elif words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
                script = ROOT / words[1]
                assert script.is_file(), f"{item.where}: no {words[1]}"
                flags = _argparse_flags(script)
                for word in words[2:]:
                    if word.startswith("--"):
                        assert word.split("=")[0] in flags, f"{item.where}: {words[1]} has no {word}"
            elif words[:2] == ["docker", "compose"]:
                _check_compose(item, words)
            elif words[:2] == ["docker", "build"]:
                dockerfile = (ROOT / "Dockerfile").read_text()
                for i, word in enumerate(words):
                    if word == "--build-arg":
                        arg = words[i + 1].split("=")[0]
                        assert re.search(rf"^ARG {arg}\b", dockerfile, re.MULTILINE), (
                            f"{item.where}: no ARG {arg}"
                        )
            elif words[0] == "kubectl":
                for i, word in enumerate(words):
                    if word == "-k":
                        assert (ROOT / words[i + 1] / "kustomization.yaml").is_file(), item.where
            elif words[0] == "promtool" and item.fenced and shutil.which("promtool"):
                result = subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=120)
                assert result.returncode == 0, f"{item.where}: `{item.text}`: {result.stdout}{result.stderr}"
    assert checked >= 30


@pytest.mark.slow
def test_make_demo_runs_as_documented():
    """What ``make demo`` runs, with the test's interpreter in place of the one make would install."""
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), "demo"], capture_output=True, text=True, check=True)
    recipe = [line for line in dry.stdout.splitlines() if "streamvi " in line and "demo" in line]
    assert len(recipe) == 1, dry.stdout
    words = shlex.split(recipe[0])
    assert words[0].endswith("/streamvi"), recipe
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMVI_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "streamvi.cli.main", *words[1:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "trained on" in result.stdout and "plots: " in result.stdout
    plots = re.search(r"plots: (.*)", result.stdout)
    assert plots is not None
    assert {Path(p.strip()).name for p in plots.group(1).split(",")} == {
        "history.png",
        "latents.png",
        "reconstructions.png",
    }
