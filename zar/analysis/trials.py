"""A sweep's tables from what MLflow recorded: the best trial per architecture, and the --seeds runs.

``zar sweep`` prints both when it ends and ``zar compare --parent SWEEP_RUN_ID`` prints them again
(``--select best-trial`` for the first), from the same runs with the same code, so the two agree.
A trial's number is its place in the architecture's Optuna study; the best is the FINISHED trial
with the highest last-epoch val_acc (the objective), the lower number on a tie. A trial Optuna ran
again in another's place (interrupted, or its worker died) counts as neither finished nor failed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import tracking
from ..errors import UserError
from ..space import applies
from ..variants import VARIANTS
from .fetch import Parent, describe_parent, fetch_runs
from .table import Table, build_table

FORMATS = ("markdown", "csv", "json")
TAG_REPLACED = "zar.replaced"  # why a trial's run does not count: its worker died, and Optuna ran the trial again


@dataclass
class BestTrial:
    """One architecture's search: its best trial (None when none finished) and how its trials ended."""

    model: str
    name: str
    study: str
    trial: int | None = None
    run_id: str | None = None
    val_acc: float | None = None  # percent, the best trial's last epoch
    params: dict[str, str] = field(default_factory=dict)  # the searched keys, as logged
    params_m: float | None = None
    finished: int = 0
    pruned: int = 0
    failed: int = 0
    replaced: int = 0  # interrupted, or its worker died: not counted, another trial took its place
    running: int = 0


@dataclass
class BestTrials:
    parent_run_id: str
    keys: list[str]  # the space's keys, in its order
    trials: int  # per architecture, as the sweep asked
    method: str
    sampler_seed: str
    rows: list[BestTrial]

    @property
    def notes(self) -> list[str]:
        sampler = "a grid, in seeded random order" if self.method == "grid" else "seeded TPE"
        notes = [
            f"Each architecture: {self.trials} trials over the same space, {sampler} (seed {self.sampler_seed}), "
            "a median pruner on each epoch's val_acc; one training seed for every trial.",
            "optimistic: the best of several trials is chosen on the validation set itself, so its val accuracy "
            "leans high; 'zar sweep --seeds' trains each best configuration again with other seeds.",
        ]
        for row in self.rows:
            unsearched = [k for k in self.keys if k not in row.params]
            if unsearched and row.trial is not None:
                notes.append(f"-: {', '.join(unsearched)} does not change {row.name}, so its study does not search it.")
        if any(r.replaced for r in self.rows):
            notes.append(
                "Interrupted trials, and those whose worker died, do not count: a new trial took the place of each."
            )
        return notes


def parent_sweep(parent_run_id: str) -> Parent:
    """The sweep's parent run; a run that is not one is a one-line error."""
    parent = describe_parent(parent_run_id)
    if parent.missing is not None:
        raise parent.missing
    if not parent.is_sweep:
        raise UserError(f"run {parent_run_id} is not a zar sweep; --select best-trial reads a sweep's parent run")
    return parent


def fetch_best(experiment: str, parent_run_id: str) -> BestTrials:
    """Every trial run of the sweep's Optuna studies (any attempt's), reduced to each architecture's best."""
    parent = parent_sweep(parent_run_id).run
    params = parent.data.params
    studies = json.loads(params.get("optuna_studies", "{}"))
    keys = list(json.loads(params.get("space", "{}")))
    rows = []
    for model, study in studies.items():
        found = tracking.search_runs(
            parent.info.experiment_id,
            f"tags.`{tracking.TAG_OPTUNA_STUDY}` = '{study}'",
        )
        rows.append(_best(model, study, found, keys, int(params.get("depth", 34))))
    order = list(VARIANTS)
    rows.sort(key=lambda r: order.index(r.model) if r.model in order else len(order))
    trials, method, seed = int(params.get("trials", 0)), params.get("method", ""), params.get("sampler_seed", "")
    return BestTrials(parent_run_id, keys, trials, method, seed, rows)


def _best(model: str, study: str, found: list, keys: list[str], depth: int) -> BestTrial:
    row = BestTrial(model, VARIANTS[model].display_name(depth) if model in VARIANTS else model, study)
    best = None
    for run in found:
        status, tags = run.info.status, run.data.tags
        if TAG_REPLACED in tags:
            row.replaced += 1
        elif status == tracking.FINISHED:
            row.finished += 1
            value = run.data.metrics.get("val_acc")
            if value is None or not math.isfinite(value):
                continue
            number = int(tags[tracking.TAG_TRIAL])
            if best is None or (value, -number) > (best[0], -best[1]):
                best = (value, number, run)
        elif status == tracking.KILLED:
            if tracking.TAG_PRUNED in tags:
                row.pruned += 1
            else:
                row.replaced += 1
        elif status == tracking.FAILED:
            row.failed += 1
        else:
            row.running += 1
    if best is not None:
        value, number, run = best
        total = run.data.metrics.get("params_total")
        row.trial, row.run_id, row.val_acc = number, run.info.run_id, 100 * value
        row.name = run.data.tags.get(tracking.TAG_DISPLAY, row.name)
        row.params = {k: run.data.params[k] for k in keys if k in run.data.params and applies(k, model)}
        row.params_m = total / 1e6 if total is not None else None
    return row


def show(value) -> str:
    """A searched value as the table prints it: floats to 3 significant digits."""
    if isinstance(value, float):
        return f"{value:.3g}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(value) if str(value).lstrip("-").isdigit() else f"{number:.3g}"


def columns(keys: list[str]) -> list[str]:
    return [
        "Model",
        "Best trial",
        "Best trial's Val Acc (%), optimistic",
        *keys,
        "Trials: finished / pruned / failed",
        "Params (M)",
    ]


def _cells(row: BestTrial, keys: list[str]) -> list[str]:
    return [
        row.name,
        "-" if row.trial is None else str(row.trial),
        "n/a" if row.val_acc is None else f"{row.val_acc:.2f}",
        *(show(row.params[k]) if k in row.params else "-" for k in keys),
        f"{row.finished} / {row.pruned} / {row.failed}" + (f" ({row.running} running)" if row.running else ""),
        "n/a" if row.params_m is None else f"{row.params_m:.2f}",
    ]


def render(best: BestTrials, fmt: str = "markdown") -> str:
    if fmt not in FORMATS:
        raise UserError(f"--select best-trial prints {', '.join(FORMATS)}, not {fmt}")
    heads = columns(best.keys)
    if fmt == "json":
        return json.dumps({"rows": [asdict(r) for r in best.rows], "notes": best.notes}, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(heads)
        writer.writerows(_cells(r, best.keys) for r in best.rows)
        return out.getvalue()
    lines = ["| " + " | ".join(heads) + " |", "| --- |" + " :-: |" * (len(heads) - 1)]
    lines += ["| " + " | ".join(_cells(r, best.keys)) + " |" for r in best.rows]
    return "\n".join(lines) + "\n\n" + "\n".join(best.notes) + "\n"


def log(run_id: str, best: BestTrials) -> None:
    """The table as the parent's artifacts, and each best val_acc as its metric (``best_trial_val_acc.se``)."""
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, name in (("markdown", "best_trials.md"), ("csv", "best_trials.csv"), ("json", "best_trials.json")):
            (Path(tmp) / name).write_text(render(best, fmt))
        tracking.log_artifacts(run_id, tmp)
    # A fraction, as every accuracy MLflow holds; the table shows percent.
    values = {f"best_trial_val_acc.{r.model}": r.val_acc / 100 for r in best.rows if r.val_acc is not None}
    tracking.log_metrics(run_id, values)


def rerun_table(experiment: str, parent_run_id: str, baseline: str | None = None) -> Table | None:
    """The --seeds runs (each architecture's best configuration again) as the study's table; None without any."""
    parent = parent_sweep(parent_run_id)
    fetched = fetch_runs(
        experiment, parent_run_id, f"tags.`{tracking.TAG_RERUN_OF}` LIKE '%'"
    )  # fmt: skip
    if not fetched.rows:
        return None
    return build_table(fetched.rows, baseline, tuned=parent.tuned_keys)


def seeds_rerun(parent_run_id: str, rerun_of: str) -> set[str]:
    """The seeds of a sweep's finished --seeds runs of one trial (``rerun_of``: study/trial), as params keep them."""
    return {
        r.data.params.get("seed")
        for r in tracking.children(parent_run_id, status=tracking.FINISHED)
        if r.data.tags.get(tracking.TAG_RERUN_OF) == rerun_of
    }
