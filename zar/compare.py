"""The study's table from MLflow runs: fetch (one paged search), then pure functions.

``fetch_runs`` asks MLflow for training runs, ``fetch_bench`` for ``zar bench`` runs;
``build_table`` turns per-run numbers into rows, one per architecture and settings (mean, std,
count, difference to the baseline of the same settings with a Welch 95% CI and a Holm-adjusted
Welch t-test), split further by any ``group_by`` param (an ablation's varied keys) and, when
given bench runs, joined to each row's latency, FLOPs and memory; ``render`` writes the table
as Markdown, CSV, JSON or LaTeX, with the notes that say how to read it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace

from scipy import stats

from . import tracking
from .config import FIELD_TYPES, TrainConfig
from .errors import ZarError
from .tracking import runs
from .variants import VARIANTS

DEFAULT_BASELINE = "resnet"

FORMATS = ("markdown", "csv", "json", "latex")
EXTENSIONS = {"markdown": "md", "csv": "csv", "json": "json", "latex": "tex"}
SELECT = ("last", "best")
# The MLflow metrics each --select reads: (train accuracy in eval mode, val accuracy).
METRICS = {"last": ("train_eval_acc", "val_acc"), "best": ("train_eval_acc_at_best", "best_val_acc")}
TAG_DATA_FINGERPRINT = tracking.TAG_DATA_FINGERPRINT
# A config key a run did not record is one added after that run: zar ran it at the key's default,
# which every new key has kept equal to the behaviour before it (scheduler none, precision fp32...).
# A run that did not record world_size trained in one process (before torchrun support, or without it).
UNRECORDED = {f.name: str(f.default) for f in fields(TrainConfig)} | {"world_size": "1"}
# What may differ between runs of one row: the training seed, and what does not change results.
# Depth and SE reduction are in the architecture's display name, so they split rows too.
NOT_GUARDED = {"seed", "depth", "se_reduction", "device", "workers"}
GUARDED = [k for k in FIELD_TYPES if k not in NOT_GUARDED] + [
    "dataset",
    "num_classes",
    "world_size",  # batch_size is per process: N processes train on batches N times as large
    "split_fingerprint",
    "data_fingerprint",
]
MIN_RUNS_FOR_P = 3  # per side: below it a t-test's p-value rests on too little
UNFINISHED = {tracking.RUNNING, tracking.FAILED, tracking.KILLED, "SCHEDULED"}
# One pass over the characters, so that an escape is never escaped again; a bare < prints as ¡ in LaTeX.
LATEX_ESCAPES = str.maketrans(
    {
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "±": r"$\pm$",
        "<": "$<$",
        ">": "$>$",
        "–": "--",
    }
)


def columns(select: str = "last") -> list[str]:
    """The table's headers: what each number is, for this ``--select``."""
    if select == "best":
        return [
            "Model",
            "Train Acc at best epoch, eval mode (%)",
            "Best-epoch Val Acc (%), optimistic",
            "Train - Val gap at best epoch, eval mode (pp)",
            "Best-epoch Val Acc vs baseline (pp) [95% CI] (p), optimistic",
            "Params (M)",
            "Runs",
        ]
    return [
        "Model",
        "Train Acc, eval mode (%)",
        "Val Acc (%)",
        "Train - Val gap, eval mode (pp)",
        "Val Acc vs baseline (pp) [95% CI] (p)",
        "Params (M)",
        "Runs",
    ]


COLUMNS = columns("last")
# With --with-bench: the matched zar bench run's numbers, after the accuracy columns.
BENCH_COLUMNS = [
    "Latency, batch 1, median (ms) (range over bench rounds)",
    "MFLOPs/image, forward (conv+linear, 2 per MAC)",
    "Peak memory (MiB)",
]


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


@dataclass
class TableRow:
    """One architecture under one set of settings: accuracies in percent, differences in points."""

    model: str
    name: str  # display name, plus the settings that differ within the table, e.g. "ResNet-34 (lr=0.01)"
    runs: int
    train_eval_acc_mean: float | None  # None: a run of the row has no train_eval_acc (an older zar)
    train_eval_acc_std: float | None
    val_acc_mean: float
    val_acc_std: float | None
    gap_mean: float | None  # train_eval_acc - val_acc
    gap_std: float | None
    val_acc_vs_baseline: float | None
    ci_low: float | None  # Welch 95% CI of the difference, for this comparison alone
    ci_high: float | None
    p_value: float | None  # Welch t-test, raw
    p_adjusted: float | None  # Holm-adjusted over the table's ``comparisons`` p-values
    params_m: float | None
    is_baseline: bool = False
    baseline: str | None = None  # the row this one is compared to; None when none has its settings
    select: str = "last"
    train_metric: str = "train_eval_acc"  # the MLflow metrics the numbers are means of
    val_metric: str = "val_acc"
    comparisons: int = 0  # how many p-values the Holm adjustment covers
    note: str = ""  # why a number is missing
    group: dict[str, str] = field(default_factory=dict)  # --group-by key -> this row's value
    bench: dict | None = None  # with --with-bench: the matching bench run's numbers (None: none matched)
    run_ids: list[str] = field(default_factory=list, repr=False)  # the runs the row holds (not in CSV/JSON)

    @property
    def train_acc_mean(self) -> float | None:
        """The old name of ``train_eval_acc_mean``, for callers not yet renamed (not in CSV/JSON)."""
        return self.train_eval_acc_mean


class Table(list):
    """The rows, and the notes to print under them (a list of TableRow, as before).

    ``compared``: whether rows are compared to a baseline at all (False: an ablation without the
    baseline architecture); ``with_bench``: whether the bench columns are shown.
    """

    def __init__(
        self,
        rows=(),
        select: str = "last",
        notes: list[str] | None = None,
        compared: bool = True,
        with_bench: bool = False,
    ):
        super().__init__(rows)
        self.select = select
        self.notes = notes or []
        self.compared = compared
        self.with_bench = with_bench


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


def fetch_runs(
    experiment: str,
    parent: str | None = None,
    filter_string: str | None = None,
    select: str = "last",
    include_unfinished: bool = False,
) -> Fetched:
    """The runs to compare, as rows, and how many were left out for which reason."""
    if parent and not re.fullmatch(r"[\w-]+", parent):
        raise ZarError(f"bad --parent {parent!r}: a run id is letters, digits, '-' and '_'")
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


def study_vary_keys(parent: str) -> list[str]:
    """The keys a study run varied (its ``vary`` param, e.g. 'se_reduction=2,4;lr=0.1,0.01'), to group its table by."""
    spec = tracking.get_run(parent).data.params.get("vary", "")
    return [part.partition("=")[0].strip() for part in spec.split(";") if "=" in part]


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
        raise ZarError(f"unknown select {select!r}; valid: {', '.join(SELECT)}")
    train_key, val_key = METRICS[select]
    if val_key not in metrics:
        return "no metrics yet"
    for key in (val_key, train_key):
        value = metrics.get(key, 0.0)
        if not math.isfinite(value) or abs(value) == sys.float_info.max:  # MLflow's SQL stores keep inf so
            return f"non-finite {key}"
        if not 0 <= value <= 1:
            return f"{key} outside [0, 1]"
    hparams = {k: _canonical(k, params.get(k, UNRECORDED.get(k, ""))) for k in GUARDED}
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
    )


def _device_type(device: str) -> str:
    return device.split(":")[0]


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
        raise ZarError(
            f"no finished zar runs in experiment '{experiment}'"
            + (f" under parent {parent}" if parent else "")
            + (f" matching {filter_string!r}" if filter_string else "")
            + (f" ({describe_usage(0, fetched.left_out)})" if fetched.left_out else "")
        )


def check_comparable(rows: list[RunRow], strict: bool, group_by: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Why the table may mislead, as warnings; with ``strict`` the first reason refuses the table.

    Runs that differ in a guarded setting never share a row; without ``strict`` they get rows
    of their own, named by the settings that differ. A ``group_by`` key is meant to differ: it
    is never a reason.
    """
    warnings = []
    differing = differing_hparams(rows, group_by)
    if differing:
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in differing.items())
        if strict:
            raise ZarError(f"runs are not comparable, they differ in {detail}")
        warnings.append(
            f"runs differ in more than model and seed: {detail} (split into rows named by {', '.join(differing)})"
        )
    repeated = repeated_seeds(rows, group_by)
    if repeated:
        message = f"runs repeat a seed, so they are not independent samples: {', '.join(repeated)}"
        if strict:
            raise ZarError(message)
        warnings.append(f"{message} (pick them apart with --parent or --filter)")
    return warnings


def keep_in_env_run(text: str, fmt: str) -> None:
    """Under ``mlflow run -e compare``, the table is kept in the run MLflow made for it."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return
    run = runs.start(tracking.DEFAULT_EXPERIMENT, "compare")  # adopts MLflow's run
    with runs.closing(run.info.run_id, {tracking.TAG_COMPARE: "1"}):
        tracking.log_text(run.info.run_id, text, f"comparison.{EXTENSIONS[fmt]}")


def _canonical(key: str, value: str) -> str:
    """One spelling per number: 'mlflow run -P lr=1e-3' logs '1e-3' where zar logs '0.001'."""
    if FIELD_TYPES.get(key) == "float":
        try:
            return str(float(value))
        except ValueError:
            pass
    return value


def differing_hparams(rows: list[RunRow], group_by: list[str] | tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Hyperparameters that are not the same across all runs: one row must not average them.

    ``group_by`` keys are left out: rows are split by them on purpose, and labelled with them.
    """
    out = {}
    for key in (k for k in GUARDED if k not in group_by):
        values = sorted({r.hparams.get(key, "") for r in rows})
        if len(values) > 1:
            out[key] = values
    return out


def _settings(r: RunRow, group_by=()) -> tuple[str, ...]:
    return tuple(r.hparams.get(k, "") for k in GUARDED if k not in group_by)


def param_value(r: RunRow, key: str) -> str:
    """A run's value of any param, in its canonical spelling ('' when it has none)."""
    if key in r.hparams:
        return r.hparams[key]
    if key == "depth":
        return str(r.depth)
    if key == "seed":
        return r.seed
    return _canonical(key, r.all_params.get(key, ""))


def _group(r: RunRow, group_by) -> tuple[str, ...]:
    return tuple(param_value(r, k) for k in group_by)


def _key(r: RunRow, group_by=()) -> tuple:
    """What one row of the table holds: one display name, depth, set of settings and group values."""
    return (r.name, r.depth, _settings(r, group_by), _group(r, group_by))


def base_name(name: str, group_by=()) -> str:
    """The display name, less its SE reduction when the label names se_reduction itself: never twice."""
    return re.sub(r" \(r=\d+\)$", "", name) if "se_reduction" in group_by else name


def run_label(r: RunRow, group_by=()) -> str:
    """A run's name with its group values, e.g. 'SE-ResNet-34 (se_reduction=4)'."""
    shown = ", ".join(f"{k}={param_value(r, k) or 'unrecorded'}" for k in group_by)
    return f"{base_name(r.name, group_by)} ({shown})" if shown else r.name


def _labels(rows: list[RunRow], group_by=()) -> dict[tuple, str]:
    """Each row's label: its display name, plus its group values and the settings that differ within the table."""
    differing = list(differing_hparams(rows, group_by))
    labels = {}
    for r in rows:
        shown = [f"{k}={v or 'unrecorded'}" for k, v in zip(group_by, _group(r, group_by))]
        shown += [f"{k}={r.hparams.get(k, '') or 'unrecorded'}" for k in differing]
        name = base_name(r.name, group_by)
        labels[_key(r, group_by)] = f"{name} ({', '.join(shown)})" if shown else name
    repeated = {label for label, n in Counter(labels.values()).items() if n > 1}  # a name without its depth
    return {
        key: (f"{label[:-1]}, depth={key[1]})" if label.endswith(")") else f"{label} (depth={key[1]})")
        if label in repeated
        else label
        for key, label in labels.items()
    }


def repeated_seeds(rows: list[RunRow], group_by=()) -> list[str]:
    """Rows holding several runs of one seed: same config, same seed, so not independent samples."""
    labels = _labels(rows, group_by)
    counts = Counter((labels[_key(r, group_by)], r.seed) for r in rows if r.seed)
    return [f"{label} seed {seed} x{n}" for (label, seed), n in counts.items() if n > 1]


def _natural(text: str) -> tuple:
    """Numbers in text sort as numbers: 'r=4' before 'r=16'."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


def _numeric(values: tuple[str, ...]) -> tuple:
    """Group values in numeric order where they are numbers (lr 1e-05 before 0.001), else as text."""
    out = []
    for v in values:
        try:
            out.append((0, float(v), ""))
        except ValueError:
            out.append((1, 0.0, v))
    return tuple(out)


def check_group_by(rows: list[RunRow], group_by) -> None:
    """A --group-by key must be a param some run records; 'model' splits rows already."""
    for key in group_by:
        if key == "model":
            raise ZarError("--group-by model: rows are one per architecture already")
        if not any(param_value(r, key) for r in rows):
            raise ZarError(f"--group-by {key}: no run in this table records a param {key!r}")


def _order(model: str) -> int:
    order = list(VARIANTS)
    return order.index(model) if model in order else len(order)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def welch(a: list[float], b: list[float]) -> tuple[float | None, float | None, float | None]:
    """(CI low, CI high, p) of mean(a) - mean(b): Welch's t, Welch–Satterthwaite degrees of freedom.

    The 95% CI needs 2 runs a side (with 2 it is wide, as it should be); the p-value needs
    MIN_RUNS_FOR_P. Two constant samples have no spread to test against: neither.
    """
    if len(a) < 2 or len(b) < 2 or not (statistics.stdev(a) or statistics.stdev(b)):
        return None, None, None
    with warnings.catch_warnings():  # nearly equal samples: scipy warns, the numbers stand
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
        ci = result.confidence_interval(0.95)
    p = float(result.pvalue) if min(len(a), len(b)) >= MIN_RUNS_FOR_P else None
    return float(ci.low), float(ci.high), p


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: the smallest p times m, the next times m - 1, ..., kept monotone."""
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=p_values.__getitem__)):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def build_table(
    rows: list[RunRow],
    baseline: str | None = DEFAULT_BASELINE,
    select: str | None = None,
    group_by: list[str] | tuple[str, ...] = (),
    baseline_value: dict[str, str] | None = None,
    bench: list[BenchRun] | None = None,
    tuned: list[str] | tuple[str, ...] = (),
) -> Table:
    """One row per architecture and settings, in the study's order; accuracies in percent.

    Runs that differ in a guarded setting (GUARDED, depth, the data's fingerprint) or in a
    ``group_by`` param are never averaged together; a ``group_by`` key names its rows
    ("SE-ResNet-34 (se_reduction=4)"), which follow its values in numeric order. Each row is
    compared to the ``baseline`` architecture's row of the same depth, settings and group values;
    ``baseline=None`` takes resnet where it has runs, and otherwise compares no row (the column
    shows '-', and a note says why). ``baseline_value`` ({key: value}, its keys grouped by too)
    compares each row to the same architecture's row with those values and otherwise the same
    settings, in place of a baseline architecture. ``bench``: zar bench runs to join to the rows
    (None: no bench columns). ``select`` defaults to that of the runs. ``tuned``: keys each
    architecture sets for itself (a sweep's best configurations): they may differ between rows,
    never within one, and do not keep a row from its baseline.
    """
    if baseline is not None and baseline not in VARIANTS:
        raise ZarError(f"unknown baseline {baseline!r}; valid: {', '.join(VARIANTS)}")
    if not rows:
        raise ZarError("no runs to compare")
    if select is None:
        selects = {r.select for r in rows}
        if len(selects) > 1:
            raise ZarError(f"runs read with different --select: {', '.join(sorted(selects))}")
        select = selects.pop()
    if select not in METRICS:
        raise ZarError(f"unknown select {select!r}; valid: {', '.join(SELECT)}")
    rows = _as_tuned(rows, tuned)
    baseline_value = {k: _canonical(k, str(v)) for k, v in (baseline_value or {}).items()}
    group_by = list(dict.fromkeys([*group_by, *baseline_value]))
    check_group_by(rows, group_by)
    if baseline_value:
        baseline = None
        for key, value in baseline_value.items():
            present = sorted({param_value(r, key) for r in rows}, key=lambda v: _numeric((v,)))
            if value not in present:
                raise ZarError(f"--baseline-value {key}={value}: no run has it; values present: {', '.join(present)}")
    elif baseline is None:
        baseline = DEFAULT_BASELINE if any(r.model == DEFAULT_BASELINE for r in rows) else None
    elif not any(r.model == baseline for r in rows):
        present = ", ".join(dict.fromkeys(r.model for r in rows))
        raise ZarError(f"baseline {baseline!r} has no runs in this table; models present: {present} (pass --baseline)")
    labels = _labels(rows, group_by)
    groups: dict[tuple, list[RunRow]] = {}
    for r in sorted(rows, key=lambda r: _sort_key(r, group_by)):
        groups.setdefault(_key(r, group_by), []).append(r)
    # Where each row finds the row it is compared to: same depth, settings (and, by value, architecture).
    bases = {key[1:]: key for key, g in groups.items() if g[0].model == baseline}
    same_arch = {}
    for key, g in groups.items():
        same_arch.setdefault((g[0].model, base_name(key[0], group_by), *key[1:]), key)
    train_metric, val_metric = METRICS[select]

    table = Table(select=select, compared=baseline is not None or bool(baseline_value), with_bench=bench is not None)
    missing_bench = []
    for key, g in groups.items():
        val = [100 * r.val_acc for r in g]
        vm, vs = _mean_std(val)
        tm = ts = gm = gs = None
        note = ""
        if all(r.train_eval_acc is not None for r in g):
            train = [100 * r.train_eval_acc for r in g]
            (tm, ts), (gm, gs) = _mean_std(train), _mean_std([t - v for t, v in zip(train, val)])
        else:
            note = f"no {train_metric} in {sum(r.train_eval_acc is None for r in g)} of {len(g)} runs"
        if baseline_value:
            target = tuple(baseline_value.get(k, v) for k, v in zip(group_by, key[3]))
            base_key = same_arch.get((g[0].model, base_name(key[0], group_by), key[1], key[2], target))
            is_base = base_key == key
        else:
            is_base = baseline is not None and g[0].model == baseline
            base_key = bases.get(key[1:]) if baseline is not None else None
        base_key = None if is_base else base_key
        delta = low = high = p = None
        if base_key is not None:
            base_val = [100 * r.val_acc for r in groups[base_key]]
            delta = vm - statistics.fmean(base_val)
            low, high, p = welch(val, base_val)
        params = [r.params_total for r in g if r.params_total is not None]
        matched = None
        if bench is not None:
            matched, why = match_bench(g, bench)
            if matched is None:
                missing_bench.append(f"{labels[key]} ({why})")
        table.append(
            TableRow(
                g[0].model,
                labels[key],
                len(g),
                tm,
                ts,
                vm,
                vs,
                gm,
                gs,
                delta,
                low,
                high,
                p,
                None,
                statistics.fmean(params) / 1e6 if params else None,
                is_base,
                labels[base_key] if base_key else None,
                select,
                train_metric,
                val_metric,
                note=note,
                group=dict(zip(group_by, key[3])),
                bench=_bench_numbers(matched) if matched else None,
                run_ids=[r.run_id for r in g],
            )
        )
    tested = [r for r in table if r.p_value is not None]
    for r, adjusted in zip(tested, holm([r.p_value for r in tested])):
        r.p_adjusted, r.comparisons = adjusted, len(tested)
    table.notes = _notes(table, differing_hparams(rows, group_by), baseline, group_by, baseline_value, missing_bench)
    if tuned:
        table.notes.append(
            f"Each architecture at its own best trial's {', '.join(tuned)} (zar sweep): rows differ in those by "
            "design, and in no other setting."
        )
    return table


def _as_tuned(rows: list[RunRow], tuned) -> list[RunRow]:
    """Rows whose ``tuned`` settings no longer split them from their baseline; each architecture must have one."""
    if not tuned:
        return rows
    for model in dict.fromkeys(r.model for r in rows):
        settings = {tuple(param_value(r, k) for k in tuned) for r in rows if r.model == model}
        if len(settings) > 1:
            raise ZarError(f"runs of {model} differ in {', '.join(tuned)}: a row must hold one configuration")
    return [replace(r, hparams={k: "tuned" if k in tuned else v for k, v in r.hparams.items()}) for r in rows]


def _sort_key(r: RunRow, group_by) -> tuple:
    """The study's order of architectures, then depth, then group values and SE reduction as numbers, then the rest."""
    name = base_name(r.name, ["se_reduction"])  # 'SE-ResNet-34 (r=4)' before 'SE-ResNet-34' (r=16)
    by_number = _numeric((*_group(r, group_by), param_value(r, "se_reduction")))
    return (_order(r.model), r.depth, _natural(name), by_number, _natural(r.name), _settings(r))


# --- the bench join -------------------------------------------------------------------------------------


def match_bench(runs_of_row: list[RunRow], bench: list[BenchRun]) -> tuple[BenchRun | None, str]:
    """The most recent bench run of the row's architecture, depth, image size and device (and SE
    reduction, for an architecture with SE); else None and the settings no bench run measured."""
    first = runs_of_row[0]
    devices = sorted({r.device for r in runs_of_row})
    image_size = param_value(first, "image_size")
    variant = VARIANTS.get(first.model)
    uses_se = variant is None or variant.attn == "se"
    se_reduction = param_value(first, "se_reduction") if uses_se else None
    wanted = f"{first.model}, depth {first.depth}, image_size {image_size or 'unrecorded'}"
    wanted += f", se_reduction {se_reduction or 'unrecorded'}" if uses_se else ""
    if len(devices) > 1:
        return None, f"{wanted}: its runs trained on {', '.join(d or 'unrecorded' for d in devices)}"
    wanted += f", device {devices[0] or 'unrecorded'}"
    candidates = [
        b
        for b in bench
        if (b.model, b.depth, b.image_size, b.device) == (first.model, first.depth, image_size, devices[0])
        and (not uses_se or b.se_reduction == se_reduction)
    ]
    if not candidates:
        return None, wanted
    return max(candidates, key=lambda b: b.start_time), wanted


def _bench_numbers(b: BenchRun) -> dict:
    """What the table shows of a bench run: latency, FLOPs, memory (RSS on CPU, allocated on CUDA)."""
    memory = b.metrics.get("cuda_peak_mb") if b.device == "cuda" else b.metrics.get("peak_rss_mb")
    return {
        "run_id": b.run_id,
        "device": b.device,
        "latency_ms_median": b.metrics.get("latency_ms_median"),
        "latency_ms_p90": b.metrics.get("latency_ms_p90"),
        "latency_ms_median_min": b.metrics.get("latency_ms_median_min"),
        "latency_ms_median_max": b.metrics.get("latency_ms_median_max"),
        "flops_per_image": b.metrics.get("flops_per_image"),
        "peak_memory_mb": memory,
    }


BENCH_KEYS = (
    "run_id",
    "device",
    "latency_ms_median",
    "latency_ms_p90",
    "latency_ms_median_min",
    "latency_ms_median_max",
    "flops_per_image",
    "peak_memory_mb",
)


def _names(rows: list[TableRow]) -> str:
    return ", ".join(r.name for r in rows)


def _notes(
    table: Table,
    differing: dict[str, list[str]],
    baseline: str | None,
    group_by: list[str] = (),
    baseline_value: dict[str, str] | None = None,
    missing_bench: list[str] = (),
) -> list[str]:
    """What a reader must know to read the numbers: one sentence each."""
    train_metric, val_metric = METRICS[table.select]
    notes = []
    if table.select == "best":
        notes.append(
            f"optimistic: --select best reports each run's epoch of highest val_acc ({val_metric}), chosen on "
            "the validation set itself, so these val accuracies and their differences lean high; "
            "--select last does not choose."
        )
    missing = [r for r in table if r.train_eval_acc_mean is None]
    if missing:
        notes.append(
            f"n/a: some runs of {_names(missing)} were logged before zar measured {train_metric} (train accuracy "
            f"in eval mode); their train-mode train_acc would not compare like with {val_metric}, so the row "
            "shows no train accuracy."
        )
    if baseline_value:
        target = ", ".join(f"{k}={v}" for k, v in baseline_value.items())
        target = f"the row of the same architecture with {target} and otherwise the same depth and settings"
    else:
        target = f"the {baseline} row of the same depth and settings"
    if group_by or differing:
        head = f"Rows are split by {', '.join([*group_by, *differing])}" if group_by else "Runs differ in"
        head = head if group_by else f"{head} {', '.join(differing)}"
        tail = f", and is compared to {target}" if table.compared else ""
        notes.append(f"{head}: a row averages only runs with the same settings{tail}.")
    if not table.compared:
        notes.append(
            f"-: no row is compared to a baseline, as this table has no {DEFAULT_BASELINE} runs; pass --baseline "
            "MODEL to compare architectures, or --baseline-value KEY=V to compare each architecture with "
            "itself at KEY=V."
        )
    compared = [r for r in table if r.val_acc_vs_baseline is not None]
    if any(r.ci_low is not None for r in compared):
        notes.append(
            "[95% CI]: Welch t interval (Welch–Satterthwaite df) of each difference, "
            "not adjusted for the number of comparisons."
        )
    tested = [r for r in compared if r.p_value is not None]
    if tested:
        notes.append(f"p: Welch t-test, Holm-adjusted for {len(tested)} comparison{'s' * (len(tested) > 1)}.")
    few = [r for r in compared if r.p_value is None and min(r.runs, _base_runs(table, r)) < MIN_RUNS_FOR_P]
    if few:
        notes.append(f"p-values need at least {MIN_RUNS_FOR_P} runs per side: none for {_names(few)}.")
    constant = [r for r in compared if r.p_value is None and r not in few and r.ci_low is None]
    if constant:
        notes.append(f"No p-value for {_names(constant)}: neither side's val accuracy varies across its runs.")
    if table.with_bench:
        notes.append(
            "Bench columns: the most recent finished 'zar bench' run of the row's architecture, depth, image size "
            "and device (and SE reduction); latency is per image at batch 1, the median of the bench's rounds, "
            "with their range: latencies whose ranges overlap are not told apart by that bench; FLOPs count "
            "convolutions and linear layers only (a multiply-add is 2); peak memory is the bench process's RSS "
            "high-water mark on CPU, torch.cuda.max_memory_allocated on CUDA."
        )
    if missing_bench:
        notes.append(
            f"n/a (bench): no bench run for {'; '.join(missing_bench)}; 'zar bench' with those settings measures it."
        )
    return notes


def _base_runs(table: Table, row: TableRow) -> int:
    return next(r.runs for r in table if r.name == row.baseline)


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _pm(mean: float | None, std: float | None, pm: str = "±", signed: bool = False) -> str:
    text = _num(mean, signed)
    return text if mean is None or std is None else f"{text} {pm} {std:.2f}"


def _delta(row: TableRow, compared: bool = True) -> str:
    if not compared:
        return "-"
    if row.is_baseline:
        return "baseline"
    if row.val_acc_vs_baseline is None:
        return "no baseline with these settings"
    text = f"{row.val_acc_vs_baseline:+.2f}"
    if row.ci_low is not None:
        text += f" [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"
    p = row.p_adjusted if row.p_adjusted is not None else row.p_value
    if p is None:
        return text
    return f"{text} (p<0.001)" if p < 0.001 else f"{text} (p={p:.3f})"


def _cells(row: TableRow, pm: str = "±", compared: bool = True, with_bench: bool = False) -> list[str]:
    cells = [
        row.name,
        _pm(row.train_eval_acc_mean, row.train_eval_acc_std, pm),
        _pm(row.val_acc_mean, row.val_acc_std, pm),
        _pm(row.gap_mean, row.gap_std, pm, signed=True),
        _delta(row, compared),
        _num(row.params_m),
        str(row.runs),
    ]
    if with_bench:
        b = row.bench or {}
        cells += [
            _latency(b),
            _fmt(b.get("flops_per_image"), "{:,.1f}", 1e-6),
            _fmt(b.get("peak_memory_mb"), "{:,.0f}"),
        ]
    return cells


def _latency(b: dict) -> str:
    """The bench's median latency, with the range of its rounds' medians when they differ: the
    machine's noise, next to the differences between architectures it may explain."""
    text = _fmt(b.get("latency_ms_median"), "{:.2f}")
    low, high = b.get("latency_ms_median_min"), b.get("latency_ms_median_max")
    if low is not None and high is not None and f"{low:.2f}" != f"{high:.2f}":
        text += f" ({low:.2f}-{high:.2f})"
    return text


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None or not math.isfinite(value) else spec.format(value * scale)


def _csv_record(row: TableRow, with_bench: bool) -> dict:
    """A row as CSV wants it: one column per group key and, with bench, per bench number."""
    record = asdict(row)
    group, bench = record.pop("group"), record.pop("bench")
    record.pop("run_ids")
    for key, value in group.items():
        record[f"param.{key}" if key in record else key] = value
    if with_bench:
        record.update({f"bench_{k}": (bench or {}).get(k) for k in BENCH_KEYS})
    return record


def _latex(text: str) -> str:
    """Text as LaTeX prints it: special characters escaped, and '--select' not turned into a dash."""
    return "-{}-".join(part.translate(LATEX_ESCAPES) for part in text.split("--"))


def render(table: list[TableRow], fmt: str = "markdown") -> str:
    """The table as Markdown or LaTeX (notes under it), or CSV or JSON (the metrics named in each row)."""
    if fmt not in FORMATS:
        raise ZarError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    select = getattr(table, "select", table[0].select if table else "last")
    notes = getattr(table, "notes", [])
    compared, with_bench = getattr(table, "compared", True), getattr(table, "with_bench", False)
    headers = columns(select) + (BENCH_COLUMNS if with_bench else [])
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "| --- | " + " | ".join([":-:"] * (len(headers) - 1)) + " |"]
        lines += ["| " + " | ".join(_cells(r, "±", compared, with_bench)) + " |" for r in table]
        return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
    if fmt == "csv":
        records = [_csv_record(r, with_bench) for r in table]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buf.getvalue()
    if fmt == "json":
        records = [{k: v for k, v in asdict(r).items() if k != "run_ids"} for r in table]
        return json.dumps(records, indent=2) + "\n"
    lines = [
        r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}",
        r"\hline",
        " & ".join(map(_latex, headers)) + r" \\",
        r"\hline",
    ]
    lines += [" & ".join(map(_latex, _cells(r, "±", compared, with_bench))) + r" \\" for r in table]
    lines += [r"\hline", r"\end{tabular}"]
    if notes:  # in a group of its own, so that the small type ends with them
        lines += [r"\par{\footnotesize"] + [_latex(n) + r"\par" for n in notes] + ["}"]
    return "\n".join(lines) + "\n"


@dataclass
class Comparison:
    """What ``zar compare`` prints, before it is rendered: the table, the runs behind it, the warnings."""

    table: Table
    fetched: Fetched
    warnings: list[str]
    group_by: list[str]
    experiment: str
    parent: str | None

    @property
    def usage(self) -> str:
        return describe_usage(len(self.fetched.rows), self.fetched.left_out)


def comparison(
    experiment: str,
    parent: str | None = None,
    filter_string: str | None = None,
    baseline: str | None = None,
    group_by: list[str] | tuple[str, ...] = (),
    baseline_value: dict[str, str] | None = None,
    with_bench: bool = False,
    select: str = "last",
    include_unfinished: bool = False,
    strict: bool = False,
) -> Comparison:
    """The table of ``zar compare`` with these options; ``zar report`` builds on the same one.

    With ``parent`` a sweep's run, its --seeds runs, each architecture at its best trial; with a
    study's run, a row per value of what that study varied (unless ``group_by`` says otherwise).
    """
    from . import trials  # trials builds on this module

    baseline_value = baseline_value or {}
    tuned = trials.sweep_keys(parent) if parent else None
    if tuned is not None:
        rerun = f"tags.`{trials.TAG_RERUN_OF}` LIKE '%'"
        filter_string = f"{filter_string} and {rerun}" if filter_string else rerun
    fetched = fetch_runs(experiment, parent, filter_string, select, include_unfinished)
    if tuned is not None and not fetched.rows:
        raise ZarError(
            f"sweep {parent} has no --seeds runs to compare; 'zar compare --parent {parent} --select best-trial' "
            "prints its best trials"
        )
    require_rows(fetched, experiment, parent, filter_string)
    group_by = list(group_by)
    if parent and not group_by:  # an ablation's table, as the study printed it: a row per varied value
        group_by = study_vary_keys(parent)
    grouped = list(dict.fromkeys([*group_by, *baseline_value]))
    check_group_by(fetched.rows, grouped)
    warnings = check_comparable(fetched.rows, strict, [*grouped, *(tuned or ())])  # those are meant to differ
    bench = fetch_bench(experiment) if with_bench else None
    table = build_table(
        fetched.rows, baseline, group_by=group_by, baseline_value=baseline_value, bench=bench, tuned=tuned or ()
    )
    return Comparison(table, fetched, warnings, group_by, experiment, parent)


def describe_usage(used: int, left_out: Counter) -> str:
    if not left_out:
        return f"{used} runs used, none left out."
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(left_out.items()))
    hint = "; --include-unfinished counts unfinished runs" if UNFINISHED & set(left_out) else ""
    return f"{used} runs used, {sum(left_out.values())} left out ({reasons}{hint})."
