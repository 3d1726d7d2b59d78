"""Every call zar makes to MLflow, read as ``zar.tracking.X`` everywhere outside this package.

The store, experiments, runs (started, searched, closed), params, metrics, tags, datasets,
artifacts and the model; MLflow's tag names and run states as constants. When a run starts and
how it ends is zar.tracking.runs' business; this module only carries out the calls.

The tracking URI is MLflow's own: ``MLFLOW_TRACKING_URI`` when set, otherwise MLflow's
default (SQLite ``mlflow.db`` in the working folder, artifacts under ``./mlruns``), so
``mlflow ui`` started in the same folder shows the runs with no flags.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from functools import wraps
from pathlib import Path
from urllib.parse import quote, urlparse
from urllib.request import url2pathname

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import OperationalError

from ..errors import UserError, clip
from .store import DEFAULT_EXPERIMENT, probe_server, redact, redact_text, without_credentials  # noqa: F401  (re-exported)

TAG_MODEL = "zar.model"
TAG_DISPLAY = "zar.display_name"
TAG_FINGERPRINT = "zar.split_fingerprint"  # the validation set's sample ids and labels
TAG_DATA_FINGERPRINT = "zar.data_fingerprint"  # the content of both splits, class names and image size
TAG_ERROR = "zar.error"
TAG_CHECKPOINT = "zar.checkpoint"
TAG_PID = "zar.pid"
TAG_HOST = "zar.host"
TAG_PROC_START = "zar.process_start"
TAG_SLURM_JOB = "zar.slurm_job"  # the Slurm job that trains the run, where one does
TAG_STUDY = "zar.study"
TAG_STUDY_KEY = "zar.study_key"  # the study's settings, data and code, hashed: the same command again continues it
TAG_STUDY_SPEC = "zar.study_spec"  # those settings as JSON: what 'zar study --resume' runs again
TAG_DEVICE = "zar.device"
TAG_DIVERGED = "zar.diverged_at"
TAG_COMPARE = "zar.compare"
TAG_BENCH = "zar.bench"  # "1" on a zar bench run: measurements of an architecture, never a training run
TAG_SWEEP = "zar.sweep"  # "1" on a zar sweep's parent run
TAG_SWEEP_KEY = "zar.sweep_key"  # the sweep's settings, hashed: a rerun of the same command finds its parent
TAG_TRIAL = "zar.trial"  # a sweep trial's number in its Optuna study
TAG_OPTUNA_STUDY = "zar.optuna_study"
TAG_PRUNED = "zar.pruned"  # "epoch N": the pruner stopped the trial after epoch N (the run is KILLED)
TAG_RERUN_OF = "zar.rerun_of"  # a sweep's --seeds run: the trial number whose config it trains again
TAG_RUN_NAME = "mlflow.runName"
TAG_PARENT = "mlflow.parentRunId"
FINISHED, FAILED, KILLED, RUNNING = (
    RunStatus.to_string(s) for s in (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED, RunStatus.RUNNING)
)

# Training runs on this machine last minutes, some seconds: sample often enough to show them.
SYSTEM_METRICS_INTERVAL_S = 2
mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
mlflow.set_system_metrics_samples_before_logging(1)
# MLflow's own "View run ... at: URI" lines print the tracking URI as given, password and all, and
# open the GenAI view; zar prints its own links (redacted, to the training runs table) instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

# MLflow's migrations and start-up chatter is noise on every command.
for _name in (
    "alembic",
    "mlflow.store.db.utils",
    "mlflow.tracking.fluent",
    "mlflow.utils.requirements_utils",
    "mlflow.system_metrics",
):
    logging.getLogger(_name).setLevel(logging.WARNING)


def retry_locked(fn):
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


def shown_uri() -> str:
    """The tracking URI as messages show it: never its password."""
    return redact(tracking_uri())


def check_reachable(timeout: float = 5.0, create: bool = True) -> None:
    """Make sure the store answers before any work: fail in seconds, not after MLflow's minutes of retries.

    A server must answer HTTP; a new SQLite file is created here, one process at a time,
    because MLflow's table migrations break when several processes create it at once.
    ``create=False`` (commands that only read) refuses a SQLite file that does not exist
    rather than leave an empty store behind.
    """
    uri = tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        probe_server(uri, timeout)
    elif parsed.scheme == "sqlite":
        db = Path(url2pathname(uri[len("sqlite:///") :])) if uri.startswith("sqlite:///") else None
        if db is None or str(db) in ("", ":memory:"):
            return
        if not create and not db.exists():
            raise UserError(f"no runs here: there is no MLflow store at {db} (set MLFLOW_TRACKING_URI to read another)")
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                mlflow_client().search_experiments(max_results=1)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def local_folder() -> Path:
    """The folder of the SQLite store, where zar keeps its own files beside it; the working folder otherwise."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and uri[len("sqlite:///") :] not in ("", ":memory:"):
        return Path(url2pathname(uri[len("sqlite:///") :])).resolve().parent
    return Path.cwd()


def mlflow_client() -> MlflowClient:
    return MlflowClient()


def active_run():
    """The run this process has open through MLflow's fluent API, or None."""
    return mlflow.active_run()


def get_run(run_id: str):
    try:
        return mlflow_client().get_run(run_id)
    except MlflowException:
        raise UserError(f"no MLflow run with id {clip(repr(run_id))} at {shown_uri()}") from None


def experiment_name(experiment_id: str) -> str:
    return mlflow_client().get_experiment(experiment_id).name


def get_experiment_id(name: str, create: bool = True) -> str:
    c = mlflow_client()
    exp = retry_locked(c.get_experiment_by_name)(name)
    if exp is None:
        if not create:
            raise UserError(f"no MLflow experiment named {clip(repr(name))} at {shown_uri()}; pass --experiment NAME")
        try:
            return retry_locked(c.create_experiment)(name)
        except MlflowException as e:  # another process created it first
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise UserError(f"cannot create MLflow experiment '{name}': {e.message}") from None
    if exp.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment '{name}' is deleted; restore it with "
            f"'mlflow experiments restore --experiment-id {exp.experiment_id}' or pass another --experiment"
        )
    return exp.experiment_id


def start_run(
    experiment_id: str | None,
    run_name: str,
    nested: bool = False,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool = False,
):
    """Start a run, or continue ``run_id`` (a stopped run, or the one ``mlflow run`` made).

    ``system_metrics``: MLflow samples CPU, memory (and GPU where pynvml finds one) while the run is open.

    ``parent_run_id`` names a parent held by another process (``zar study --jobs``). ``tags`` are
    set as the run is created or reopened, in the same call.
    """
    return mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else run_name,
        nested=nested and parent_run_id is None,
        parent_run_id=parent_run_id,
        tags=tags,
        log_system_metrics=system_metrics,
    )


@retry_locked
def log_params(run_id: str, params: dict) -> None:
    """Log params, leaving alone those already logged with the same meaning.

    Under ``mlflow run`` MLflow logs the ``-P`` values first, spelled as typed
    (``1e-3``); MLflow refuses to change a param, so equal values are not sent again.
    """
    existing = mlflow_client().get_run(run_id).data.params
    fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    clashes = [k for k, v in params.items() if k in existing and not _same(existing[k], v)]
    if clashes:
        warnings.warn(f"params already logged with other values kept as they are: {', '.join(clashes)}", stacklevel=2)
    for i in range(0, len(fresh), 100):
        mlflow_client().log_batch(run_id, params=fresh[i : i + 100])


def _same(logged: str, value) -> bool:
    if logged in ("", str(value)):  # "": an MLproject default that leaves the value to zar
        return True
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return False


@retry_locked
def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    ts = int(time.time() * 1000)
    mlflow_client().log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


@retry_locked
def set_tags(run_id: str, tags: dict[str, str]) -> None:
    mlflow_client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@retry_locked
def end_run(run_id: str, status: str, error: str | None = None) -> None:
    """Close a run for good; the fluent stack is cleared too if it holds this run."""
    if error:  # a library's message may hold a URL with its password (an Optuna storage's, a server's)
        mlflow_client().set_tag(run_id, TAG_ERROR, redact_text(error)[:5000])
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        mlflow_client().set_terminated(run_id, status)


def delete_run(run_id: str) -> None:
    """Move the run to MLflow's trash (``mlflow gc`` removes it for good); searches no longer find it."""
    mlflow_client().delete_run(run_id)


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


def ui_address() -> str:
    """Where the MLflow UI of this store is: the tracking server, or ``mlflow ui``'s default address."""
    uri = tracking_uri()
    return without_credentials(uri).rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"


def runs_url(experiment_id: str, run_id: str | None = None, base: str | None = None) -> str:
    """Where to look in the MLflow UI (at ``base``, default ``ui_address()``): its training-runs table
    (with zar's columns, once ``share_study_view`` saved them), or one run's page, not the GenAI
    view the UI opens on."""
    base = (base or ui_address()).rstrip("/")
    view = "?workflowType=machine_learning"  # without it a run's page shows the GenAI side bar
    if run_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{view}"
    # Any other table setting in the link (a filter, a sort) would make the UI ignore the saved view.
    return f"{base}/#/experiments/{experiment_id}/runs{view}&viewStateShareKey={STUDY_VIEW_KEY}"


def model_version_url(name: str, version: str) -> str:
    """A registered model version's page in the MLflow UI."""
    return f"{ui_address()}/#/models/{quote(name, safe='')}/versions/{version}"


def register_model(run_id: str, artifact: str, name: str, tags: dict[str, str], description: str) -> str:
    """The run's logged model ``artifact`` as a new version of registered model ``name`` (made if new); its version.

    ``mlflow.register_model`` also records the version on the logged model, so the model's page
    in the UI links to it. MLflow's own lines about it go unprinted: zar says what it registered.
    """
    run = get_run(run_id)
    found = mlflow_client().search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{artifact}'"
    )
    if not found:
        raise UserError(f"run {run_id} has no logged model {artifact!r} to register (it did not finish training)")
    model = max(found, key=lambda m: m.creation_timestamp)
    with contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
    mlflow_client().update_model_version(name, version.version, description=description)
    return str(version.version)


# MLflow's UI opens a runs-table view saved as the experiment tag mlflow.sharedViewState.<key> when
# its link names the key (zar.tracking.views saves zar's).
STUDY_VIEW_KEY = "zar"


# --- reading runs back ---------------------------------------------------------------------------


def search_runs(experiment_id: str, filter_string: str = "", user_filter: str | None = None) -> list:
    """Every active run of the experiment that matches, page by page.

    ``user_filter`` is the part of ``filter_string`` the user typed: when MLflow cannot parse
    it, that is a user mistake, said in one line.
    """
    runs, token = [], None
    while True:
        try:
            page = mlflow_client().search_runs(
                [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
            )
        except MlflowException as e:
            if not user_filter or e.error_code != "INVALID_PARAMETER_VALUE":
                raise
            # MLflow's parse errors are long; their first line says what is wrong.
            raise UserError(f"bad --filter {user_filter!r}: {e.message.splitlines()[0]}") from None
        runs += page
        token = page.token
        if not token:
            return runs


def latest_study(experiment_id: str):
    """The experiment's most recently started study run, or None."""
    found = mlflow_client().search_runs(
        [experiment_id], f"tags.`{TAG_STUDY}` = '1'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return found[0] if found else None


def latest_runs(experiment_id: str, page_size: int = 1000) -> Iterator:
    """Every run of the experiment, newest first, fetched a page at a time."""
    token = None
    while True:
        page = mlflow_client().search_runs(
            [experiment_id], order_by=["attributes.start_time DESC"], max_results=page_size, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def children_filter(parent_run_id: str) -> str:
    return f"tags.`{TAG_PARENT}` = '{parent_run_id}'"


def children(parent_run_id: str, status: str | None = None) -> list:
    """The child runs of ``parent_run_id``, in its experiment; only those in ``status`` when given."""
    parent = mlflow_client().get_run(parent_run_id)
    where = children_filter(parent_run_id) + (f" and attributes.status = '{status}'" if status else "")
    return mlflow_client().search_runs([parent.info.experiment_id], where)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of ``key``, by step."""
    return sorted((m.step, m.value) for m in mlflow_client().get_metric_history(run_id, key))


@retry_locked
def delete_tag(run_id: str, key: str) -> None:
    mlflow_client().delete_tag(run_id, key)


# --- what a run keeps: datasets, files, the model ---------------------------------------------------


def log_datasets(source: str, from_code: bool, splits: list[tuple[str, str, list[str], list[str]]]) -> None:
    """Each split, (context, name, sample ids, labels), as a dataset of the active run.

    A table of sample ids and labels: its digest identifies the split. ``from_code``: the data
    is made by the loader named ``source`` (the digits, synthetic data), not read from a path.
    """
    for context, name, ids, labels in splits:
        df = pd.DataFrame({"id": ids, "label": labels})
        mlflow.log_input(
            mlflow.data.from_pandas(df, source=_dataset_source(source, from_code), name=name), context=context
        )


def _dataset_source(source: str, from_code: bool):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if from_code:
        return CodeDatasetSource({"loader": source})
    with warnings.catch_warnings():  # MLflow warns that a local path fits two equal source types
        warnings.simplefilter("ignore")
        return resolve_dataset_source(source)


def log_artifacts(run_id: str, folder: str | Path) -> None:
    """Every file in ``folder``, at the top of the run's artifacts."""
    mlflow_client().log_artifacts(run_id, str(folder))


def log_artifacts_file(run_id: str, path: str | Path) -> None:
    """One file, at the top of the run's artifacts."""
    mlflow_client().log_artifact(run_id, str(path))


def read_artifact(run_id: str, path: str) -> bytes | None:
    """An artifact's bytes (read in place from a local store, else downloaded to a temporary folder),
    or None if the run has none there."""
    folder = local_artifact_dir(mlflow_client().get_run(run_id))
    if folder is not None:
        file = folder / path
        return file.read_bytes() if file.is_file() else None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow_client().download_artifacts(run_id, path, tmp)
        except Exception:  # MLflow raises its own, OSError or a server error for a missing artifact
            return None
        return Path(local).read_bytes()


def log_text(run_id: str, text: str, name: str) -> None:
    mlflow_client().log_text(run_id, text, name)


def warm_up_model_logging() -> None:
    """Start, in the background, the imports and scans that ``log_model`` will need.

    In a fresh process ``mlflow.pytorch.log_model`` spent about 6 s importing torch's exporter
    and mapping every installed package to its modules before writing a byte. Done while the
    first epoch trains, that time is no longer added after the last one.
    """
    threading.Thread(target=_warm_up, name="zar-warm-up", daemon=True).start()


def _warm_up() -> None:
    with contextlib.suppress(Exception):  # only a head start: log_model does all of it anyway
        import torch._dynamo  # noqa: F401  (torch.export's tracer, which the pt2 format uses)
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def log_model(
    classifier, name: str, step: int, input_example, pip_requirements: list[str], classes: list[str], metadata: dict
) -> str:
    """The classifier (zar.learn.served_model), as every MLflow client loads it without zar, in the active run; its id.

    One model, two flavours: ``pytorch`` is the ``torch.export``ed program (images in, class
    probabilities out) that ``mlflow.pytorch.load_model`` returns; ``python_function`` is that
    program behind served_model.py, copied into the model (``code_paths``), so that
    ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and the registry answer with class names.
    ``step``: the epoch the weights are from; MLflow links that step's metrics to the model.
    ``validate_serving_input=False``: MLflow would load the saved model back and run the example
    through it (2.5 s a run); zar's tests load a logged model and predict with it instead.
    """
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from ..learn import served_model

    signature = ModelSignature(
        inputs=Schema([TensorSpec(input_example.dtype, (-1, *input_example.shape[1:]))]),
        outputs=Schema(
            [ColSpec("string", served_model.label_column(classes))] + [ColSpec("float", c) for c in classes]
        ),
    )
    with warnings.catch_warnings():
        # torch's pt2 archive warns about CPU weights it expects on another device: these are CPU weights.
        warnings.filterwarnings("ignore", "No complete tensor found", UserWarning)
        info = _log(Model, name, classifier, classes, step, metadata, signature, input_example, pip_requirements)
    return info.model_id


def _log(Model, name, classifier, classes, step, metadata, signature, input_example, pip_requirements):
    from ..learn import served_model

    return Model.log(
        None,  # artifact_path: deprecated for name
        name=name,
        flavor=_Classifier(classes),
        flavor_name="mlflow.pytorch",
        step=step,
        metadata=metadata,
        pytorch_model=classifier,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        serialization_format="pt2",
        code_paths=[served_model.__file__],
        validate_serving_input=False,
    )


class _Classifier:
    """A flavour for ``Model.log``: MLflow's pytorch flavour, its pyfunc loaded by served_model.py."""

    def __init__(self, classes: list[str]):
        self.classes = classes

    def save_model(self, path: str, mlflow_model, **kwargs) -> None:
        from ..learn import served_model

        kwargs.pop("validate_serving_input", None)  # Model.log's, not the flavour's
        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        pyfunc = mlflow_model.flavors["python_function"]
        (Path(path) / pyfunc["data"] / served_model.CLASSES).write_text(json.dumps(self.classes))
        pyfunc["loader_module"] = Path(served_model.__file__).stem
        for key in ("config", "pickle_module_name"):  # the pytorch loader's; served_model's takes none
            pyfunc.pop(key, None)
        mlflow_model.save(str(Path(path) / "MLmodel"))
