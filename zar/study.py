"""The whole study: one parent run, one nested training run per model and seed, one table."""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import compare, parallel, plots, runs, tracking
from . import train as training
from .checks import check_study
from .config import TrainConfig
from .data import load_data
from .errors import Interrupted, TrainingFailed, describe


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
    baseline: str = "resnet",
    progress: bool = True,
    echo: Callable[[str], None] = training.print_line,
    jobs: int = 1,
) -> StudyResult:
    """Train every model with every seed as children of one parent run, then report the table.

    ``jobs > 1`` trains up to that many children at once, each in a process of its own.
    """
    check_study(models, baseline, seeds)
    cfg, _ = training.resolve(cfg)  # the parent records the precision its children run at
    configs = {seed: cfg.replace(seed=seed) for seed in seeds}  # a bad seed fails now, before any run
    data = load_data(cfg)  # once for all runs: a bad folder fails now, and images are decoded once
    tracking.check_reachable()
    run_name = f"study-{len(models)}x{len(seeds)}"
    parent = runs.start(experiment, run_name)  # under 'mlflow run', the run it made
    run_id = parent.info.run_id
    with runs.closing(run_id, {tracking.TAG_STUDY: "1", tracking.TAG_RUN_NAME: run_name}):
        tracking.log_params(
            run_id, {**cfg.to_dict(), "models": ",".join(models), "seeds": ",".join(map(str, seeds)), "jobs": jobs}
        )
        children = [(model, seed) for model in models for seed in seeds]
        if jobs > 1:
            failures = parallel.train_children(children, configs, run_id, experiment, jobs, echo)
        else:
            failures = _train_in_process(children, configs, experiment, progress, echo, data)
        table = _report(run_id, parent.info.experiment_id, models, baseline, echo)
        if failures:
            raise TrainingFailed(f"{len(failures)} of {len(children)} runs failed: " + "; ".join(failures))
    return StudyResult(run_id, parent.info.experiment_id, table, failures)


def _train_in_process(children, configs, experiment, progress, echo, data) -> list[str]:
    failures = []
    for model, seed in children:
        try:
            training.train(model, configs[seed], experiment, progress, echo, data=data)
        except Interrupted:
            raise  # the parent ends KILLED too
        except Exception as e:  # the child is FAILED already; the study goes on without it
            message = describe(e)
            failures.append(f"{model} seed {seed}: {message}")
            echo(f"{model} seed {seed} failed: {message}")
    return failures


def _report(run_id: str, experiment_id: str, models: list[str], baseline: str, echo) -> list[compare.TableRow]:
    """The table from what MLflow recorded (as ``zar compare`` would read it), saved in the parent run."""
    experiment = tracking.experiment_name(experiment_id)
    fetched = compare.fetch_runs(experiment, parent=run_id)
    if not fetched.rows:
        return []
    names = {r.name for r in fetched.rows}
    finished = {r.model for r in fetched.rows}
    base = baseline if baseline in finished else next((m for m in models if m in finished), min(finished))
    if base != baseline:
        echo(f"No {baseline} run finished: the table compares to {base} instead.")
    table = compare.build_table(fetched.rows, base)
    markdown = compare.render(table, "markdown")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        usage = compare.describe_usage(len(fetched.rows), fetched.left_out)
        (out / "comparison.md").write_text(f"{markdown}\n{usage}\n")
        (out / "comparison.csv").write_text(compare.render(table, "csv"))
        several_seeds = len(fetched.rows) > len(names)
        series = {
            (f"{r.name} seed {r.seed}" if several_seeds else r.name): [
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


def table_metrics(table: list[compare.TableRow]) -> dict[str, float]:
    """The table's numbers as the parent run's metrics (``val_acc_mean.se_mish``), so that the runs
    table and the Compare view show them, not only the artifacts. Accuracies in percent, as printed."""
    out = {}
    by_model = len({row.model for row in table}) == len(table)  # else rows differ in settings too: use their names
    for row in table:
        values = {
            "val_acc_mean": row.val_acc_mean,
            "val_acc_std": row.val_acc_std,
            "train_eval_acc_mean": row.train_eval_acc_mean,
            "val_acc_vs_baseline": row.val_acc_vs_baseline,
            "runs": row.runs,
        }
        name = row.model if by_model else re.sub(r"[^\w./ -]+", "_", row.name)  # what MLflow keys may hold
        out.update({f"{key}.{name}": v for key, v in values.items() if v is not None and math.isfinite(v)})
    return out
