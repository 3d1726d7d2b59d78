"""zar study --jobs: children side by side in processes of their own, the same record as one by one."""

import json
import signal
import subprocess
import sys

import psutil
from mlflow.tracking import MlflowClient

from conftest import TINY, zar_subprocess

THREE_EPOCHS = [a if a != "1" else "3" for a in TINY]  # TINY with --epochs 3


def runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def table(parent_id: str) -> list[dict]:
    result = zar_subprocess("compare", "--parent", parent_id, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def study_ids() -> list[str]:
    return [r.info.run_id for r in runs() if r.data.tags.get("zar.study") == "1"]


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


def start_study(*args):
    return subprocess.Popen([sys.executable, "-m", "zar", "study", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_child_killed_outright_is_failed_and_the_study_goes_on(store):
    proc = start_study("--models", "plain,resnet", "--seeds", "1", "--jobs", "2", *THREE_EPOCHS)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[plain seed 1] epoch   1/3"):
            (child,) = [c for c in psutil.Process(proc.pid).children()
                        if "plain" in c.cmdline()]
            child.kill()
            break
    out, _ = proc.communicate(timeout=300)
    output = "".join(lines) + out
    assert proc.returncode == 1, output
    assert output.splitlines()[-1] == ("Error: 1 of 2 runs failed: plain seed 1: "
                                       "process ended with signal SIGKILL")
    status = {r.data.tags.get("zar.model", "study"): r for r in runs()}
    assert status["plain"].info.status == "FAILED"  # closed by the study: its own process could not
    assert "without closing the run" in status["plain"].data.tags["zar.error"]
    assert status["resnet"].info.status == "FINISHED"
    assert status["study"].info.status == "FAILED"


def test_interrupting_a_parallel_study_leaves_no_run_running(store):
    proc = start_study("--models", "plain,resnet", "--seeds", "1", "--jobs", "2", *THREE_EPOCHS)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if " epoch   1/3" in line:
            proc.send_signal(signal.SIGTERM)  # to the study alone: it must stop its children itself
            break
    out, _ = proc.communicate(timeout=300)
    output = "".join(lines) + out
    assert proc.returncode == 130, output
    assert "study run" in output.splitlines()[-1] and "marked KILLED" in output.splitlines()[-1]
    found = runs()
    assert len(found) == 3 and {r.info.status for r in found} == {"KILLED"}, [
        (r.info.run_name, r.info.status, r.data.tags.get("zar.error")) for r in found]
    assert not [c for c in psutil.Process().children(recursive=True) if "zar" in " ".join(c.cmdline())]
