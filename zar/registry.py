"""Put a run's model in MLflow's Model Registry, tagged with where it came from.

``zar study --register NAME`` registers the model of the table's best row (highest mean val
accuracy); of that row's runs (one per seed), the one with the highest val accuracy. The row's
numbers come from its runs' last epochs, so its last-epoch model (``model``) is registered; a table
of best epochs would register ``best``. ``zar train --register NAME`` registers the run's last-epoch
model. Either way ``models:/NAME/<version>`` loads with MLflow alone (zar.learn.served_model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import tracking
from .errors import UserError

if TYPE_CHECKING:
    from .analysis.table import TableRow

ARTIFACTS = {"last": ("model", "last-epoch"), "best": ("best", "best-epoch (chosen on the validation set)")}


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    run_id: str
    artifact: str  # "model" or "best"
    said: str  # what was registered, in words

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_run(name: str, run_id: str) -> Registered:
    """A training run's last-epoch model as a new version of ``name``."""
    run = tracking.get_run(run_id)
    artifact, when = ARTIFACTS["last"]
    tags = _run_tags(run, artifact, when)
    said = f"the {when} model of run {run_id} ({_label(run)}, val acc {_percent(run, 'val_acc')})"
    return _register(name, run_id, artifact, tags, said)


def register_best(name: str, table: list[TableRow], study_run_id: str) -> Registered:
    """The model of the table's best row (by mean val accuracy), from its best run, as a new version of ``name``."""
    rows = [r for r in table if r.run_ids]
    if not rows:
        raise UserError(f"study run {study_run_id} has no finished run to register as {name!r}")
    row = max(rows, key=lambda r: r.val_acc_mean)
    runs = [tracking.get_run(i) for i in row.run_ids]
    best = max(runs, key=lambda r: r.data.metrics.get(row.val_metric, float("-inf")))
    artifact, when = ARTIFACTS[row.select]
    run_id = best.info.run_id
    verdict = f"; against {row.baseline}: {row.verdict}" if row.verdict and row.baseline else ""
    tags = _run_tags(best, artifact, when) | {
        "zar.study_run_id": study_run_id,
        "zar.table_row": row.name,
        "zar.row_val_acc_mean": f"{row.val_acc_mean / 100:.4f}",  # a fraction, as every logged accuracy
        "zar.row_runs": str(row.runs),
        "zar.verdict": "baseline" if row.is_baseline else row.verdict or "not compared",
    }
    said = (
        f"the {when} model of run {run_id} ({_label(best)}, val acc {_percent(best, row.val_metric)}), "
        f"the highest of the {_runs(row.runs)} of the table's best row {row.name} "
        f"(mean val acc {row.val_acc_mean:.2f}%{verdict})"
    )
    registered = _register(name, run_id, artifact, tags, said)
    tracking.set_tags(study_run_id, {"zar.registered_model": registered.uri})
    return registered


def _register(name: str, run_id: str, artifact: str, tags: dict[str, str], said: str) -> Registered:
    version = tracking.register_model(run_id, artifact, name, tags, description=f"Registered by zar: {said}.")
    return Registered(name, version, run_id, artifact, said)


def _run_tags(run, artifact: str, when: str) -> dict[str, str]:
    tags = run.data.tags
    return {
        "zar.source_run_id": run.info.run_id,
        "zar.run_url": tracking.runs_url(run.info.experiment_id, run.info.run_id),
        "zar.model": tags.get(tracking.TAG_MODEL, ""),
        "zar.seed": run.data.params.get("seed", ""),
        "zar.model_artifact": f"{artifact} ({when})",
    }


def _label(run) -> str:
    display = run.data.tags.get(tracking.TAG_DISPLAY) or run.data.tags.get(tracking.TAG_MODEL, "?")
    return f"{display} seed {run.data.params.get('seed', '?')}"


def _percent(run, metric: str) -> str:
    value = run.data.metrics.get(metric)
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _runs(n: int) -> str:
    return "one run" if n == 1 else f"{n} runs"
