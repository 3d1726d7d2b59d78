"""zar study: one parent run with a child per model and seed, its table and charts, failures and
interruptions; in one process, and with --jobs in processes of their own."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

import zar.training

from helpers import HEADER, TINY, children, epochs, invoke, runs_of, zar_subprocess
from helpers import all_runs as runs

THREE_EPOCHS = epochs(3)


# --- one study in this process (conftest's ``study`` and ``failed_study``) ------------------------------


def test_study_is_one_parent_with_a_nested_run_per_model_and_seed(in_study):
    client = MlflowClient()
    parent = client.get_run(in_study.parent_id)
    assert parent.info.status == "FINISHED"
    assert "zar.model" not in parent.data.tags and parent.data.params["models"] == "plain,resnet"
    kids = children(in_study.parent_id)
    assert len(kids) == 4
    assert all(k.info.status == "FINISHED" for k in kids)
    assert sorted((k.data.tags["zar.model"], k.data.params["seed"]) for k in kids) == [
        ("plain", "1"),
        ("plain", "2"),
        ("resnet", "1"),
        ("resnet", "2"),
    ]
    assert in_study.lr_run_id not in {k.info.run_id for k in kids}
    assert f"/runs/{in_study.parent_id}?workflowType=machine_learning" in in_study.output


def test_study_parent_keeps_the_table_and_two_charts(in_study):
    client = MlflowClient()
    pid = in_study.parent_id
    names = {a.path for a in client.list_artifacts(pid)}
    assert {"comparison.md", "comparison.csv"} <= names
    charts = sorted(n for n in names if n.endswith(".png"))
    assert charts == ["final_val_acc.png", "val_acc_per_epoch.png"]
    for chart in charts:
        assert Path(client.download_artifacts(pid, chart)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(client.download_artifacts(pid, "comparison.md")).read_text().splitlines()
    assert md[0] == HEADER
    assert [line.split(" | ")[0] for line in md[2:4]] == ["| Plain-18", "| ResNet-18"]
    assert md[-1] == "4 runs used, none left out."
    assert HEADER in in_study.output  # the study prints the table too

    table = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(pid, "comparison.csv")).read_text())))
    cli_json = json.loads(invoke("compare", "--parent", pid, "--format", "json").stdout)
    assert [r["name"] for r in table] == [r["name"] for r in cli_json]
    for got, want in zip(table, cli_json):
        assert float(got["val_acc_mean"]) == want["val_acc_mean"]
    # The table's numbers are the parent's metrics too, for the runs table and the Compare view.
    metrics = client.get_run(pid).data.metrics
    for want in cli_json:
        assert metrics[f"val_acc_mean.{want['model']}"] == pytest.approx(want["val_acc_mean"] / 100)  # a fraction
        assert metrics[f"runs.{want['model']}"] == want["runs"]
    assert "val_acc_vs_baseline.resnet" not in metrics and "val_acc_vs_baseline.plain" in metrics


def test_study_goes_on_past_a_failed_child_and_ends_failed(in_failed_study):
    s = in_failed_study
    assert s.exit_code == 1
    assert s.output.splitlines()[-1] == (
        "Error: 1 of 2 runs failed: plain seed 1: OSError: [Errno 28] No space left on device"
    )
    kids = {k.data.tags["zar.model"]: k for k in children(s.parent_id)}
    assert kids["plain"].info.status == "FAILED"
    assert "No space left on device" in kids["plain"].data.tags["zar.error"]
    assert kids["resnet"].info.status == "FINISHED"
    parent = MlflowClient().get_run(s.parent_id)
    assert parent.info.status == "FAILED"
    assert "1 of 2 runs failed: plain seed 1: OSError" in parent.data.tags["zar.error"]


def test_failed_study_keeps_the_table_of_what_finished(in_failed_study):
    md = Path(MlflowClient().download_artifacts(in_failed_study.parent_id, "comparison.md")).read_text()
    assert "| ResNet-18 |" in md and "Plain-18" not in md
    assert md.splitlines()[-1] == "1 runs used, 1 left out (1 FAILED; --include-unfinished counts unfinished runs)."


def test_study_nests_its_runs_under_the_run_mlflow_run_created(store, monkeypatch):
    client = MlflowClient()
    env_run = client.create_run(client.create_experiment("zar")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", env_run)

    def no_model(*args, **kwargs):  # the child fails at once: what matters here is where its run lives
        raise RuntimeError("no model today")

    monkeypatch.setattr(zar.training, "build_model", no_model)
    result = invoke("study", "--models", "resnet", "--seeds", "3", *TINY)
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "Error: 1 of 1 runs failed: resnet seed 3: RuntimeError: no model today"
    parent = client.get_run(env_run)
    assert parent.data.tags["zar.study"] == "1" and "zar.model" not in parent.data.tags
    assert parent.info.status == "FAILED" and "1 of 1 runs failed" in parent.data.tags["zar.error"]
    kids = children(env_run)
    assert [(k.data.tags["zar.model"], k.info.status) for k in kids] == [("resnet", "FAILED")]
    assert len(runs_of()) == 2


# --- zar study --jobs ------------------------------------------------------------------------------------


def table(parent_id: str) -> list[dict]:
    result = zar_subprocess("compare", "--parent", parent_id, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def study_ids() -> list[str]:
    return [r.info.run_id for r in runs() if r.data.tags.get("zar.study") == "1"]


@pytest.mark.slow
def test_parallel_study_gives_the_sequential_table(store):
    sequential = zar_subprocess("study", "--models", "plain,resnet", "--seeds", "1", *TINY)
    assert sequential.returncode == 0, sequential.stderr
    (first,) = study_ids()
    parallel = zar_subprocess("study", "--models", "plain,resnet", "--seeds", "1", "--jobs", "2", *TINY)
    assert parallel.returncode == 0, parallel.stderr
    (second,) = [i for i in study_ids() if i != first]

    assert table(first) == table(second)
    # Each child's lines are prefixed with what it trains; the study's own table follows.
    assert "[plain seed 1] epoch   1/1" in parallel.stdout and "[resnet seed 1] epoch   1/1" in parallel.stdout
    assert "| Plain-18 |" in parallel.stdout.split("[resnet seed 1] epoch")[-1]
    client = MlflowClient()
    assert client.get_run(second).data.params["jobs"] == "2"
    kids = [r for r in runs() if r.data.tags.get("mlflow.parentRunId") == second]
    assert sorted(k.data.tags["zar.model"] for k in kids) == ["plain", "resnet"]
    assert all(k.info.status == "FINISHED" for k in kids)
    assert {k.info.experiment_id for k in kids} == {client.get_run(second).info.experiment_id}


def start_study(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "zar", "study", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
def test_a_child_killed_outright_is_failed_and_the_study_goes_on(store):
    proc = start_study("--models", "plain,resnet", "--seeds", "1", "--jobs", "2", *THREE_EPOCHS)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[plain seed 1] epoch   1/3"):
            (plain,) = [r for r in runs() if r.data.tags.get("zar.model") == "plain"]
            child = psutil.Process(int(plain.data.tags["zar.pid"]))  # the worker training it
            assert child.ppid() == proc.pid
            child.kill()
            break
    out, _ = proc.communicate(timeout=300)
    output = "".join(lines) + out
    assert proc.returncode == 1, output
    assert output.splitlines()[-1] == ("Error: 1 of 2 runs failed: plain seed 1: process ended with signal SIGKILL")
    status = {r.data.tags.get("zar.model", "study"): r for r in runs()}
    assert status["plain"].info.status == "FAILED"  # closed by the study: its own process could not
    assert "without closing the run" in status["plain"].data.tags["zar.error"]
    assert status["resnet"].info.status == "FINISHED"
    assert status["study"].info.status == "FAILED"


@pytest.mark.slow
def test_interrupting_a_parallel_study_leaves_no_run_running(store):
    # Started as a shell starts a background job, with SIGINT ignored: the children inherit that.
    proc = start_study(
        "--models", "plain,resnet", "--seeds", "1", "--jobs", "2", *THREE_EPOCHS, preexec_fn=ignore_sigint
    )
    lines, started = [], set()
    for line in proc.stdout:
        lines.append(line)
        if " epoch   1/3" in line:
            started.add(line.split()[0])
        if len(started) == 2:  # both children hold a run; one that is still importing torch has none yet
            proc.send_signal(signal.SIGTERM)  # to the study alone: it must stop its children itself
            break
    out, _ = proc.communicate(timeout=300)
    output = "".join(lines) + out
    assert proc.returncode == 130, output
    last = output.splitlines()[-1]  # how to continue the study, not one of its children
    assert "marked KILLED" in last and "zar study --resume" in last and "zar train --resume" not in last
    found = runs()
    assert len(found) == 3 and {r.info.status for r in found} == {"KILLED"}, [
        (r.info.run_name, r.info.status, r.data.tags.get("zar.error")) for r in found
    ]
    assert not [c for c in psutil.Process().children(recursive=True) if "zar" in " ".join(c.cmdline())]


def test_the_study_run_records_the_precision_its_children_ran(store):
    result = invoke("study", "--models", "resnet", "--seeds", "1", *TINY, "--precision", "auto")
    assert result.exit_code == 0, result.output
    recorded = {r.data.tags.get("zar.model", "study"): r.data.params["precision"] for r in runs()}
    ran = recorded["resnet"]  # what auto measured faster here at 16 px: fp32 or bf16, never auto
    assert recorded == {"study": ran, "resnet": ran} and ran in ("fp32", "bf16")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "1,2,1"], "--seeds names 1 more than once"),
        (["--models", "resnet,se,resnet"], "--models names resnet more than once"),
        (["--seeds", "1,4294967296"], "config key 'seed' must be between 0 and 4294967295"),
    ],
)
def test_study_refuses_repeats_and_bad_seeds_before_any_run(store, args, message):
    result = invoke("study", *TINY, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert runs() == []


def test_the_studys_table_prints_the_warnings_zar_compare_prints(store):
    """Children that differ in a setting the study did not vary (here: a child added by hand with
    another lr) get rows of their own, and the study says why, as zar compare does."""
    from zar.analysis.study_table import log_table

    client = MlflowClient()
    experiment_id = client.create_experiment("zar")
    parent = client.create_run(experiment_id, tags={"zar.study": "1"}).info.run_id
    for extra in ([], ["--lr", "0.01"]):
        assert invoke("train", "--model", "resnet", *TINY, "--parent-run", parent, *extra).exit_code == 0
    lines = []
    table = log_table(parent, experiment_id, ["resnet"], "resnet", lines.append)
    assert len(table) == 2
    assert [line for line in lines if line.startswith("Warning: ")] == [
        "Warning: runs differ in more than model and seed: lr: 0.001, 0.01 (split into rows named by lr)"
    ]


# --- the cores shared over a parallel study's children --------------------------------------------


def test_the_cores_go_to_the_children_still_training(tmp_path, monkeypatch):
    """Five children on two slots of two cores: one thread each while two train, both cores to the last."""
    from zar import parallel

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(parallel, "_gpu_count", lambda: 0)
    share = parallel.ThreadShare(tmp_path, jobs=2, queued=5)
    read = lambda i: int(share.file(i).read_text())  # noqa: E731
    assert [share.started(0), share.started(1)] == [1, 1]
    share.ended(0)
    assert share.started(2) == 1 and read(1) == 1  # a child still queued takes the freed core
    share.ended(1)
    assert share.started(3) == 1
    share.ended(2)
    assert share.started(4) == 1  # child 3 still trains beside it
    share.ended(3)
    assert read(4) == 2  # the last child alone: both cores
    # One child on two slots has both cores from the start.
    assert parallel.ThreadShare(tmp_path, jobs=2, queued=1).started(0) == 2


def test_a_child_follows_its_share_between_epochs(store, tmp_path):
    share = tmp_path / "threads0"
    share.write_text("1")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "ZAR_THREADS_FILE": str(share)}
    result = subprocess.run(
        [sys.executable, "-m", "zar", "train", *TINY, "--epochs", "2"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "epoch   1/2" in line)
    assert lines[first + 1] == "threads: 2 -> 1 (this child's share of the study's cores now)"


def test_a_parallel_study_chooses_its_precision_for_the_threads_each_child_gets(monkeypatch):
    from zar import parallel

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 8)
    assert [parallel.child_threads(j) for j in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parallel.child_threads(2) == 3  # the user's choice stands
