"""The whole study: one parent run, one nested training run per model and seed, one table."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import mlflow

from . import compare, parallel, plots, tracking
from . import train as training
from .config import TrainConfig
from .data import load_data
from .errors import ZarError
from .models import get_variant


@dataclass
class StudyResult:
    run_id: str
    experiment_id: str
    table: list[compare.TableRow]
    failures: list[str]


def run_study(models: list[str], seeds: list[int], cfg: TrainConfig, experiment: str = tracking.DEFAULT_EXPERIMENT,
              baseline: str = "resnet", progress: bool = True,
              echo: Callable[[str], None] = click.echo, jobs: int = 1) -> StudyResult:
    """Train every model with every seed as children of one parent run, then report the table.

    ``jobs > 1`` trains up to that many children at once, each in a process of its own.
    """
    for m in models:
        training._user_error(get_variant, m)
    if baseline not in models:
        raise ZarError(f"baseline {baseline!r} is not among --models {','.join(models)}")
    configs = {seed: cfg.replace(seed=seed) for seed in seeds}  # a bad seed fails now, before any run
    data = load_data(cfg)  # once for all runs: a bad folder fails now, and images are decoded once
    tracking.check_reachable()
    # Under 'mlflow run' the parent run exists already, in MLflow's chosen experiment.
    experiment_id = None if os.environ.get("MLFLOW_RUN_ID") else tracking.get_experiment_id(experiment)
    parent = tracking.start_run(experiment_id, f"study-{len(models)}x{len(seeds)}")
    run_id = parent.info.run_id
    with training._closing_run(run_id):
        tracking.set_tags(run_id, {tracking.TAG_STUDY: "1", "mlflow.runName": f"study-{len(models)}x{len(seeds)}",
                                   **tracking.process_tags()})
        tracking.log_params(run_id, {**cfg.to_dict(), "models": ",".join(models), "seeds": ",".join(map(str, seeds)),
                                     "jobs": jobs})
        children = [(model, seed) for model in models for seed in seeds]
        if jobs > 1:
            failures = parallel.train_children(children, configs, run_id, experiment, jobs, echo)
        else:
            failures = _train_in_process(children, configs, experiment, progress, echo, data)
        table = _report(run_id, parent.info.experiment_id, models, baseline, echo)
        if failures:
            raise training.TrainingFailed(f"{len(failures)} of {len(children)} runs failed: " + "; ".join(failures))
    return StudyResult(run_id, parent.info.experiment_id, table, failures)


def _train_in_process(children, configs, experiment, progress, echo, data) -> list[str]:
    failures = []
    for model, seed in children:
        try:
            training.train(model, configs[seed], experiment, progress, echo, data=data)
        except training.Interrupted:
            raise  # the parent ends KILLED too
        except Exception as e:  # the child is FAILED already; the study goes on without it
            message = e.format_message() if isinstance(e, click.ClickException) else f"{type(e).__name__}: {e}"
            failures.append(f"{model} seed {seed}: {message}")
            echo(f"{model} seed {seed} failed: {message}")
    return failures


def _report(run_id: str, experiment_id: str, models: list[str], baseline: str, echo) -> list[compare.TableRow]:
    """The table from what MLflow recorded (as ``zar compare`` would read it), saved in the parent run."""
    experiment = tracking.client().get_experiment(experiment_id).name
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
        (out / "comparison.md").write_text(markdown + "\n" + compare.describe_usage(len(fetched.rows), fetched.left_out) + "\n")
        (out / "comparison.csv").write_text(compare.render(table, "csv"))
        several_seeds = len(fetched.rows) > len(names)
        client = tracking.client()
        series = {(f"{r.name} seed {r.seed}" if several_seeds else r.name):
                  [{"epoch": m.step, "val_acc": m.value}
                   for m in sorted(client.get_metric_history(r.run_id, "val_acc"), key=lambda m: m.step)]
                  for r in fetched.rows}
        plots.val_acc_per_epoch(series, out / "val_acc_per_epoch.png")
        plots.final_val_acc_bars([r.name for r in table], [r.val_acc_mean for r in table],
                                 [r.val_acc_std if r.val_acc_std is not None else 0.0 for r in table],
                                 out / "final_val_acc.png")
        mlflow.log_artifacts(tmp)
    echo("")
    echo(markdown)
    echo(compare.describe_usage(len(fetched.rows), fetched.left_out))
    return table
