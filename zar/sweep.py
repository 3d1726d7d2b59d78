"""``zar sweep``: the same hyperparameter search for every architecture, on Optuna.

One Optuna study per architecture, all over the same space (zar.space) with the same number of
trials, the same seeded sampler (TPE, or a grid) and a median pruner fed each epoch's val_acc.
Each trial trains as a child run of the sweep's parent run, tagged with its trial number and
its Optuna study; a pruned trial ends KILLED (``zar.pruned``), a failed or diverged one FAILED,
and the search goes on. The architectures take turns, a trial each, so an interrupted sweep has
spent about the same on each.

The Optuna storage (a SQLite file beside MLflow's by default) and the parent run are both found
again by the sweep's key (a hash of its settings): running the same command again continues where
it stopped. A trial that was interrupted, or whose process died, does not count and is run anew;
every other trial is counted once and never run twice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from . import tracking, training
from .analysis import trials
from .analysis.render import render
from .analysis.table import Table
from .config import ROLE, RUNTIME, ConfigError, TrainConfig
from .errors import Interrupted, Pruned, UserError, describe
from .learn.data import data_key, load_data
from .space import Dim, as_dict, check_method, dims_for, grid, suggest
from .tracking import runs
from .tracking.store import redact

TAG_STORAGE = "zar.optuna_storage"  # on the parent from its creation: a worker joins only the same storage
FAILED_ATTR = "zar.failed"  # on an Optuna trial that failed by itself (not interrupted): it counts
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)

optuna.logging.set_verbosity(optuna.logging.WARNING)  # zar prints each trial itself


@dataclass(frozen=True)
class SweepSpec:
    """Everything that makes a sweep what it is: the same spec is the same sweep, continued."""

    models: list[str]
    space: list[Dim]
    trials: int
    cfg: TrainConfig
    method: str = "tpe"
    seeds: list[int] = field(default_factory=list)
    startup_trials: int = 5
    experiment: str = tracking.DEFAULT_EXPERIMENT

    @property
    def key(self) -> str:
        settings = {
            "models": self.models,
            "space": as_dict(self.space),
            "trials": self.trials,
            "cfg": {k: v for k, v in self.cfg.to_dict().items() if ROLE[k] != RUNTIME},  # where, not what
            "method": self.method,
            "seeds": self.seeds,
            "startup_trials": self.startup_trials,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def study_name(self, model: str) -> str:
        return f"zar-sweep-{self.key}-{model}"


@dataclass
class SweepResult:
    run_id: str
    experiment_id: str
    best: trials.BestTrials | None  # None for a worker that joined another process's sweep
    reruns: Table | None
    failures: list[str]


def default_storage() -> str:
    """Optuna's storage beside MLflow's: ``optuna.db`` in the SQLite store's folder."""
    return f"sqlite:///{tracking.local_folder() / 'optuna.db'}"


def run_sweep(
    spec: SweepSpec,
    storage: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = training.print_line,
) -> SweepResult:
    """Search, then report the best trial per architecture; with ``spec.seeds``, train each best
    configuration again with those seeds and report their mean ± std."""
    check_method(spec.method, spec.space, spec.models, spec.trials)
    cfg, _ = training.resolve(spec.cfg)
    storage = storage or default_storage()
    data = {data_key(cfg): load_data(cfg)}  # a bad folder fails now; trials share the load
    tracking.check_reachable()
    parent, holder = _parent(spec, storage, echo)
    if holder is not None:
        return _join(spec, cfg, parent, holder, storage, data, progress, echo)
    run_id = parent.info.run_id
    name = f"sweep-{len(spec.models)}x{spec.trials}"
    with runs.closing(run_id, {tracking.TAG_SWEEP: "1", tracking.TAG_SWEEP_KEY: spec.key, tracking.TAG_RUN_NAME: name}):
        studies = {m: _study(spec, m, storage) for m in spec.models}
        searched = {d.key for d in spec.space}
        params = {k: v for k, v in cfg.to_dict().items() if k not in searched}
        params.update(
            models=",".join(spec.models),
            trials=spec.trials,
            method=spec.method,
            sampler_seed=cfg.seed,
            startup_trials=spec.startup_trials,
            seeds=",".join(map(str, spec.seeds)),
            space=json.dumps(as_dict(spec.space)),
            optuna_storage=redact(storage),
            optuna_studies=json.dumps({m: s.study_name for m, s in studies.items()}),
        )
        tracking.log_params(run_id, params)
        # A trial whose process on this machine died in an earlier attempt; not one of another machine's workers.
        runs.close_orphans(run_id, tracking.FAILED, elsewhere_alive=True)
        for study in studies.values():
            _fail_stale(study)
        failures = _search(spec, cfg, studies, data, progress, echo)
        _wait_for_workers(studies, echo)
        best = trials.fetch_best(spec.experiment, run_id)
        trials.log(run_id, best)
        echo("")
        echo(trials.render(best, "markdown"))
        reruns = None
        if spec.seeds:
            failures += _rerun_best(spec, cfg, best, studies, data, progress, echo)
            reruns = _report_reruns(spec, run_id, echo)
    return SweepResult(run_id, parent.info.experiment_id, best, reruns, failures)


def _parent(spec: SweepSpec, storage: str, echo):
    """The sweep's parent run and who holds it: (run, None) when this process does (an earlier
    attempt's run, continued, or a new one), (run, holder) when a live process does, here or on
    another machine: this one then joins it as a worker.

    Under ``mlflow run``, the run it made is the parent of this attempt: the trials still continue
    (Optuna's studies are found by the sweep's key), and the best-trial table reads them all.
    """
    name = f"sweep-{len(spec.models)}x{spec.trials}"
    found = runs.find_or_start_parent(
        spec.experiment, name, tracking.TAG_SWEEP_KEY, spec.key, {TAG_STORAGE: redact(storage)}
    )
    if found.was is not None:
        echo(f"Continuing sweep run {found.run.info.run_id} ({found.was.lower()} before)")
    return found.run, found.holder


def _join(spec, cfg, parent, holder: str, storage: str, data, progress, echo) -> SweepResult:
    """Take trials of the sweep another process holds, until none is left; that process reports."""
    run_id = parent.info.run_id
    theirs = parent.data.tags.get(TAG_STORAGE) or parent.data.params.get("optuna_storage")
    if theirs is not None and theirs != redact(storage):
        raise UserError(
            f"sweep run {run_id} keeps its trials in the Optuna storage {theirs}, not {redact(storage)}: "
            "pass that --storage to work on it"
        )
    host = parent.data.tags.get(tracking.TAG_HOST)
    if storage.startswith("sqlite:") and host not in (None, socket.gethostname()):
        raise UserError(
            f"sweep run {run_id} runs on {host} with a SQLite Optuna storage, a file there: workers on other "
            "machines share a sweep through --storage postgresql://... given to every one of them"
        )
    echo(f"Joining sweep run {run_id} as a worker; {holder} holds it and reports the tables")
    studies = {m: _study(spec, m, storage) for m in spec.models}
    failures = _search(spec, cfg, studies, data, progress, echo, parent_id=run_id)
    echo(f"No trial left to take: {holder} reports the tables once every trial has ended.")
    return SweepResult(run_id, parent.info.experiment_id, None, None, failures)


def _wait_for_workers(studies: dict, echo, poll_s: float = 2.0) -> None:
    """Until no trial of these studies is RUNNING: the best trial is chosen from all of them."""
    told = False
    while True:
        for study in studies.values():
            _fail_stale(study)
        running = sum(len(s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) for s in studies.values())
        if not running:
            return
        if not told:
            where = sorted(
                {
                    f"{t.user_attrs.get(tracking.TAG_HOST, '?')} pid {t.user_attrs.get(tracking.TAG_PID, '?')}"
                    for s in studies.values()
                    for t in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                }
            )
            echo(
                f"Waiting for {running} trial(s) that other workers are running ({'; '.join(where)}); a worker "
                "on another machine that died leaves its trial RUNNING: stop this one then, and run the sweep "
                "again once that trial is marked failed (optuna.storages.fail_stale_trials, or its study's UI)"
            )
            told = True
        time.sleep(poll_s)


def _study(spec: SweepSpec, model: str, storage: str) -> optuna.Study:
    # A grid's points are enqueued one at a time (_next_trial), so the sampler never picks one.
    if spec.method == "grid":
        sampler = optuna.samplers.RandomSampler(seed=spec.cfg.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.cfg.seed)
    try:
        return optuna.create_study(
            storage=storage,
            study_name=spec.study_name(model),
            direction="maximize",
            sampler=sampler,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials),
            load_if_exists=True,
        )
    except Exception as e:
        raise UserError(f"cannot open the Optuna storage {redact(storage)}: {describe(e).splitlines()[0]}") from None


def _counts(trial) -> bool:
    """Whether a trial takes one of the sweep's places: all but those interrupted, stale or surplus."""
    return trial.state in COUNTED or (trial.state == TrialState.FAIL and FAILED_ATTR in trial.user_attrs)


def _fail_stale(study: optuna.Study) -> None:
    """A RUNNING trial whose process on this machine is gone will never end: it stops counting."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if runs.process_alive(t.user_attrs) is False:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


def _next_trial(study: optuna.Study, n: int, points: list[dict] | None = None):
    """The next trial of ``study``, or None once ``n`` trials are taken (by this or another process).

    ``points``: a grid, in the order to try it; the next point no counted trial holds is enqueued
    (Optuna's ``enqueue_trial``) and the trial takes it. An interrupted trial's point is free again.
    GridSampler is not used: it counts an interrupted trial's point as visited, and stops the
    study from inside ``tell``.
    """
    while True:
        counted = [t for t in study.get_trials(deepcopy=False) if _counts(t)]
        if len(counted) >= n:
            return None
        if points is not None:
            taken = [_point(t) for t in counted]
            study.enqueue_trial(next(p for p in points if p not in taken))
        trial = study.ask()
        ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _counts(t)]
        if len(ahead) >= n:  # another process took the last place meanwhile
            study.tell(trial, state=TrialState.FAIL)
            return None
        mine = study.get_trials(deepcopy=False)[trial.number]
        if points is not None and any(_point(t) == _point(mine) for t in ahead):
            study.tell(trial, state=TrialState.FAIL)  # another process took this point meanwhile
            continue
        for key, value in runs.process_tags().items():
            trial.set_user_attr(key, value)
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


def _search(spec: SweepSpec, cfg: TrainConfig, studies: dict, data: dict, progress, echo, parent_id=None) -> list[str]:
    """The architectures in turn, a trial each, until each has its ``spec.trials``."""
    failures = []
    while True:
        ran = False
        for model, study in studies.items():
            points = grid_points(dims_for(spec.space, model), cfg.seed) if spec.method == "grid" else None
            trial = _next_trial(study, spec.trials, points)
            if trial is None:
                continue
            ran = True
            failure = _run_trial(spec, cfg, model, study, trial, data, progress, echo, parent_id)
            if failure:
                failures.append(failure)
        if not ran:
            return failures


def _run_trial(spec, cfg, model, study, trial, data, progress, echo, parent_id=None) -> str | None:
    label = f"{model} trial {trial.number}"
    values = suggest(trial, dims_for(spec.space, model))
    echo(f"{label} of {spec.trials}: " + ", ".join(f"{k}={trials.show(v)}" for k, v in values.items()))

    def fail(reason: str) -> str:
        trial.set_user_attr(FAILED_ATTR, reason)
        study.tell(trial, state=TrialState.FAIL)
        echo(f"{label} failed: {reason}")
        return f"{label}: {reason}"

    try:
        trial_cfg = cfg.replace(**values)
    except ConfigError as e:
        return fail(str(e))

    def report(result) -> None:
        trial.report(result.val_acc, result.epoch)
        if trial.should_prune():
            raise Pruned(result.epoch, result.val_acc)

    tags = {
        tracking.TAG_TRIAL: str(trial.number),
        tracking.TAG_OPTUNA_STUDY: study.study_name,
        tracking.TAG_RUN_NAME: f"{model}-trial{trial.number}",
    }
    try:
        result = training.train(
            model, trial_cfg, spec.experiment, progress, _prefixed(echo, label), _data(data, trial_cfg), tags=tags,
            on_epoch=report, parent_run_id=parent_id,
        )  # fmt: skip
    except Pruned as e:
        study.tell(trial, state=TrialState.PRUNED)
        echo(f"{label} {e}")
        return None
    except (Interrupted, KeyboardInterrupt):
        study.tell(trial, state=TrialState.FAIL)  # not counted: the next attempt runs a new trial in its place
        raise
    except Exception as e:  # its run is FAILED already; the search goes on
        return fail(describe(e))
    trial.set_user_attr("mlflow_run_id", result.run_id)
    study.tell(trial, result.history[-1].val_acc)
    return None


def _data(data: dict, cfg: TrainConfig):
    key = data_key(cfg)
    if key not in data:
        data[key] = load_data(cfg)
    return data[key]


def _prefixed(echo, label: str):
    return lambda line: echo(f"[{label}] {line}")


def _rerun_best(spec, cfg, best: trials.BestTrials, studies: dict, data: dict, progress, echo) -> list[str]:
    """Each architecture's best configuration, once per seed, as children of the parent (done ones skipped)."""
    failures = []
    for row in best.rows:
        if row.trial is None:
            continue  # no trial of this architecture finished
        study = studies[row.model]
        values = study.trials[row.trial].params  # Optuna's exact values, not the table's rounded ones
        rerun_of = f"{study.study_name}/{row.trial}"
        done = {
            r.data.params.get("seed")
            for r in tracking.children(best.parent_run_id, status=tracking.FINISHED)
            if r.data.tags.get(tracking.TAG_RERUN_OF) == rerun_of
        }
        for seed in spec.seeds:
            if str(seed) in done:
                continue
            label = f"{row.model} best (trial {row.trial}) seed {seed}"
            tags = {tracking.TAG_RERUN_OF: rerun_of, tracking.TAG_RUN_NAME: f"{row.model}-best-seed{seed}"}
            seed_cfg = cfg.replace(**values, seed=seed)
            try:
                training.train(
                    row.model, seed_cfg, spec.experiment, progress, _prefixed(echo, label), _data(data, seed_cfg),
                    tags=tags,
                )  # fmt: skip
            except Interrupted:
                raise
            except Exception as e:
                failures.append(f"{label}: {describe(e)}")
                echo(f"{label} failed: {describe(e)}")
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
