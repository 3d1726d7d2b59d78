"""The whole study: one parent run, one nested training run per model and seed (and, in an
ablation, per combination of the varied values: zar.ablation), one table grouped by those values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import ablation, parallel, tracking, training
from .ablation import Child
from .analysis.study_table import log_report, log_table
from .analysis.table import DEFAULT_BASELINE, TableRow
from .checks import check_study
from .config import TrainConfig
from .errors import Interrupted, TrainingFailed, UserError, describe
from .learn.data import DataBundle, data_key, load_data
from .tracking import runs


@dataclass
class StudyResult:
    run_id: str
    experiment_id: str
    table: list[TableRow]
    failures: list[str]


def run_study(
    models: list[str],
    seeds: list[int],
    cfg: TrainConfig,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    baseline: str | None = "resnet",
    progress: bool = True,
    echo: Callable[[str], None] = training.print_line,
    jobs: int = 1,
    vary: dict[str, list] | None = None,
) -> StudyResult:
    """Train every model with every seed (and every combination of ``vary``'s values) as children
    of one parent run, then report the table, grouped by the varied keys.

    ``baseline=None``: resnet when it is among ``models``, else no row is compared to another.
    ``jobs > 1`` trains up to that many children at once, each in a process of its own.
    """
    vary = vary or {}
    check_study(models, baseline or default_baseline(models), seeds)
    cfg, _ = training.resolve(cfg)  # the parent records the precision its children run at
    # Every child's config, built and resolved now: a bad value or device fails before any run.
    kids = [Child(k.model, training.resolve(k.cfg)[0], k.varied) for k in ablation.plan(models, seeds, cfg, vary)]
    _check_distinct(kids)
    data = {}  # once per distinct data: a bad folder fails now, and images are decoded once
    for kid in kids:
        if data_key(kid.cfg) not in data:
            data[data_key(kid.cfg)] = load_data(kid.cfg)
    tracking.check_reachable()
    run_name = f"study-{len(models)}x{len(seeds)}" + (f"-vary-{'-'.join(vary)}" if vary else "")
    parent = runs.start(experiment, run_name)  # under 'mlflow run', the run it made
    run_id = parent.info.run_id
    with runs.closing(run_id, {tracking.TAG_STUDY: "1", tracking.TAG_RUN_NAME: run_name}):
        params = {k: v for k, v in cfg.to_dict().items() if k not in vary}  # a varied key has no one value
        params.update(models=",".join(models), seeds=",".join(map(str, seeds)), jobs=jobs)
        if vary:
            params["vary"] = ablation.describe(vary)
        tracking.log_params(run_id, params)
        if jobs > 1:
            failures = parallel.train_children(kids, run_id, experiment, jobs, echo)
        else:
            failures = _train_in_process(kids, experiment, progress, echo, data)
        table = log_table(run_id, parent.info.experiment_id, models, baseline, echo, group_by=list(vary))
        if table:
            try:
                log_report(parent, table, echo)
            except Exception as e:  # the runs and the table are recorded: a page that fails must not fail them
                echo(f"Report not written: {describe(e)}; 'zar report --parent {run_id}' tries again")
        if failures:
            raise TrainingFailed(f"{len(failures)} of {len(kids)} runs failed: " + "; ".join(failures))
    return StudyResult(run_id, parent.info.experiment_id, table, failures)


def _check_distinct(kids: list[Child]) -> None:
    """Two varied values that resolve to one config ('auto' is fp32 here) would train one run twice and
    average it as two samples."""
    seen: dict[tuple, Child] = {}
    for kid in kids:
        first = seen.setdefault((kid.model, kid.cfg), kid)
        if first is not kid:
            differ = [f"{k}={a} and {k}={b}" for (k, a), (_, b) in zip(first.varied, kid.varied) if a != b]
            raise UserError(
                f"--vary: {', '.join(differ)} train the same run here ({first.label} and {kid.label} resolve "
                f"to one config, e.g. 'auto' to what this machine runs); drop one of the values"
            )


def default_baseline(models: list[str]) -> str:
    """What a study compares to when not told: resnet if it trains, else (for checks) its first model."""
    return DEFAULT_BASELINE if DEFAULT_BASELINE in models else models[0]


def _train_in_process(kids: list[Child], experiment, progress, echo, data: dict[tuple, DataBundle]) -> list[str]:
    failures = []
    for kid in kids:
        try:
            training.train(kid.model, kid.cfg, experiment, progress, echo, data=data[data_key(kid.cfg)])
        except Interrupted:
            raise  # the parent ends KILLED too
        except Exception as e:  # the child is FAILED already; the study goes on without it
            message = describe(e)
            failures.append(f"{kid.label}: {message}")
            echo(f"{kid.label} failed: {message}")
    return failures
