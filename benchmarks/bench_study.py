"""The default study as ``make demo`` runs it (``zar study --jobs 2``: 5 architectures x 10 epochs on
the digits), timed whole, against the same study at a reference commit.

Each study runs as a subprocess in a fresh SQLite store, this checkout's first and then the
reference's (a ``git worktree`` of ``--ref``), one after the other on the same machine. Prints the
wall time of each, the seeds per hour it means (one seed = the five architectures once), and the
ratio. Target (issue 23): within 300 s on a CPU with AVX-512 and native bf16.

    python benchmarks/bench_study.py [--ref 77eeb1c] [-- extra zar study args, e.g. --epochs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import PYTHON, header_lines

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 300.0


def timed_study(source: Path, folder: Path, extra: list[str]) -> float:
    folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "OMP_NUM_THREADS"}
    env |= {"PYTHONPATH": str(source), "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    cmd = [PYTHON, "-m", "zar", "study", "--jobs", "2", "--no-progress", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    (folder / "study.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"the study of {source} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="77eeb1c", help="the commit to compare with (default: before issue 23)")
    parser.add_argument("extra", nargs="*", help="more zar study arguments, after --")
    args = parser.parse_args(argv)
    print("\n".join(header_lines("The default study (zar study --jobs 2), whole")))
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref), args.ref], check=True,
                       capture_output=True)  # fmt: skip
        try:
            now = timed_study(ROOT, Path(tmp) / "now", args.extra)
            before = timed_study(ref, Path(tmp) / "before", args.extra)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref)], check=False)
    print("| code | study wall time (s) | seeds per hour |")
    print("| --- | ---: | ---: |")
    print(f"| {args.ref} (reference) | {before:.0f} | {3600 / before:.1f} |")
    print(f"| this checkout | {now:.0f} | {3600 / now:.1f} |")
    met = "met" if now <= TARGET_S else "not met"
    print(f"\nratio reference / this checkout: {before / now:.2f}x; target {TARGET_S:.0f} s: {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
