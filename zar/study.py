"""The whole study: one parent run, one nested training run per model and seed (and, in an
ablation, per combination of the varied values: zar.ablation), one table grouped by those values."""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import ablation, compare, parallel, plots, tracking, training
from .ablation import Child
from .checks import check_study
from .config import TrainConfig
from .data import DataBundle, load_data
from .errors import Interrupted, TrainingFailed, describe
from .tracking import runs

# Config keys that never change the data a run trains on: children that differ only in these share
# one loaded dataset. Any other key (a new one too) gets its own load, which is slower, never wrong.
TRAINING_ONLY = {
    "lr", "batch_size", "epochs", "optimizer", "weight_decay", "seed", "workers", "depth", "se_reduction", "device",
    "precision",
}  # fmt: skip


@dataclass
class StudyResult:
    run_id: str
    experiment_id: str
    table: list[compare.TableRow]
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
    kids = [Child(k.model, training.resolve(k.cfg)[0], k.varied) for k in ablation.children(models, seeds, cfg, vary)]
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
        table = _report(run_id, parent.info.experiment_id, models, baseline, echo, group_by=list(vary))
        if table:
            try:
                _write_report(parent, table, echo)
            except Exception as e:  # the runs and the table are recorded: a page that fails must not fail them
                echo(f"Report not written: {describe(e)}; 'zar report --parent {run_id}' tries again")
        if failures:
            raise TrainingFailed(f"{len(failures)} of {len(kids)} runs failed: " + "; ".join(failures))
    return StudyResult(run_id, parent.info.experiment_id, table, failures)


def default_baseline(models: list[str]) -> str:
    """What a study compares to when not told: resnet if it trains, else (for checks) its first model."""
    return compare.DEFAULT_BASELINE if compare.DEFAULT_BASELINE in models else models[0]


def data_key(cfg: TrainConfig) -> tuple:
    return tuple(v for k, v in sorted(cfg.to_dict().items()) if k not in TRAINING_ONLY)


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


def _report(
    run_id: str, experiment_id: str, models: list[str], baseline: str | None, echo, group_by: list[str] = ()
) -> list[compare.TableRow]:
    """The table from what MLflow recorded (as ``zar compare --group-by`` would read it), saved in the parent run."""
    experiment = tracking.experiment_name(experiment_id)
    fetched = compare.fetch_runs(experiment, parent=run_id)
    if not fetched.rows:
        return []
    finished = {r.model for r in fetched.rows}
    base = baseline
    if baseline is not None and baseline not in finished:
        base = next((m for m in models if m in finished), min(finished))
        echo(f"No {baseline} run finished: the table compares to {base} instead.")
    table = compare.build_table(fetched.rows, base, group_by=group_by)
    markdown = compare.render(table, "markdown")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        usage = compare.describe_usage(len(fetched.rows), fetched.left_out)
        (out / "comparison.md").write_text(f"{markdown}\n{usage}\n")
        (out / "comparison.csv").write_text(compare.render(table, "csv"))
        labels = {r.run_id: compare.run_label(r, group_by) for r in fetched.rows}
        several_seeds = len(fetched.rows) > len(set(labels.values()))
        series = {
            (f"{labels[r.run_id]} seed {r.seed}" if several_seeds else labels[r.run_id]): [
                {"epoch": step, "val_acc": value} for step, value in tracking.metric_history(r.run_id, "val_acc")
            ]
            for r in fetched.rows
        }
        plots.val_acc_per_epoch(series, out / "val_acc_per_epoch.png")
        plots.final_val_acc_bars(
            [r.name for r in table],
            [r.val_acc_mean for r in table],
            [r.val_acc_std if r.val_acc_std is not None else 0.0 for r in table],
            out / "final_val_acc.png",
        )
        tracking.log_artifacts(run_id, tmp)
    tracking.log_metrics(run_id, table_metrics(table))
    echo("")
    echo(markdown)
    echo(compare.describe_usage(len(fetched.rows), fetched.left_out))
    return table


def _write_report(parent, table: list[compare.TableRow], echo) -> None:
    """The study as one page (zar.report), kept in the parent run as report.html."""
    from . import report

    run_id = parent.info.run_id
    base = next((r.model for r in table if r.is_baseline), None)
    found = compare.comparison(tracking.experiment_name(parent.info.experiment_id), run_id, baseline=base)
    with tempfile.TemporaryDirectory() as tmp:
        report.write(found, Path(tmp) / "report.html", "html", title=f"Study run {run_id}")
        tracking.log_artifacts(run_id, tmp)
    folder = tracking.local_artifact_dir(parent)
    where = folder / "report.html" if folder else f"report.html among the artifacts of run {run_id}"
    echo(f"Report: {where}")


def table_metrics(table: list[compare.TableRow]) -> dict[str, float]:
    """The table's numbers as the parent run's metrics (``val_acc_mean.se_mish``), so that the runs
    table and the Compare view show them, not only the artifacts. Accuracies in percent, as printed."""
    out = {}
    by_model = len({row.model for row in table}) == len(table)  # else rows differ in settings too
    # An ablation's rows by model and varied values (val_acc_mean.se.se_reduction_4), else by their names.
    grouped = [row.model + "".join(f".{k}_{v}" for k, v in row.group.items()) for row in table]
    by_group = any(row.group for row in table) and len(set(grouped)) == len(table)
    for row, group_name in zip(table, grouped):
        values = {
            "val_acc_mean": row.val_acc_mean,
            "val_acc_std": row.val_acc_std,
            "train_eval_acc_mean": row.train_eval_acc_mean,
            "val_acc_vs_baseline": row.val_acc_vs_baseline,
            "runs": row.runs,
        }
        name = row.model if by_model else group_name if by_group else row.name
        name = re.sub(r"[^\w./ -]+", "_", name)  # what MLflow keys may hold
        out.update({f"{key}.{name}": v for key, v in values.items() if v is not None and math.isfinite(v)})
    return out
