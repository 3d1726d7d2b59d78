"""``zar ui``: MLflow's UI on zar's SQLite store, on loopback only, stopped with everything it started."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from urllib.request import urlopen

import psutil
import pytest
from mlflow.tracking import MlflowClient

from helpers import invoke


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(pids) -> set[str]:
    """The addresses the given processes listen on."""
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids}


@pytest.mark.slow
def test_it_serves_the_store_on_loopback_prints_the_runs_link_and_stops_cleanly(store):
    experiment_id = MlflowClient().create_experiment("zar")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zar", "ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        check_serving(proc, port, experiment_id)
    finally:  # a failed check must not leave the UI running
        with contextlib.suppress(psutil.Error):
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                p.kill()


def check_serving(proc, port: int, experiment_id: str) -> None:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Training runs: "):
            break
    output = "".join(lines)
    assert lines and lines[-1].startswith("Training runs: "), output + proc.communicate(timeout=30)[0]
    link = lines[-1].split(": ", 1)[1].strip()
    assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")

    with urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=zar") as r:
        assert r.status == 200 and experiment_id in r.read().decode()  # the server reads this store
    server = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    assert server, "zar ui started no server process"
    assert listening({proc.pid, *(p.pid for p in server)}) == {"127.0.0.1"}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stdout.read()
    deadline = time.monotonic() + 10
    while [p for p in server if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, f"left running: {[p.cmdline() for p in server if p.is_running()]}"
        time.sleep(0.2)
    with pytest.raises(OSError):
        urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_a_port_in_use_is_a_one_line_error_naming_it(store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("ui", "--port", str(port))
    assert result.exit_code == 2  # a user mistake
    assert result.output.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
    assert result.output.rstrip().endswith("pass another --port") and result.output.count("\n") == 1


def test_no_store_is_said_before_any_server_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    result = invoke("ui", "--port", str(free_port()))
    assert result.exit_code == 2 and "no MLflow store at" in result.output, result.output
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "mlflow-ui.log").exists()


def test_listening_beyond_loopback_warns_that_every_run_is_readable_and_names_the_host_check(store):
    with socket.socket() as taken:  # the port is taken: the warning comes first, then the error, no server
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("ui", "--host", "0.0.0.0", "--port", str(port))
    assert result.exit_code == 2
    warning, error = result.stderr.splitlines()
    assert warning.startswith(f"Warning: listening on 0.0.0.0:{port}, anyone who can reach it reads every run")
    assert "403 Invalid Host header" in warning and "--allowed-hosts NAME" in warning
    assert error.startswith(f"Error: cannot listen on 0.0.0.0:{port}")


def test_allowed_hosts_reach_mlflows_own_option(store):
    from zar.ui import ui_command

    cmd = ui_command(store, "0.0.0.0", 5000, "runs.example.org")
    assert cmd[cmd.index("--allowed-hosts") + 1] == "runs.example.org" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--allowed-hosts" not in ui_command(store, "127.0.0.1", 5000)


def test_the_latest_studys_links_come_after_the_table_link(in_study):
    """What ``zar ui`` prints under its "Training runs" line, and what ``zar study`` printed."""
    from zar import ui

    said = []
    ui._echo_latest_study("zar", "http://127.0.0.1:5000", said.append)
    experiment_id = MlflowClient().get_run(in_study.parent_id).info.experiment_id
    base = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"
    assert said == [
        f"Latest study (study-2x2, FINISHED): {base}/{in_study.parent_id}?workflowType=machine_learning",
        f"Its curves, by architecture: {base}?workflowType=machine_learning"
        f"&viewStateShareKey=zar-study-{in_study.parent_id}&compareRunsMode=CHART",
    ]
    assert f"Curves:    http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?" in in_study.output
    # The view that link opens: the study's children only, grouped by architecture.
    tags = MlflowClient().get_experiment(experiment_id).tags
    view = json.loads(tags[f"mlflow.sharedViewState.zar-study-{in_study.parent_id}"])
    assert view["searchFilter"] == f"tags.mlflow.parentRunId = '{in_study.parent_id}'"
    assert view["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "model"}]
    assert json.loads(view["state"])["groupBy"] == view["groupBy"]


def test_no_study_no_study_lines(store):
    from zar import ui

    MlflowClient().create_experiment("zar")
    said = []
    ui._echo_latest_study("zar", None, said.append)
    assert said == []
