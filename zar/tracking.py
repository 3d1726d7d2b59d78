"""Everything zar says to MLflow: the store, experiments, run lifecycle, params and metrics.

The tracking URI is MLflow's own: ``MLFLOW_TRACKING_URI`` when set, otherwise MLflow's
default (SQLite ``mlflow.db`` in the working folder, artifacts under ``./mlruns``), so
``mlflow ui`` started in the same folder shows the runs with no flags.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sqlite3
import time
import warnings
from functools import wraps
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import psutil
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import OperationalError

from .errors import ZarError
from .store import DEFAULT_EXPERIMENT, probe_server  # noqa: F401  (DEFAULT_EXPERIMENT re-exported)

TAG_MODEL = "zar.model"
TAG_DISPLAY = "zar.display_name"
TAG_FINGERPRINT = "zar.split_fingerprint"
TAG_ERROR = "zar.error"
TAG_CHECKPOINT = "zar.checkpoint"
TAG_PID = "zar.pid"
TAG_HOST = "zar.host"
TAG_PROC_START = "zar.process_start"
TAG_STUDY = "zar.study"
TAG_DEVICE = "zar.device"
FINISHED, FAILED, KILLED, RUNNING = (RunStatus.to_string(s) for s in
                                     (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED, RunStatus.RUNNING))

# MLflow's migrations and start-up chatter is noise on every command.
for _name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.utils.requirements_utils"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def _retry_locked(fn):
    """SQLite allows one writer at a time; parallel ``zar train`` processes wait their turn."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        delay = 0.05
        for attempt in range(60):
            try:
                return fn(*args, **kwargs)
            except (MlflowException, OperationalError, sqlite3.OperationalError) as e:
                if "locked" not in str(e) or attempt == 59:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    return wrapper


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def check_reachable(timeout: float = 5.0) -> None:
    """Make sure the store answers before any work: fail in seconds, not after MLflow's minutes of retries.

    A server must answer HTTP; a new SQLite file is created here, one process at a time,
    because MLflow's table migrations break when several processes create it at once.
    """
    uri = tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        probe_server(uri, timeout)
    elif parsed.scheme == "sqlite":
        db = Path(url2pathname(uri[len("sqlite:///"):])) if uri.startswith("sqlite:///") else None
        if db is None or str(db) in ("", ":memory:"):
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                client().search_experiments(max_results=1)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def client() -> MlflowClient:
    return MlflowClient()


def get_experiment_id(name: str, create: bool = True) -> str:
    c = client()
    exp = _retry_locked(c.get_experiment_by_name)(name)
    if exp is None:
        if not create:
            raise ZarError(f"no MLflow experiment named '{name}' at {tracking_uri()}; pass --experiment NAME")
        try:
            return _retry_locked(c.create_experiment)(name)
        except MlflowException as e:  # another process created it first
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise ZarError(f"cannot create MLflow experiment '{name}': {e.message}") from None
    if exp.lifecycle_stage == "deleted":
        raise ZarError(
            f"MLflow experiment '{name}' is deleted; restore it with "
            f"'mlflow experiments restore --experiment-id {exp.experiment_id}' or pass another --experiment"
        )
    return exp.experiment_id


def process_tags() -> dict[str, str]:
    """Who is running this run: lets ``zar runs --stale`` tell a dead process from a live one."""
    proc = psutil.Process()
    return {TAG_PID: str(proc.pid), TAG_HOST: socket.gethostname(), TAG_PROC_START: f"{proc.create_time():.2f}"}


def process_alive(tags: dict[str, str]) -> bool | None:
    """True/False for a run started on this host; None when it was started elsewhere."""
    if tags.get(TAG_HOST) != socket.gethostname() or TAG_PID not in tags:
        return None
    try:
        proc = psutil.Process(int(tags[TAG_PID]))
        return f"{proc.create_time():.2f}" == tags.get(TAG_PROC_START) and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def start_run(experiment_id: str | None, run_name: str, nested: bool = False, run_id: str | None = None,
              parent_run_id: str | None = None):
    """Start a run, or continue ``run_id``; under ``mlflow run`` (and outside a study) adopt its run.

    ``parent_run_id`` names a parent held by another process (``zar study --jobs``).

    MLflow clears MLFLOW_RUN_ID only when it reads the variable itself; left set, a nested
    child would reopen the adopted run, and a late error would be blamed on an unadopted run.
    """
    if run_id is None and not nested:
        run_id = os.environ.get("MLFLOW_RUN_ID")
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                           run_name=None if run_id else run_name, nested=nested and parent_run_id is None,
                           parent_run_id=parent_run_id)
    if run.info.run_id == os.environ.get("MLFLOW_RUN_ID"):
        del os.environ["MLFLOW_RUN_ID"]
    return run


@_retry_locked
def log_params(run_id: str, params: dict) -> None:
    """Log params, leaving alone those already logged with the same meaning.

    Under ``mlflow run`` MLflow logs the ``-P`` values first, spelled as typed
    (``1e-3``); MLflow refuses to change a param, so equal values are not sent again.
    """
    existing = client().get_run(run_id).data.params
    fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    clashes = [k for k, v in params.items() if k in existing and not _same(existing[k], v)]
    if clashes:
        warnings.warn(f"params already logged with other values kept as they are: {', '.join(clashes)}")
    for i in range(0, len(fresh), 100):
        client().log_batch(run_id, params=fresh[i : i + 100])


def _same(logged: str, value) -> bool:
    if logged == str(value):
        return True
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return False


@_retry_locked
def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


@_retry_locked
def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@_retry_locked
def end_run(run_id: str, status: str, error: str | None = None) -> None:
    """Close a run for good; the fluent stack is cleared too if it holds this run."""
    if error:
        client().set_tag(run_id, TAG_ERROR, error[:5000])
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        client().set_terminated(run_id, status)


def fail_env_run(reason: str) -> None:
    """Under ``mlflow run`` the run exists before zar starts: an early error must still close it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        try:
            end_run(run_id, RunStatus.to_string(RunStatus.FAILED), reason)
        except Exception:  # the original error is what the user needs to see
            pass


def local_artifact_dir(run) -> Path | None:
    parsed = urlparse(run.info.artifact_uri)
    if parsed.scheme in ("", "file"):  # MLflow percent-encodes file URIs: "My%20Drive"
        return Path(url2pathname(parsed.path) if parsed.scheme else run.info.artifact_uri)
    return None


def checkpoint_path(run) -> Path:
    """Next to the run's artifacts when they are local, else in a local cache by run id."""
    base = local_artifact_dir(run)
    if base is None:
        base = Path(os.environ.get("ZAR_CHECKPOINT_DIR", Path.home() / ".cache" / "zar")) / run.info.run_id
    return base / "checkpoints" / "last.pt"


def runs_url(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look in the MLflow UI: its training-runs table, not the GenAI view it opens on."""
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    if run_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
