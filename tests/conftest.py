"""Shared fixtures: a real MLflow SQLite store per test, the real CLI, and two real studies."""

from __future__ import annotations

import os

# Tiny models gain nothing from two threads, and tests that start several processes oversubscribe
# the cores; set before torch loads, and inherited by every subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A checkpoint every epoch, as tests that resume from a given epoch expect; tests/test_reliability.py
# checks the default budget (2% of a run's time), where a killed run resumes from an older epoch.
os.environ.setdefault("ZAR_CHECKPOINT_BUDGET", "1")
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from zar import recording

from helpers import TINY, invoke, leave_store, runs_of, use_store


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
    subprocess.run(
        [sys.executable, "-c", "from mlflow.tracking import MlflowClient as C; C().search_experiments()"],
        check=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{path}"},
    )
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh SQLite store in a temporary working folder (artifacts land in ./mlruns there)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_store(monkeypatch, tmp_path, uri)
    yield uri
    leave_store()


@pytest.fixture
def zar():
    """Invoke the real CLI in-process; returns click's Result."""
    return invoke


# --- two real studies, made once per session: the study tests and the compare tests read them ------------


@dataclass
class Study:
    folder: Path
    uri: str
    output: str
    exit_code: int
    parent_id: str
    lr_run_id: str | None = None


def new_store(tmp_path_factory, empty_store, name: str) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp(name)
    shutil.copy(empty_store, folder / "mlflow.db")
    return folder, f"sqlite:///{folder / 'mlflow.db'}"


def study_parent(experiment="zar"):
    parents = runs_of(experiment, "tags.`zar.study` = '1'")
    assert len(parents) == 1, parents
    return parents[0]


@pytest.fixture(scope="session")
def study(tmp_path_factory, empty_store) -> Study:
    """``zar study`` over plain and resnet with two seeds (its best model registered as ``tiny-study``), and
    one resnet run with another lr beside it."""
    folder, uri = new_store(tmp_path_factory, empty_store, "study")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, folder, uri)
        try:
            result = invoke("study", "--models", "plain,resnet", "--seeds", "1,2", *TINY, "--register", "tiny-study")
            assert result.exit_code == 0, result.output
            parent_id = study_parent().info.run_id
            other = invoke("train", "--model", "resnet", *TINY, "--lr", "0.01")
            assert other.exit_code == 0, other.output
            lr_run_id = runs_of(filter_string="params.lr = '0.01'")[0].info.run_id
        finally:
            leave_store()
    return Study(folder, uri, result.output, result.exit_code, parent_id, lr_run_id)


@pytest.fixture(scope="session")
def failed_study(tmp_path_factory, empty_store) -> Study:
    """``zar study`` over plain and resnet where plain's run fails after its epoch (its results cannot be saved)."""
    folder, uri = new_store(tmp_path_factory, empty_store, "failed")
    log_results = recording.log_results

    def failing_for_plain(prepared, *rest):
        if prepared.model_name == "plain":
            raise OSError(28, "No space left on device")
        return log_results(prepared, *rest)

    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, folder, uri)
        mp.setattr(recording, "log_results", failing_for_plain)
        try:
            result = invoke("study", "--models", "plain,resnet", "--seeds", "1", *TINY)
            parent_id = study_parent().info.run_id
        finally:
            leave_store()
    return Study(folder, uri, result.output, result.exit_code, parent_id)


def entered(study: Study, monkeypatch):
    """Point MLflow at a session-wide study's store for one test."""
    use_store(monkeypatch, study.folder, study.uri)
    yield study
    leave_store()


@pytest.fixture
def in_study(study, monkeypatch) -> Study:
    yield from entered(study, monkeypatch)


@pytest.fixture
def in_failed_study(failed_study, monkeypatch) -> Study:
    yield from entered(failed_study, monkeypatch)
