"""What every benchmark here shares: the header naming machine and date, and timing a command.

A timing means little without the machine and the date: ``header_lines(title)`` returns them as
Markdown lines to print above a result. ``median_wall_time`` times a command as a subprocess.
Scripts import it as ``from _machine import header_lines`` (they run as ``python benchmarks/x.py``,
which puts this folder on sys.path).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata

PYTHON = sys.executable  # the benchmarked commands run in the environment the benchmark runs in


def cpu_model() -> str:
    """The first 'model name' of /proc/cpuinfo; the platform's processor string elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(name: str) -> str:
    """From the installed metadata, so that asking costs no import of torch itself."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def header_lines(title: str) -> list[str]:
    """Title, date, CPU, cores and library versions, as lines to print above a result table."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"## {title}",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {cores} cores usable ({os.cpu_count()} online), "
        f"{platform.system()} {platform.release()}",
        f"- python {platform.python_version()}, torch {package_version('torch')}, mlflow {package_version('mlflow')}",
        "",
    ]


def median_wall_time(cmd: list[str], repeat: int, **run_kwargs) -> tuple[float, int]:
    """Median seconds of ``repeat`` runs of ``cmd`` as a subprocess, and its (last) exit code.

    A subprocess per run: what a user waits for includes the interpreter start and every import.
    """
    times, code = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **run_kwargs)
        code = proc.returncode
        times.append(time.perf_counter() - start)
    return statistics.median(times), code
