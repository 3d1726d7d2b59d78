"""The benchmark scripts still run: each at its tiniest size, exit 0, header and ratio line printed.

Only that they work is tested; their timings depend on the machine, so nothing here asserts one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize(
    "script, args, ratio",
    [
        ("bench_cli.py", ["--repeat", "1"], "ratio slowest mistake / `python -c pass`: "),
        pytest.param(  # ~14 s each: the slow suite's
            "bench_compare.py",
            ["--runs", "5", "--repeat", "1"],
            "ratio zar compare / mlflow experiments csv: ",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "bench_precision.py",
            ["--images", "40", "--size", "32", "--steps", "1"],
            "ratio zar (precision auto) / plain fp32 loop: ",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "bench_bf16.py",
            ["--sizes", "8", "--threads", "1", "--batch", "4", "--steps", "1"],
            "| 1 | 8 | 4 | ",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "bench_train.py",
            ["--tiny", "--epochs", "1", "--repeat", "1", "--overhead-epochs", "1"],
            "ratio checkpoint overhead / wall: ",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_benchmark_runs_and_prints_its_ratio(script, args, ratio):
    proc = run_benchmark(script, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- machine: " in proc.stdout and "- date: " in proc.stdout and "torch " in proc.stdout
    assert any(line.startswith(ratio) for line in proc.stdout.splitlines()), proc.stdout
