"""zar against a team tracking server: a real ``mlflow server`` on loopback that stores and serves
the artifacts itself (``--serve-artifacts``), backed (a) by SQLite and (b) by PostgreSQL in a
throwaway cluster (tests/pgcluster.py). Every command runs as a user's would, in a subprocess
with ``MLFLOW_TRACKING_URI=http://127.0.0.1:PORT`` and a working folder that must stay free of any
local store; the sweep's workers share one Optuna study in the same PostgreSQL cluster.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pgcluster
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_served_model import load_without_zar, raw_validation_images
from test_train import assert_complete_run

from helpers import ROOT, TINY, epochs

pytestmark = pytest.mark.slow


def _load_check_ui():
    spec = importlib.util.spec_from_file_location("check_ui", ROOT / "scripts" / "check_ui.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check_ui = _load_check_ui()


@dataclass
class Server:
    address: str
    folder: Path  # the server's: its log and, served, every artifact
    cluster: pgcluster.Cluster | None


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"server-{request.param}")
    if request.param == "sqlite":
        with check_ui.mlflow_server(folder, serve_artifacts=True) as address:
            yield Server(address, folder, None)
        return
    with pgcluster.cluster() as cluster:
        backend = cluster.create_database("mlflow")
        with check_ui.mlflow_server(folder, backend_uri=backend, serve_artifacts=True) as address:
            yield Server(address, folder, cluster)


@pytest.fixture
def work(server, tmp_path, monkeypatch):
    """A user's working folder pointed at the server; after the test it still holds no store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.address)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    experiment = f"e{os.urandom(4).hex()}"  # the module shares one server: each test its own experiment
    yield experiment
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def zar(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "zar", *args], capture_output=True, text=True, **kwargs)


def runs(experiment, filter_string=""):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string) if exp else []


def test_train_logs_the_whole_contract_to_the_server_and_serves_its_artifacts(server, work):
    result = zar("train", "--model", "mish", *epochs(2), "--experiment", work)
    assert result.returncode == 0, result.stderr
    (run,) = runs(work)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # stored by the server, not here
    assert_complete_run(run, "mish", epochs=2, n_val=20)
    assert list((server.folder / "artifacts").rglob("confusion_matrix.png"))  # where the server keeps them


def test_an_interrupted_run_resumes_against_the_server(server, work):
    proc = subprocess.Popen(
        [sys.executable, "-m", "zar", "train", "--model", "resnet", *epochs(3), "--experiment", work],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "epoch   1/3" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    (run,) = runs(work)
    assert run.info.status == "KILLED"
    result = zar("train", "--resume", run.info.run_id)
    assert result.returncode == 0, result.stderr
    (run,) = runs(work)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(steps) == sorted(set(steps)) and steps[-1] == 3  # every epoch once, the last the 3rd


def test_study_compare_and_bench_against_the_server(server, work):
    study = zar("study", "--models", "plain,resnet", "--seeds", "1", *TINY, "--experiment", work, "--register", work)
    assert study.returncode == 0, study.stderr
    assert f"Registered models:/{work}/1: " in study.stdout
    assert f"{server.address}/#/models/{work}/versions/1" in study.stdout
    bench = zar(
        "bench", "--models", "resnet", "--depth", "18", "--image-size", "16", "--min-time", "0.05", "--rounds", "1",
        "--experiment", work,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    table = zar("compare", "--with-bench", "--experiment", work)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith(("| Plain-18", "| ResNet-18"))]
    assert len(rows) == 2 and "n/a" not in rows[1], table.stdout  # ResNet-18 joined with its bench run
    statuses = Counter(r.info.status for r in runs(work))
    assert statuses == {"FINISHED": 4}  # the study, its two children, the bench run
    # The registered model loads from the server's registry in a Python without zar.
    images, _, classes = raw_validation_images(16)
    got = load_without_zar([f"models:/{work}/1"], images[:4], Path.cwd())[f"models:/{work}/1"]
    assert got["metadata"]["classes"] == classes and set(got["pyfunc"]) <= set(classes)


def test_zar_ui_points_at_the_server_and_starts_nothing(server, work):
    result = zar("ui", "--experiment", work)
    assert result.returncode == 0, result.stderr
    assert f"{server.address}/#/experiments" in result.stdout and "?workflowType=machine_learning" in result.stdout


def write_space(folder: Path) -> str:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({"lr": {"log_uniform": [1.0e-4, 1.0e-2]}}))
    return str(path)


def test_a_sweep_runs_against_the_server(server, work, tmp_path):
    result = zar("sweep", "--models", "resnet", "--space", write_space(tmp_path), "--trials", "2", *TINY,
                 "--experiment", work)  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = runs(work, "tags.`zar.trial` LIKE '%'")
    assert sorted(r.data.tags["zar.trial"] for r in trials) == ["0", "1"]
    assert "| ResNet-18 |" in result.stdout


@pytest.mark.parametrize("server", ["postgresql"], indirect=True)  # Optuna's storage in the same cluster
def test_two_workers_share_one_sweep_on_postgresql(server, work, tmp_path):
    storage = server.cluster.create_database(f"optuna_{work}")
    args = [sys.executable, "-m", "zar", "sweep", "--models", "resnet", "--space", write_space(tmp_path),
            "--trials", "6", *TINY, "--storage", storage, "--experiment", work]  # fmt: skip
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:  # the second worker starts once the sweep's run and its first trial exist
        lines.append(line)
        if line.startswith("resnet trial 0 of 6"):
            break
    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    out, _ = first.communicate(timeout=600)
    output = "".join(lines) + out
    assert first.returncode == 0, output
    assert second.returncode == 0, second.stdout + second.stderr
    assert "as a worker" in second.stdout and "| ResNet-18 |" in output

    (parent,) = runs(work, "tags.`zar.sweep` = '1'")
    trials = runs(work, "tags.`zar.trial` LIKE '%'")
    numbers = sorted(int(r.data.tags["zar.trial"]) for r in trials)
    assert numbers == list(range(6)), numbers  # six trial runs, each trial number once
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert parent.info.status == "FINISHED" and {r.info.status for r in trials} <= {"FINISHED", "KILLED"}
    took = Counter(r.data.tags["zar.pid"] for r in trials)
    assert len(took) == 2, took  # both workers trained trials
    (row,) = [line for line in output.splitlines() if line.startswith("| ResNet-18 |")]
    finished, pruned, failed = map(int, re.search(r"\| (\d+) / (\d+) / (\d+) \|", row).groups())
    assert finished + pruned + failed == 6, row  # the table counts the other worker's trials too


def test_a_password_in_the_tracking_uri_is_printed_nowhere(server, work):
    """zar masked it in its own lines; MLflow's 'View run ... at: http://alice:s3cret@...' printed it."""
    uri = server.address.replace("://", "://alice:s3cret@", 1)
    result = zar(
        "train", "--model", "resnet", *TINY, "--experiment", work, env={**os.environ, "MLFLOW_TRACKING_URI": uri}
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert "s3cret" not in printed and "View run" not in printed
    assert f"Run: {server.address}/#/experiments/" in printed  # zar's own link, without credentials
