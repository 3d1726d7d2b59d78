"""``zar sweep``: the same hyperparameter search for every architecture, on Optuna.

One Optuna study per architecture, all over the same space (zar.space) with the same number of
trials, the same seeded sampler (TPE, or a grid) and a median pruner fed each epoch's val_acc.
Each trial trains as a child run of the sweep's parent run, tagged with its trial number and
its Optuna study; a pruned trial ends KILLED (``zar.pruned``), a failed or diverged one FAILED
(a trial the config refuses too, in a run of its own), and the search goes on. The architectures
take turns, a trial each, so an interrupted sweep has spent about the same on each.

The parent run and the Optuna studies are found again by the sweep's key (a hash of its settings
and of the data's content; not of ``--seeds``, which only adds runs at the end): running the same
command again continues where it stopped, on the Optuna storage the parent records and no other.
A trial that was interrupted, or whose worker died, does not count: Optuna runs a new one in its
place, its run is marked replaced and its checkpoint deleted; a trial is never resumed on its own.
A worker is found dead by its process on this machine, or anywhere by Optuna's heartbeat: a
running trial records one every HEARTBEAT_S seconds, and one silent for GRACE_S is failed. Every
other trial is counted once and never run twice.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from . import tracking, training
from .analysis import trials
from .analysis.render import render
from .analysis.table import Table
from .config import ROLE, RUNTIME, ConfigError, TrainConfig
from .errors import Interrupted, Pruned, TrainingFailed, UserError, describe
from .learn.data import data_key, load_data
from .recording import Recorder
from .space import Dim, as_dict, check_method, dims_for, grid, suggest
from .tracking import runs
from .tracking.store import redact

TAG_STORAGE = "zar.optuna_storage"  # on the parent from its creation: the sweep continues on this storage only
TAG_SEEDS = "zar.sweep_seeds"  # the last --seeds: not part of the sweep's key, so a later run may add some
FAILED_ATTR = "zar.failed"  # on an Optuna trial that failed by itself (not interrupted): it counts
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
HEARTBEAT_S = 20  # a running trial's heartbeat, in its Optuna storage, this often ...
GRACE_S = 180  # ... and a trial silent this long is taken for dead: failed, and run again by a live worker
CONTINUE = "run the same 'zar sweep' command again to continue sweep run {run_id}"
TRIAL_GOES = "a new trial takes its place when the sweep goes on"  # what becomes of an interrupted trial

optuna.logging.set_verbosity(optuna.logging.WARNING)  # zar prints each trial itself
# zar asks and tells (each trial is an MLflow run) and records the heartbeat itself, as optimize() would;
# the heartbeat (Optuna 2.9 on) is still called experimental.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(frozen=True)
class SweepSpec:
    """Everything that makes a sweep what it is: the same spec on the same data is the same sweep, continued."""

    models: list[str]
    space: list[Dim]
    trials: int
    cfg: TrainConfig
    method: str = "tpe"
    seeds: list[int] = field(default_factory=list)
    startup_trials: int = 5
    experiment: str = tracking.DEFAULT_EXPERIMENT

    def key(self, data_fingerprint: str) -> str:
        """The search's identity: its settings and the data's content. --seeds retrains the best
        configurations afterwards and is no part of it; where runs train (RUNTIME keys) neither."""
        settings = {
            "models": self.models,
            "space": as_dict(self.space),
            "trials": self.trials,
            "cfg": {k: v for k, v in self.cfg.to_dict().items() if ROLE[k] != RUNTIME},
            "method": self.method,
            "startup_trials": self.startup_trials,
            "data": data_fingerprint,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def study_name(key: str, model: str) -> str:
    return f"zar-sweep-{key}-{model}"


@dataclass
class SweepResult:
    run_id: str
    experiment_id: str
    best: trials.BestTrials | None  # None for a worker that joined another process's sweep
    reruns: Table | None
    failures: list[str]


@dataclass(frozen=True)
class Search:
    """What every trial this process runs shares: the sweep, its studies, and where their runs go."""

    spec: SweepSpec
    cfg: TrainConfig  # resolved: the precision that runs
    storage: optuna.storages.RDBStorage
    studies: dict[str, optuna.Study]
    experiment_id: str  # the parent's, which holds every trial's run
    parent_id: str
    worker: bool  # another process holds the parent: trials name it as their parent run
    data: dict  # data_key -> loaded data, shared by the trials (and added to when a trial needs other data)
    progress: bool
    echo: Callable[[str], None]


def default_storage() -> str:
    """Optuna's storage beside MLflow's: ``optuna.db`` in the SQLite store's folder."""
    return f"sqlite:///{tracking.local_folder() / 'optuna.db'}"


def absolute_storage(url: str) -> str:
    """A SQLite storage by its absolute path: ``sqlite:///optuna.db`` names another file in another folder."""
    prefix = "sqlite:///"
    path = url[len(prefix) :]
    if not url.startswith(prefix) or path in ("", ":memory:") or path.startswith("/"):
        return url
    return prefix + str(Path(path).resolve())


def run_sweep(
    spec: SweepSpec,
    storage: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = training.print_line,
    launcher=None,
) -> SweepResult:
    """Search, then report the best trial per architecture; with ``spec.seeds``, train each best
    configuration again with those seeds and report their mean ± std. A sweep where an architecture
    has no finished trial fails, once its table is out. ``launcher`` (zar.sweep_slurm) runs the
    trials and reruns elsewhere: its ``search(s)`` and ``rerun_best(s, best)`` replace this process's."""
    check_method(spec.method, spec.space, spec.models, spec.trials)
    cfg, _ = training.resolve(spec.cfg)
    url = absolute_storage(storage or default_storage())
    base = load_data(cfg)  # a bad folder fails now; trials share the load
    data = {data_key(cfg): base}
    key = spec.key(base.data_fingerprint)
    tracking.check_reachable()
    _check_storage(spec.experiment, key, url)
    parent, holder = _parent(spec, key, url, echo)
    if holder is not None:
        return _join(_begin(spec, cfg, key, url, parent, True, data, progress, echo), parent, holder, url)
    run_id = parent.info.run_id
    name = f"sweep-{len(spec.models)}x{spec.trials}"
    tags = {
        tracking.TAG_SWEEP: "1",
        tracking.TAG_SWEEP_KEY: key,
        tracking.TAG_RUN_NAME: name,
        TAG_SEEDS: ",".join(map(str, spec.seeds)),
    }
    with runs.closing(run_id, tags, continue_hint=CONTINUE.format(run_id=run_id)):
        s = _begin(spec, cfg, key, url, parent, False, data, progress, echo)
        tracking.log_params(run_id, _params(s, url))
        for study in s.studies.values():  # before close_orphans: a trial Optuna replaces is not a failed one
            _fail_stale(s, study)
        # Runs whose process on this machine died (a --seeds run); not those of another machine's workers.
        runs.close_orphans(run_id, tracking.FAILED, elsewhere_alive=True)
        failures = launcher.search(s) if launcher else _search(s)
        while wait_for_workers(s) and not launcher:  # a dead worker's trial is free again: this process takes it
            failures += _search(s)
        best = trials.fetch_best(spec.experiment, run_id)
        trials.log(run_id, best)
        echo("")
        echo(trials.render(best, "markdown"))
        reruns = None
        if spec.seeds:
            failures += launcher.rerun_best(s, best) if launcher else _rerun_best(s, best)
            reruns = _report_reruns(spec, run_id, echo)
        _check_finished(best, failures)
    return SweepResult(run_id, parent.info.experiment_id, best, reruns, failures)


def _params(s: Search, url: str) -> dict:
    """The parent's params: the config but the searched keys, and the search's settings."""
    spec, searched = s.spec, {d.key for d in s.spec.space}
    params = {k: v for k, v in s.cfg.to_dict().items() if k not in searched}
    params.update(
        models=",".join(spec.models),
        trials=spec.trials,
        method=spec.method,
        sampler_seed=s.cfg.seed,
        startup_trials=spec.startup_trials,
        space=json.dumps(as_dict(spec.space)),
        optuna_storage=redact(url),
        optuna_studies=json.dumps({m: study.study_name for m, study in s.studies.items()}),
    )
    return params


def _check_storage(experiment: str, key: str, url: str) -> None:
    """The same sweep on another Optuna storage would search again from trial 0 beside its first trials."""
    for run in tracking.search_runs(
        tracking.get_experiment_id(experiment), f"tags.`{tracking.TAG_SWEEP_KEY}` = '{key}'"
    ):
        theirs = run.data.tags.get(TAG_STORAGE) or run.data.params.get("optuna_storage")
        if theirs is not None and theirs != redact(url):
            raise UserError(
                f"sweep run {run.info.run_id} keeps its trials in the Optuna storage {theirs}, not {redact(url)}: "
                f"pass --storage {theirs} to continue it"
            )


def _parent(spec: SweepSpec, key: str, url: str, echo):
    """The sweep's parent run and who holds it: (run, None) when this process does (an earlier
    attempt's run, continued, or a new one), (run, holder) when a live process does, here or on
    another machine: this one then joins it as a worker.

    Under ``mlflow run``, the run it made is the parent of this attempt: the trials still continue
    (Optuna's studies are found by the sweep's key), and the best-trial table reads them all.
    """
    name = f"sweep-{len(spec.models)}x{spec.trials}"
    found = runs.find_or_start_parent(spec.experiment, name, tracking.TAG_SWEEP_KEY, key, {TAG_STORAGE: redact(url)})
    if found.was is not None:
        echo(f"Continuing sweep run {found.run.info.run_id} ({found.was.lower()} before)")
    return found.run, found.holder


def _begin(spec: SweepSpec, cfg: TrainConfig, key: str, url: str, parent, worker: bool, data, progress, echo) -> Search:
    """This process's part of the sweep: the Optuna storage (with its heartbeat) and each architecture's study."""
    experiment_id = parent.info.experiment_id
    try:
        storage = optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=lambda study, trial: _taken_for_dead(experiment_id, study, trial),
        )
        studies = {m: _study(spec, storage, key, m) for m in spec.models}
        for study in studies.values():
            _link(study, parent, key)
    except Exception as e:
        raise UserError(f"cannot open the Optuna storage {redact(url)}: {describe(e)}") from None
    return Search(spec, cfg, storage, studies, experiment_id, parent.info.run_id, worker, data, progress, echo)


def _join(s: Search, parent, holder: str, url: str) -> SweepResult:
    """Take trials of the sweep another process holds, until none is left; that process reports."""
    host = parent.data.tags.get(tracking.TAG_HOST)
    if url.startswith("sqlite:") and host not in (None, socket.gethostname()):
        raise UserError(
            f"sweep run {s.parent_id} runs on {host} with a SQLite Optuna storage, a file there: workers on other "
            "machines share a sweep through --storage postgresql://... given to every one of them"
        )
    s.echo(f"Joining sweep run {s.parent_id} as a worker; {holder} holds it and reports the tables")
    failures = _search(s)
    s.echo(f"No trial left to take: {holder} reports the tables once every trial has ended.")
    return SweepResult(s.parent_id, s.experiment_id, None, None, failures)


def _check_finished(best: trials.BestTrials, failures: list[str]) -> None:
    """An architecture without a finished trial has no best configuration: the sweep did not do its job."""
    empty = [r for r in best.rows if r.trial is None]
    if empty:
        counts = "; ".join(f"{r.name}: {r.pruned} pruned, {r.failed} failed" for r in empty)
        first = f"; first failure: {failures[0]}" if failures else ""
        raise TrainingFailed(f"no trial of {', '.join(r.name for r in empty)} finished ({counts}){first}")


# --- the studies and their trials ----------------------------------------------------------------------


def _study(spec: SweepSpec, storage: optuna.storages.RDBStorage, key: str, model: str) -> optuna.Study:
    # A grid's points are enqueued one at a time (_next_trial), so the sampler never picks one.
    if spec.method == "grid":
        sampler = optuna.samplers.RandomSampler(seed=spec.cfg.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.cfg.seed)
    return optuna.create_study(
        storage=storage,
        study_name=study_name(key, model),
        direction="maximize",
        sampler=sampler,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials),
        load_if_exists=True,
    )


def _link(study: optuna.Study, parent, key: str) -> None:
    """optuna-dashboard's view: the objective's name, and the sweep run (``optuna_studies`` names each study)."""
    study.set_metric_names(["val_acc"])
    experiment_id, run_id = parent.info.experiment_id, parent.info.run_id
    links = {"mlflow_experiment": tracking.experiment_name(experiment_id), "mlflow_experiment_id": experiment_id}
    links |= {"mlflow_run_id": run_id, "mlflow_run_url": tracking.runs_url(experiment_id, run_id), "zar_sweep_key": key}
    for name, value in links.items():
        if study.user_attrs.get(name) != value:  # a continued sweep's later run is linked instead
            study.set_user_attr(name, value)


def _taken_for_dead(experiment_id: str, study: optuna.Study, trial) -> None:
    """Optuna's heartbeat failed ``trial`` (fail_stale_trials): its run ends FAILED, saying why."""
    reason = f"no heartbeat from its worker ({_worker(trial)}) for {GRACE_S} s"
    _retire(experiment_id, study.study_name, trial.number, reason)


def _worker(trial) -> str:
    return f"pid {trial.user_attrs.get(tracking.TAG_PID, '?')} on {trial.user_attrs.get(tracking.TAG_HOST, '?')}"


def counts(trial) -> bool:
    """Whether a trial takes one of the sweep's places: all but those interrupted, stale or surplus."""
    return trial.state in COUNTED or (trial.state == TrialState.FAIL and FAILED_ATTR in trial.user_attrs)


def _fail_stale(s: Search, study: optuna.Study) -> None:
    """A RUNNING trial whose worker is gone will never end: it stops counting (a new trial takes its
    place) and its run ends FAILED, saying why. Gone: its process on this machine ended, or (Optuna's
    heartbeat) it has been silent for GRACE_S, or it never recorded a process at all."""
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if runs.process_alive(attrs) is False:
            why = f"its process (pid {attrs[tracking.TAG_PID]}) ended without closing the trial"
        elif tracking.TAG_PID not in attrs and t.datetime_start and (now - t.datetime_start).total_seconds() > GRACE_S:
            why = "stopped between Optuna creating it and recording its process"  # Ctrl-C or kill -9 right after ask()
        else:
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        _retire(s.experiment_id, study.study_name, t.number, why)
    optuna.storages.fail_stale_trials(study)  # the heartbeat: runs taken_for_dead on each it fails


def _trial_runs(experiment_id: str, study: str, number: int) -> list:
    return tracking.search_runs(
        experiment_id, f"tags.`{tracking.TAG_OPTUNA_STUDY}` = '{study}' and tags.`{tracking.TAG_TRIAL}` = '{number}'"
    )


def _retire(experiment_id: str, study: str, number: int, reason: str | None = None) -> None:
    """The runs of a trial Optuna runs again in another's place: nothing resumes them, so their
    checkpoints go. With a ``reason`` (its worker died, or was taken for dead), each is marked
    replaced, so that the tables count it neither finished nor failed, and a running one ends FAILED."""
    for run in _trial_runs(experiment_id, study, number):
        if reason is not None:
            tracking.set_tags(run.info.run_id, {trials.TAG_REPLACED: reason})
            if run.info.status == tracking.RUNNING:
                runs.end(run.info.run_id, tracking.FAILED, reason)
        Recorder.of(run).drop_checkpoint()


def _trial_id(storage: optuna.storages.RDBStorage, study: optuna.Study, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def _next_trial(study: optuna.Study, n: int, points: list[dict] | None = None, storage=None):
    """The next trial of ``study``, or None once ``n`` trials are taken (by this or another process).

    The trial records its first heartbeat in ``storage`` (when given) and this process at once: a
    trial with neither is one whose process stopped right after asking, and ``_fail_stale`` fails it.

    ``points``: a grid, in the order to try it; the next point no counted trial holds is enqueued
    (Optuna's ``enqueue_trial``) and the trial takes it. An interrupted trial's point is free again.
    GridSampler is not used: it counts an interrupted trial's point as visited, and stops the
    study from inside ``tell``.
    """
    while True:
        counted = [t for t in study.get_trials(deepcopy=False) if counts(t)]
        if len(counted) >= n:
            return None
        if points is not None:
            taken = [_point(t) for t in counted]
            study.enqueue_trial(next(p for p in points if p not in taken))
        trial = study.ask()
        try:
            if storage is not None:
                storage.record_heartbeat(_trial_id(storage, study, trial.number))
            for key, value in runs.process_tags().items():
                trial.set_user_attr(key, value)
            ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts(t)]
            if len(ahead) >= n:  # another process took the last place meanwhile
                study.tell(trial, state=TrialState.FAIL)
                return None
            mine = study.get_trials(deepcopy=False)[trial.number]
            if points is not None and any(_point(t) == _point(mine) for t in ahead):
                study.tell(trial, state=TrialState.FAIL)  # another process took this point meanwhile
                continue
        except BaseException:  # Ctrl-C: a trial left RUNNING here would hold a place until GRACE_S had passed
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        return trial


def _point(trial) -> dict:
    """A grid trial's point: its enqueued values (before it suggests them, its params are still empty)."""
    return trial.system_attrs.get("fixed_params") or trial.params


def grid_points(space: list[Dim], seed: int) -> list[dict]:
    """Every point of the grid, in an order shuffled by ``seed``: any prefix is a fair sample."""
    keys, values = zip(*grid(space).items()) if space else ((), ())
    points = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    random.Random(seed).shuffle(points)
    return points


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, study: optuna.Study, trial):
    """Optuna's heartbeat for ``trial`` every HEARTBEAT_S while it runs, from a thread: an epoch may
    last longer than any grace period, and a worker that lives must never be taken for dead."""
    trial_id, stop = _trial_id(storage, study, trial.number), threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a store busy for a moment: the next beat comes soon
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name="zar-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _search(s: Search) -> list[str]:
    """The architectures in turn, a trial each, until each has its ``spec.trials``."""
    failures = []
    while True:
        ran = False
        for model, study in s.studies.items():
            _fail_stale(s, study)  # a dead worker's place is free again, for this process to take
            points = grid_points(dims_for(s.spec.space, model), s.cfg.seed) if s.spec.method == "grid" else None
            trial = _next_trial(study, s.spec.trials, points, s.storage)
            if trial is None:
                continue
            ran = True
            with _heartbeat(s.storage, study, trial):
                failure = _run_trial(s, model, study, trial)
            if failure:
                failures.append(failure)
        if not ran:
            return failures


def wait_for_workers(s: Search, poll_s: float = 2.0) -> bool:
    """Until no trial is RUNNING (the best trial is chosen from all of them); whether there was one."""
    waited = False
    while True:
        for study in s.studies.values():
            _fail_stale(s, study)
        running = [
            t for study in s.studies.values() for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        ]
        if not running:
            return waited
        if not waited:
            where = sorted({_worker(t) for t in running})
            s.echo(
                f"Waiting for {len(running)} trial(s) that other workers are running ({'; '.join(where)}); a worker "
                f"that died is found by its process here, or anywhere after {GRACE_S} s without a heartbeat, and its "
                "trial is run again"
            )
        waited = True
        time.sleep(poll_s)


def _run_trial(s: Search, model: str, study: optuna.Study, trial) -> str | None:
    label = f"{model} trial {trial.number}"
    values = suggest(trial, dims_for(s.spec.space, model))
    s.echo(f"{label} of {s.spec.trials}: " + ", ".join(f"{k}={trials.show(v)}" for k, v in values.items()))
    tags = {
        tracking.TAG_TRIAL: str(trial.number),
        tracking.TAG_OPTUNA_STUDY: study.study_name,
        tracking.TAG_RUN_NAME: f"{model}-trial{trial.number}",
    }

    def fail(reason: str) -> str:
        if not _trial_runs(s.experiment_id, study.study_name, trial.number):  # refused before its run existed
            _refused_run(s, model, {**tags, tracking.TAG_MODEL: model}, values, reason)
        _tell(s, study, trial, state=TrialState.FAIL, attrs={FAILED_ATTR: reason})
        s.echo(f"{label} failed: {reason}")
        return f"{label}: {reason}"

    try:
        trial_cfg = s.cfg.replace(**values)
    except ConfigError as e:
        return fail(str(e))

    def report(result) -> None:
        trial.report(result.val_acc, result.epoch)
        if trial.should_prune():
            raise Pruned(result.epoch, result.val_acc)

    hint = TRIAL_GOES + (f"; {CONTINUE.format(run_id=s.parent_id)}" if s.worker else "")  # a holder's parent says it
    try:
        result = training.train(
            model, trial_cfg, s.spec.experiment, s.progress, _prefixed(s.echo, label), _data(s.data, trial_cfg),
            parent_run_id=s.parent_id if s.worker else None, tags=tags, on_epoch=report, continue_hint=hint,
        )  # fmt: skip
    except Pruned as e:
        _tell(s, study, trial, state=TrialState.PRUNED)
        s.echo(f"{label} {e}")
        return None
    except (Interrupted, KeyboardInterrupt):
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)  # not counted: a new trial takes its place
        _retire(s.experiment_id, study.study_name, trial.number)
        raise
    except Exception as e:  # its run is FAILED already; the search goes on
        return fail(describe(e))
    _tell(s, study, trial, result.history[-1].val_acc, attrs={"mlflow_run_id": result.run_id})
    return None


def _tell(s: Search, study: optuna.Study, trial, value: float | None = None, state=None, attrs=None) -> None:
    """How the trial ended, told to Optuna. A trial another worker took for dead meanwhile (silent for
    GRACE_S: this process was suspended) has been run again in its place: its run does not count."""
    if all(t.number != trial.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        _retire(
            s.experiment_id, study.study_name, trial.number, f"taken for dead after {GRACE_S} s without a heartbeat"
        )
        return
    with contextlib.suppress(UpdateFinishedTrialError):  # taken for dead since the line above: nothing to tell
        for key, text in (attrs or {}).items():
            trial.set_user_attr(key, text)
        study.tell(trial, value, state=state, skip_if_finished=True)


def _refused_run(s: Search, model: str, tags: dict[str, str], values: dict, reason: str) -> None:
    """A FAILED run for a trial refused before training (a config check): the counts see it, with its reason."""
    run = runs.start(s.spec.experiment, tags[tracking.TAG_RUN_NAME], s.parent_id if s.worker else None, tags=tags)
    tracking.log_params(run.info.run_id, {**values, "model": model})
    runs.end(run.info.run_id, tracking.FAILED, reason)


def _data(data: dict, cfg: TrainConfig):
    key = data_key(cfg)
    if key not in data:
        data[key] = load_data(cfg)
    return data[key]


def _prefixed(echo, label: str):
    return lambda line: echo(f"[{label}] {line}")


def _rerun_best(s: Search, best: trials.BestTrials) -> list[str]:
    """Each architecture's best configuration, once per seed, as children of the parent (done ones skipped)."""
    failures = []
    for row in best.rows:
        if row.trial is None:
            continue  # no trial of this architecture finished
        study = s.studies[row.model]
        values = study.trials[row.trial].params  # Optuna's exact values, not the table's rounded ones
        rerun_of = f"{study.study_name}/{row.trial}"
        done = trials.seeds_rerun(best.parent_run_id, rerun_of)
        for seed in s.spec.seeds:
            if str(seed) in done:
                continue
            label = f"{row.model} best (trial {row.trial}) seed {seed}"
            tags = {tracking.TAG_RERUN_OF: rerun_of, tracking.TAG_RUN_NAME: f"{row.model}-best-seed{seed}"}
            cfg = s.cfg.replace(**values, seed=seed)
            try:
                training.train(
                    row.model, cfg, s.spec.experiment, s.progress, _prefixed(s.echo, label), _data(s.data, cfg),
                    tags=tags, continue_hint=f"the sweep trains seed {seed} again when it goes on",
                )  # fmt: skip
            except Interrupted:
                for run in tracking.children(best.parent_run_id, status=tracking.KILLED):  # nothing resumes it
                    if run.data.tags.get(tracking.TAG_RERUN_OF) == rerun_of:
                        Recorder.of(run).drop_checkpoint()
                raise
            except Exception as e:
                failures.append(f"{label}: {describe(e)}")
                s.echo(f"{label} failed: {describe(e)}")
    return failures


def _report_reruns(spec: SweepSpec, run_id: str, echo) -> Table | None:
    """The --seeds runs' table, each architecture at its own best configuration, kept in the parent."""
    table = trials.rerun_table(spec.experiment, run_id)
    if table is None:
        return None
    markdown = render(table, "markdown")
    tracking.log_text(run_id, markdown + "\n", "best_configs_seeds.md")
    tracking.log_text(run_id, render(table, "csv"), "best_configs_seeds.csv")
    echo("")
    echo(markdown)
    return table
