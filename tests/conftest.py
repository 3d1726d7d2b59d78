"""Shared fixtures: a real MLflow SQLite store per test, and the real CLI."""

from __future__ import annotations

import os

# Tiny models gain nothing from two threads, and tests that start several processes oversubscribe
# the cores; set before torch loads, and inherited by every subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from zar.cli import cli

ROOT = Path(__file__).resolve().parents[1]
# The smallest real training: ResNet-18 on 96 synthetic 16 px images for one epoch.
TINY = ["--data", "synthetic", "--depth", "18", "--image-size", "16", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="session", autouse=True)
def image_cache_dir(tmp_path_factory) -> Path:
    """zar's decoded-image cache goes to a temporary folder, never to ~/.cache/zar.

    Session-wide, so module-scoped fixtures that load image folders use it too; the cache is
    keyed by content, so tests sharing it cannot see each other's images.
    """
    path = tmp_path_factory.mktemp("zar-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZAR_CACHE_DIR", str(path))  # subprocesses that tests start inherit it
        yield path


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An initialised MLflow database, made once: creating its tables takes seconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    subprocess.run([sys.executable, "-c", "from mlflow.tracking import MlflowClient as C; "
                    "C().search_experiments()"], check=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{path}"})
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh SQLite store in a temporary working folder (artifacts land in ./mlruns there)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def zar():
    """Invoke the real CLI in-process; returns click's Result."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli, list(args), prog_name="zar")

    return invoke


def zar_subprocess(*args: str, env: dict | None = None, cwd: Path | None = None, **kwargs):
    """Run ``python -m zar`` as a separate process (signals, concurrency, exit codes)."""
    return subprocess.run([sys.executable, "-m", "zar", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, **kwargs)
