"""How long the zar command line makes a user wait for help and for a refused mistake.

Targets: ``zar --help`` and ``zar train --help`` under 0.5 s, a user mistake refused under 1 s
(it must not wait for torch or MLflow to import). The reference is the bare interpreter start,
``python -c pass``: each time is also given as a multiple of it, which carries across machines
better than seconds do.

    python benchmarks/bench_cli.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from _machine import PYTHON, header_lines, median_wall_time

HELP_TARGET_S, MISTAKE_TARGET_S = 0.5, 1.0


class Case(NamedTuple):
    kind: str  # "help" or the mistake it makes
    args: list[str]  # zar's arguments
    target_s: float
    exit_code: int  # what zar must answer: timing a command that went wrong means nothing


CASES = [
    Case("help", ["--help"], HELP_TARGET_S, 0),
    Case("help", ["train", "--help"], HELP_TARGET_S, 0),
    Case("unknown model", ["train", "--model", "nope"], MISTAKE_TARGET_S, 2),
    Case("missing folder", ["train", "--data", "no_such_folder"], MISTAKE_TARGET_S, 2),
    Case("bad config value", ["train", "--lr", "-1"], MISTAKE_TARGET_S, 2),
    Case("bad option", ["train", "--bogus", "1"], MISTAKE_TARGET_S, 2),
]


def zar_command() -> list[str]:
    """The ``zar`` script installed next to this interpreter, as a user runs it; ``python -m zar`` else."""
    script = Path(PYTHON).parent / "zar"
    return [str(script)] if script.exists() else [PYTHON, "-m", "zar"]


def time_all(repeat: int) -> tuple[float, list[tuple[Case, float, int]]]:
    """Median seconds of ``python -c pass``, and of each case with its exit code.

    In a bare folder with a store of its own: a mistake that slipped through must not touch the user's runs.
    """
    with tempfile.TemporaryDirectory(prefix="zar-bench-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        ref_s, _ = median_wall_time([PYTHON, "-c", "pass"], repeat, cwd=tmp, env=env)
        timed = [(case, *median_wall_time(zar_command() + case.args, repeat, cwd=tmp, env=env)) for case in CASES]
    return ref_s, timed


def table(ref_s: float, timed: list[tuple[Case, float, int]]) -> list[str]:
    lines = [
        "| command | kind | median (s) | x `python -c pass` | target | met | exit code |",
        "| --- | --- | ---: | ---: | ---: | :-: | :-: |",
    ]
    for case, seconds, code in timed:
        met = "yes" if seconds < case.target_s and code == case.exit_code else "NO"
        code_note = str(code) if code == case.exit_code else f"{code} (expected {case.exit_code})"
        lines.append(
            f"| `zar {' '.join(case.args)}` | {case.kind} | {seconds:.3f} | {seconds / ref_s:.1f} "
            f"| < {case.target_s} s | {met} | {code_note} |"
        )
    return lines


def ratio_lines(ref_s: float, timed: list[tuple[Case, float, int]]) -> list[str]:
    """The slowest help and the slowest mistake, as multiples of the bare interpreter start."""
    lines = []
    for label, target in (("help", HELP_TARGET_S), ("mistake", MISTAKE_TARGET_S)):
        case, seconds, _ = max((t for t in timed if t[0].target_s == target), key=lambda t: t[1])
        lines.append(
            f"ratio slowest {label} / `python -c pass`: {seconds / ref_s:.1f} "
            f"(`zar {' '.join(case.args)}`, {seconds:.3f} s; target < {target} s)"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each command; the median counts")
    args = parser.parse_args()
    ref_s, timed = time_all(args.repeat)
    print("\n".join(header_lines("zar command line: time to help and to a refused mistake")))
    print(f"Median of {args.repeat} run(s) each, as subprocesses. Reference: `python -c pass` = {ref_s:.3f} s.\n")
    print("\n".join(table(ref_s, timed) + [""] + ratio_lines(ref_s, timed)))
    return 0 if all(code == case.exit_code for case, _, code in timed) else 1


if __name__ == "__main__":
    sys.exit(main())
