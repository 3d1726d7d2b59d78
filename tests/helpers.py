"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from zar.analysis.render import COLUMNS
from zar.cli import cli

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| " + " | ".join(COLUMNS) + " |"  # of zar compare's Markdown table
# The smallest real training: ResNet-18 on 96 synthetic 16 px images for one epoch, in fp32: what
# auto picks depends on a timing of this machine (zar.learn.autoprecision), and the tests that
# compare runs number for number must not depend on it (tests/test_precision.py tests auto).
TINY = [
    "--data", "synthetic", "--depth", "18", "--image-size", "16", "--epochs", "1", "--precision", "fp32",
    "--no-progress",
]  # fmt: skip


def epochs(n: int) -> list[str]:
    """TINY with ``n`` epochs."""
    return [a if a != "1" else str(n) for a in TINY]


def invoke(*args: str):
    """The real CLI in-process; returns click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(cli, list(args), prog_name="zar")


def zar_subprocess(*args: str, env: dict | None = None, cwd: Path | None = None, **kwargs):
    """Run ``python -m zar`` as a separate process (signals, concurrency, exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", "zar", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        **kwargs,
    )


def default_sigint():
    """``preexec_fn`` for a child that is sent SIGINT: Ctrl-C's default, which a pytest started in
    the background (as a shell starts a job with ``&``) would hand it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def all_runs():
    """Every run of every experiment in the current store."""
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def runs_of(experiment="zar", filter_string=""):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string)


def children(parent_id: str, experiment="zar"):
    return runs_of(experiment, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def use_store(mp: pytest.MonkeyPatch, folder: Path, uri: str) -> None:
    """This folder, this tracking URI, no run inherited from the shell (as conftest's ``store`` does)."""
    mp.chdir(folder)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)


def leave_store() -> None:
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
