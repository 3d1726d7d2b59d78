"""What a study keeps in its parent run once its children end: the table (comparison.md and .csv),
its figures, its numbers as the parent's metrics, and the report page; all read back from MLflow."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

from .. import plots, tracking
from .comparison import comparison, judging_for
from .fetch import describe_parent, describe_usage, fetch_runs
from .grouping import check_comparable, run_label
from .render import render
from .report import write_report
from .table import TableRow, build_table


def log_table(
    run_id: str, experiment_id: str, models: list[str], baseline: str | None, echo, group_by: list[str] = ()
) -> list[TableRow]:
    """The table from what MLflow recorded (as ``zar compare --group-by`` would read it), saved in the parent run."""
    experiment = tracking.experiment_name(experiment_id)
    fetched = fetch_runs(experiment, parent=run_id)
    if not fetched.rows:
        return []
    finished = {r.model for r in fetched.rows}
    base = baseline
    if baseline is not None and baseline not in finished:
        base = next((m for m in models if m in finished), min(finished))
        echo(f"No {baseline} run finished: the table compares to {base} instead.")
    # Judged as 'zar compare --parent' judges it: the study's margin, and its sequential design if it has one.
    table = build_table(fetched.rows, base, group_by=group_by, judging=judging_for(describe_parent(run_id)))
    warnings = check_comparable(fetched.rows, strict=False, group_by=group_by)
    markdown = render(table, "markdown")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        usage = describe_usage(len(fetched.rows), fetched.left_out)
        (out / "comparison.md").write_text(f"{markdown}\n{usage}\n")
        (out / "comparison.csv").write_text(render(table, "csv"))
        labels = {r.run_id: run_label(r, group_by) for r in fetched.rows}
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
    tracking.set_tags(run_id, table_tags(table))
    echo("")
    for warning in warnings:  # as zar compare prints them
        echo(f"Warning: {warning}")
    echo(markdown)
    echo(describe_usage(len(fetched.rows), fetched.left_out))
    return table


def log_report(parent, table: list[TableRow], echo) -> None:
    """The study as one page (zar.analysis.report), kept in the parent run as report.html."""
    run_id = parent.info.run_id
    base = next((r.model for r in table if r.is_baseline), None)
    found = comparison(tracking.experiment_name(parent.info.experiment_id), run_id, baseline=base)
    with tempfile.TemporaryDirectory() as tmp:
        write_report(found, Path(tmp) / "report.html", "html", title=f"Study run {run_id}")
        tracking.log_artifacts(run_id, tmp)
    folder = tracking.local_artifact_dir(parent)
    where = folder / "report.html" if folder else f"report.html among the artifacts of run {run_id}"
    echo(f"Report: {where}")


def table_metrics(table: list[TableRow]) -> dict[str, float]:
    """The table's numbers as the parent run's metrics (``val_acc_mean.se_mish``), so that the runs
    table and the Compare view show them, not only the artifacts.

    Accuracies are fractions, as every run's ``val_acc`` is (and MLflow's and scikit-learn's own
    loggers log them): the table prints percent, the metrics do not, so an export or a chart of the
    experiment never mixes the two scales. The difference from the baseline is a fraction too.
    """
    fraction = 1 / 100  # the table's rows hold percent and percentage points
    out = {}
    for row, name in zip(table, _metric_names(table)):
        accuracies = {
            "val_acc_mean": row.val_acc_mean,
            "val_acc_std": row.val_acc_std,
            "train_eval_acc_mean": row.train_eval_acc_mean,
            "val_acc_vs_baseline": row.val_acc_vs_baseline,
            "val_acc_vs_baseline_ci_low": row.ci_low,  # the table's 95% interval, made as its notes say
            "val_acc_vs_baseline_ci_high": row.ci_high,
        }
        values = {k: v * fraction for k, v in accuracies.items() if v is not None} | {"runs": row.runs}
        if row.seeds_needed is not None:
            values["seeds_needed"] = row.seeds_needed
        out.update({f"{key}.{name}": v for key, v in values.items() if v is not None and math.isfinite(v)})
    return out


def table_tags(table: list[TableRow]) -> dict[str, str]:
    """Each compared row's verdict as a tag of the parent run (``zar.verdict.se``: ``equivalent (±1)``),
    beside the method that made it (``zar.verdict_method.se``: ``bootstrap`` or ``welch``)."""
    out = {}
    for row, name in zip(table, _metric_names(table)):
        if row.verdict and not row.is_baseline:
            out[f"zar.verdict.{name}"] = row.verdict
            out[f"zar.verdict_method.{name}"] = row.method
    return out


def _metric_names(table: list[TableRow]) -> list[str]:
    """A key per row for the parent's metrics and tags: the model, else its varied values, else its name."""
    by_model = len({row.model for row in table}) == len(table)  # else rows differ in settings too
    # An ablation's rows by model and varied values (val_acc_mean.se.se_reduction_4), else by their names.
    grouped = [row.model + "".join(f".{k}_{v}" for k, v in row.group.items()) for row in table]
    by_group = any(row.group for row in table) and len(set(grouped)) == len(table)
    names = [row.model if by_model else group if by_group else row.name for row, group in zip(table, grouped)]
    return [re.sub(r"[^\w./ -]+", "_", name) for name in names]  # what MLflow keys may hold
