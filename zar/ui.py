"""``zar ui``: MLflow's UI on the store zar writes to, on loopback, with the link that opens the runs table.

MLflow's own ``mlflow ui`` does the serving; zar only points it at the configured store (the SQLite
file of MLFLOW_TRACKING_URI, or ./mlflow.db), waits until it answers, and prints the link to the
training-runs table (not the GenAI view the UI opens on). When MLFLOW_TRACKING_URI is a tracking
server, that server is the UI already: zar prints its link and starts nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.request import urlopen

from . import tracking
from .errors import UserError
from .tracking import views

START_TIMEOUT_S = 120.0  # the first start migrates the store and builds the app: tens of seconds here


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    host: str,
    port: int,
    experiment: str,
    echo: Callable[[str], None],
    allowed_hosts: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> int:
    """Run the UI until Ctrl-C or SIGTERM; returns the exit code."""
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        tracking.check_reachable()
        echo(f"Runs are on the tracking server {tracking.shown_uri()}, which serves the UI itself:")
        echo(_link(experiment, None))
        _echo_latest_study(experiment, None, echo)
        return 0
    if not uri.startswith("sqlite:"):
        raise UserError(f"zar ui serves a SQLite store; MLFLOW_TRACKING_URI is {tracking.shown_uri()}")
    tracking.check_reachable(create=False)  # no runs here is said now, not by an empty UI
    if host not in LOOPBACK:
        (warn or echo)(exposed_warning(host, port, allowed_hosts))
    _check_port(host, port)
    address = f"http://{host}:{port}"
    cmd = ui_command(uri, host, port, allowed_hosts)
    log_path = tracking.local_folder() / "mlflow-ui.log"
    with open(log_path, "w") as log:  # the server's own chatter; its workers share the session: stopped together
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C: the finally stops the server
    try:
        _wait_until_up(proc, address, log_path)
        echo(f"MLflow UI on {tracking.shown_uri()}, listening on {host}:{port} only (log: {log_path}).")
        echo(f"Training runs: {_link(experiment, address)}")
        _echo_latest_study(experiment, address, echo)
        echo("Ctrl-C stops it.")
        return proc.wait()  # until it ends or a signal stops it
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)


def ui_command(uri: str, host: str, port: int, allowed_hosts: str | None = None) -> list[str]:
    """MLflow's UI on the SQLite store ``uri``, its artifacts beside it, one worker."""
    cmd = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
        "--default-artifact-root", str(tracking.local_folder() / "mlruns"), "--workers", "1",
    ]  # fmt: skip
    return cmd + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])


def exposed_warning(host: str, port: int, allowed_hosts: str | None) -> str:
    """What listening beyond loopback means: every run readable, and MLflow's own check of host names."""
    names = (
        f"browsers may reach it as {allowed_hosts}, localhost or a private IP"
        if allowed_hosts
        else "MLflow answers browsers that reach it by any name but localhost or a private IP with "
        "'403 Invalid Host header': pass --allowed-hosts NAME for those"
    )
    return f"Warning: listening on {host}:{port}, anyone who can reach it reads every run, unauthenticated; {names}."


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _link(experiment: str, base: str | None) -> str:
    """The experiment's training-runs table; the experiments list when it has none yet."""
    try:
        return tracking.runs_url(tracking.get_experiment_id(experiment, create=False), base=base)
    except UserError:
        return f"{base or tracking.ui_address()}/#/experiments?workflowType=machine_learning"


def _echo_latest_study(experiment: str, base: str | None, echo) -> None:
    """The experiment's latest study: its run's page and its runs' curves, grouped by architecture."""
    try:
        experiment_id = tracking.get_experiment_id(experiment, create=False)
    except UserError:
        return
    study = tracking.latest_study(experiment_id)
    if study is None:
        return
    run_id = study.info.run_id
    name = study.data.tags.get(tracking.TAG_RUN_NAME, run_id)
    echo(f"Latest study ({name}, {study.info.status}): {tracking.runs_url(experiment_id, run_id, base=base)}")
    echo(f"Its curves, by architecture: {views.study_runs_url(experiment_id, run_id, base=base)}")


def _check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pass another --port") from None


def _wait_until_up(proc: subprocess.Popen, address: str, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise UserError(
                f"mlflow ui exited with code {proc.returncode} before it answered on {address} (see {log_path})"
            )
        with contextlib.suppress(OSError):
            with urlopen(f"{address}/health", timeout=2) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise UserError(f"mlflow ui did not answer on {address} within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return
