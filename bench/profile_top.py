"""The top lines of a py-spy profile of the daemon, per thread, as JSON.

Record a profile of the end-to-end run (``--format raw`` writes collapsed stacks, one per line):

    .venv/bin/py-spy record -r 200 --threads --format raw -o profile.txt -- \\
        .venv/bin/python bench/throughput.py --records 40000 --format json \\
        --no-baseline --no-startup --no-latency --memory-total 0

then ``python bench/profile_top.py profile.txt``. Only samples inside the daemon are kept: the
loop thread's under ``end_to_end`` and the step thread's (``streamvi-step``). For each thread the
share of its samples spent in each function (inclusive) and in each innermost frame (exclusive).

Usage: python bench/profile_top.py PROFILE [--top 15]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

THREADS = {"loop": "MainThread", "step": "streamvi-step"}


def _function(frame: str) -> str:
    """``name (file:line)`` -> ``name (file)``: lines of one function are counted together."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarise(path: Path, top: int) -> dict[str, object]:
    inclusive = {key: Counter[str]() for key in THREADS}
    exclusive = {key: Counter[str]() for key in THREADS}
    totals = dict.fromkeys(THREADS, 0)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        key = next((k for k, name in THREADS.items() if name in frames[0]), None)
        if key is None or (key == "loop" and not any("end_to_end" in f for f in frames)):
            continue
        samples = int(count)
        totals[key] += samples
        exclusive[key][_function(frames[-1])] += samples
        for function in {_function(f) for f in frames[1:]}:
            inclusive[key][function] += samples

    def shares(counter: Counter[str], total: int) -> dict[str, float]:
        return {name: round(n / total, 3) for name, n in counter.most_common(top)}

    return {
        key: {
            "samples": totals[key],
            "inclusive": shares(inclusive[key], totals[key] or 1),
            "exclusive": shares(exclusive[key], totals[key] or 1),
        }
        for key in THREADS
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(json.dumps(summarise(args.profile, args.top), indent=2))


if __name__ == "__main__":
    main()
