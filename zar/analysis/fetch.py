"""Runs to rows: one paged MLflow search, each run reduced to what the table needs, and the parent read once.

``fetch_runs`` asks MLflow for training runs, ``fetch_bench`` for ``zar bench`` runs; ``run_row``
keeps a run's numbers and the settings (``GUARDED``) that decide which runs may share a row;
``describe_parent`` reads a study's or sweep's parent run: the keys its study varied, or its sweep tuned.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from .. import tracking
from ..config import FIELD_TYPES, MATCHED_KEYS, TrainConfig
from ..errors import UserError
from ..predictions import TAG as PREDICTIONS_TAG

SELECT = ("last", "best")
# The MLflow metrics each --select reads: (train accuracy in eval mode, val accuracy).
METRICS = {"last": ("train_eval_acc", "val_acc"), "best": ("train_eval_acc_at_best", "best_val_acc")}
TAG_DATA_FINGERPRINT = tracking.TAG_DATA_FINGERPRINT
# A config key a run did not record is one added after that run: zar ran it at the key's default,
# which every new key has kept equal to the behaviour before it (scheduler none, precision fp32...).
# A run that did not record world_size trained in one process (before torchrun support, or without it).
UNRECORDED = {f.name: str(f.default) for f in fields(TrainConfig)} | {"world_size": "1"}
# What runs of one row must share: the config keys whose role is data or training, and what the data
# and the processes were. The seed may differ, and so may the runtime keys, which do not change results;
# depth and SE reduction are in the architecture's display name, so they split rows anyway.
GUARDED = [
    *MATCHED_KEYS,
    "dataset",
    "num_classes",
    "world_size",  # batch_size is per process: N processes train on batches N times as large
    "split_fingerprint",
    "data_fingerprint",
]
UNFINISHED = {tracking.RUNNING, tracking.FAILED, tracking.KILLED, "SCHEDULED"}


@dataclass
class RunRow:
    """One training run, reduced to what the table needs."""

    run_id: str
    model: str
    name: str  # display name: the architecture, with its depth and SE reduction
    train_eval_acc: float | None  # fractions in [0, 1]; None for runs logged before zar measured it
    val_acc: float
    params_total: int | None
    depth: int = 34
    hparams: dict[str, str] = field(default_factory=dict)  # GUARDED key -> canonical value
    seed: str = ""
    select: str = "last"  # which epoch's numbers: the last, or the best on the validation set
    device: str = ""  # where it trained (zar.device): "cpu", "cuda"
    all_params: dict[str, str] = field(default_factory=dict)  # every param as logged, for --group-by
    has_predictions: bool = False  # it logged its per-image validation predictions (zar.predictions)


@dataclass
class BenchRun:
    """One ``zar bench`` run: what it measured, at which settings."""

    run_id: str
    model: str
    depth: int
    image_size: str
    device: str
    se_reduction: str
    start_time: int  # ms since the epoch: the most recent match wins
    metrics: dict[str, float]


@dataclass
class Fetched:
    rows: list[RunRow]
    left_out: Counter  # reason -> count


@dataclass
class Parent:
    """A study's or sweep's parent run, read once: what its children's table is grouped by or tuned on."""

    run_id: str
    run: Any  # the MLflow run; None when there is none with this id
    missing: UserError | None = None  # why there is none: said only where the table needs the run

    @property
    def is_sweep(self) -> bool:
        return self.run is not None and self.run.data.tags.get(tracking.TAG_SWEEP) == "1"

    @property
    def vary_keys(self) -> list[str]:
        """The keys a study run varied (its ``vary`` param, e.g. 'se_reduction=2,4;lr=0.1,0.01'), to group by."""
        if self.run is None:
            raise self.missing
        spec = self.run.data.params.get("vary", "")
        return [part.partition("=")[0].strip() for part in spec.split(";") if "=" in part]

    @property
    def sequential(self) -> tuple[int, int] | None:
        """A study run with --until-decided: (seeds of its first round, --max-seeds); None otherwise."""
        if self.run is None or "max_seeds" not in self.run.data.params:
            return None
        return int(self.run.data.params["round_seeds"]), int(self.run.data.params["max_seeds"])

    @property
    def margin(self) -> float | None:
        """The --margin a study judged its comparisons with, where it logged one."""
        value = self.run.data.params.get("margin") if self.run is not None else None
        return float(value) if value else None

    @property
    def tuned_keys(self) -> list[str] | None:
        """The settings a sweep's --seeds runs take from their best trial (None: not a sweep)."""
        if not self.is_sweep:
            return None
        return [k for k in json.loads(self.run.data.params.get("space", "{}")) if k in GUARDED]


def describe_parent(run_id: str) -> Parent:
    """The parent run as MLflow has it; a missing one is no error yet, as the search for its
    children says so, naming the experiment."""
    tracking.check_reachable(create=False)
    try:
        return Parent(run_id, tracking.get_run(run_id))
    except UserError as e:
        return Parent(run_id, None, e)


def fetch_runs(
    experiment: str,
    parent: str | None = None,
    filter_string: str | None = None,
    select: str = "last",
    include_unfinished: bool = False,
) -> Fetched:
    """The runs to compare, as rows, and how many were left out for which reason."""
    if parent and not re.fullmatch(r"[\w-]+", parent):
        raise UserError(f"bad --parent {parent!r}: a run id is letters, digits, '-' and '_'")
    tracking.check_reachable(create=False)
    experiment_id = tracking.get_experiment_id(experiment, create=False)
    clauses = [tracking.children_filter(parent)] if parent else []
    if filter_string:
        clauses.append(filter_string)
    rows, left_out = [], Counter()
    for run in tracking.search_runs(experiment_id, " and ".join(clauses), user_filter=filter_string):
        if tracking.TAG_MODEL not in run.data.tags or tracking.TAG_BENCH in run.data.tags:
            continue  # a study parent, a zar bench run, or a run of another tool
        row = run_row(run, select, include_unfinished)
        if isinstance(row, RunRow):
            rows.append(row)
        else:
            left_out[row] += 1
    return Fetched(rows, left_out)


def run_row(run, select: str = "last", include_unfinished: bool = False) -> RunRow | str:
    """One training run as a row of the table, or why it is left out.

    The train accuracy is ``train_eval_acc``, measured like ``val_acc`` (eval mode, after the
    epoch); a run without it (an older zar) keeps ``None``, never its train-mode ``train_acc``.
    A NaN or infinite accuracy, or one outside [0, 1], leaves the run out: it would poison
    every mean it joined.
    """
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    if run.info.status != tracking.FINISHED and not include_unfinished:
        return run.info.status
    if select not in METRICS:
        raise UserError(f"unknown select {select!r}; valid: {', '.join(SELECT)}")
    train_key, val_key = METRICS[select]
    if val_key not in metrics:
        return "no metrics yet"
    for key in (val_key, train_key):
        value = metrics.get(key, 0.0)
        if not math.isfinite(value) or abs(value) == sys.float_info.max:  # MLflow's SQL stores keep inf so
            return f"non-finite {key}"
        if not 0 <= value <= 1:
            return f"{key} outside [0, 1]"
    hparams = {k: canonical(k, params.get(k, UNRECORDED.get(k, ""))) for k in GUARDED}
    hparams["split_fingerprint"] = tags.get(tracking.TAG_FINGERPRINT, "")
    hparams["data_fingerprint"] = tags.get(TAG_DATA_FINGERPRINT, "")
    params_total = metrics.get("params_total")
    model = tags[tracking.TAG_MODEL]
    return RunRow(
        run.info.run_id,
        model,
        tags.get(tracking.TAG_DISPLAY, model),
        metrics.get(train_key),
        metrics[val_key],
        int(params_total) if params_total is not None and math.isfinite(params_total) else None,
        int(params.get("depth", 34) or 34),
        hparams,
        params.get("seed", ""),
        select,
        _device_type(tags.get(tracking.TAG_DEVICE, "")),
        dict(params),
        tags.get(PREDICTIONS_TAG) == "1",
    )


def _device_type(device: str) -> str:
    return device.split(":")[0]


def canonical(key: str, value: str) -> str:
    """One spelling per number: 'mlflow run -P lr=1e-3' logs '1e-3' where zar logs '0.001'."""
    if FIELD_TYPES.get(key) == "float":
        try:
            return str(float(value))
        except ValueError:
            pass
    return value


def param_value(r: RunRow, key: str) -> str:
    """A run's value of any param, in its canonical spelling ('' when it has none)."""
    if key in r.hparams:
        return r.hparams[key]
    if key == "depth":
        return str(r.depth)
    if key == "seed":
        return r.seed
    return canonical(key, r.all_params.get(key, ""))


def fetch_bench(experiment: str) -> list[BenchRun]:
    """The experiment's finished ``zar bench`` runs (one per architecture and settings measured)."""
    tracking.check_reachable(create=False)
    experiment_id = tracking.get_experiment_id(experiment, create=False)
    found = tracking.search_runs(
        experiment_id, f"tags.`{tracking.TAG_BENCH}` = '1' and attributes.status = '{tracking.FINISHED}'"
    )
    return [
        BenchRun(
            run.info.run_id,
            run.data.tags.get(tracking.TAG_MODEL, ""),
            int(run.data.params.get("depth", 0) or 0),
            run.data.params.get("image_size", ""),
            _device_type(run.data.params.get("device", "")),
            run.data.params.get("se_reduction", ""),
            run.info.start_time or 0,
            dict(run.data.metrics),
        )
        for run in found
    ]


def require_rows(fetched: Fetched, experiment: str, parent: str | None, filter_string: str | None) -> None:
    """No row to compare is a mistake: say where zar looked and what it left out."""
    if not fetched.rows:
        raise UserError(
            f"no finished zar runs in experiment '{experiment}'"
            + (f" under parent {parent}" if parent else "")
            + (f" matching {filter_string!r}" if filter_string else "")
            + (f" ({describe_usage(0, fetched.left_out)})" if fetched.left_out else "")
        )


def describe_usage(used: int, left_out: Counter) -> str:
    if not left_out:
        return f"{used} runs used, none left out."
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(left_out.items()))
    hint = "; --include-unfinished counts unfinished runs" if UNFINISHED & set(left_out) else ""
    return f"{used} runs used, {sum(left_out.values())} left out ({reasons}{hint})."
