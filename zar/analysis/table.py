"""The table: per-run numbers turned into rows, one per architecture and settings, and the notes
that say how to read them (pure functions: the runs come from zar.analysis.fetch).

Each row holds the mean, std and count of its runs and the difference to the baseline of the
same settings, with a Welch 95% CI and a Holm-adjusted Welch t-test; rows split further by any
``group_by`` param (an ablation's varied keys) and, when given bench runs, join each row's
latency, FLOPs and memory.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ..errors import UserError
from ..variants import VARIANTS
from .bench import bench_numbers, match_bench
from .fetch import METRICS, SELECT, BenchRun, RunRow, canonical, param_value
from .grouping import as_tuned, base_name, check_group_by, differing_hparams, labels, numeric, row_key, sort_key
from .judging import Judging, judge, judging_notes
from .stats import MIN_RUNS_FOR_P, holm, mean_std, welch

DEFAULT_BASELINE = "resnet"


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
    verdict: str = ""  # better, worse, equivalent (±δ), undecided (~N seeds); "" where not compared
    seeds_needed: int | None = None  # an undecided row's estimate of the seeds per side that would decide it
    method: str = ""  # what made the CI, p and verdict: "bootstrap" (paired, per image) or "welch" (seeds)
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


def build_table(
    rows: list[RunRow],
    baseline: str | None = DEFAULT_BASELINE,
    select: str | None = None,
    group_by: list[str] | tuple[str, ...] = (),
    baseline_value: dict[str, str] | None = None,
    bench: list[BenchRun] | None = None,
    tuned: list[str] | tuple[str, ...] = (),
    judging: Judging | None = None,
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
    never within one, and do not keep a row from its baseline. ``judging``: how each comparison's
    interval and verdict are made (zar.analysis.judging; default: the paired bootstrap where runs
    logged predictions, read for those runs only).
    """
    judging = judging or Judging()
    select = _check(rows, baseline, select)
    rows = as_tuned(rows, tuned)
    baseline_value = {k: canonical(k, str(v)) for k, v in (baseline_value or {}).items()}
    group_by = list(dict.fromkeys([*group_by, *baseline_value]))
    check_group_by(rows, group_by)
    baseline = _baseline(rows, baseline, baseline_value)
    names = labels(rows, group_by)
    groups: dict[tuple, list[RunRow]] = {}
    for r in sorted(rows, key=lambda r: sort_key(r, group_by)):
        groups.setdefault(row_key(r, group_by), []).append(r)
    bases = _bases(groups, group_by, baseline, baseline_value)
    table = Table(select=select, compared=baseline is not None or bool(baseline_value), with_bench=bench is not None)
    missing_bench = []
    for key, g in groups.items():
        is_base, base_key = bases[key]
        base = (groups[base_key], names[base_key]) if base_key else None
        row = _row(g, names[key], select, base, is_base, dict(zip(group_by, key[3])))
        if bench is not None:
            matched, why = match_bench(g, bench)
            row.bench = bench_numbers(matched) if matched else None
            if matched is None:
                missing_bench.append(f"{names[key]} ({why})")
        table.append(row)
    judge(table, rows, judging, holm)  # each comparison's interval, Holm's adjustment, the verdicts
    differing = differing_hparams(rows, group_by)
    table.notes = _notes(table, differing, baseline, group_by, baseline_value, missing_bench, tuned, judging)
    return table


def _check(rows: list[RunRow], baseline: str | None, select: str | None) -> str:
    """The options a table cannot be built with, refused before any work; the --select it reads."""
    if baseline is not None and baseline not in VARIANTS:
        raise UserError(f"unknown baseline {baseline!r}; valid: {', '.join(VARIANTS)}")
    if not rows:
        raise UserError("no runs to compare")
    if select is None:
        selects = {r.select for r in rows}
        if len(selects) > 1:
            raise UserError(f"runs read with different --select: {', '.join(sorted(selects))}")
        select = selects.pop()
    if select not in METRICS:
        raise UserError(f"unknown select {select!r}; valid: {', '.join(SELECT)}")
    return select


def _baseline(rows: list[RunRow], baseline: str | None, baseline_value: dict[str, str]) -> str | None:
    """The architecture rows are compared to (None: none, or each to itself at ``baseline_value``)."""
    if baseline_value:
        for key, value in baseline_value.items():
            present = sorted({param_value(r, key) for r in rows}, key=lambda v: numeric((v,)))
            if value not in present:
                raise UserError(f"--baseline-value {key}={value}: no run has it; values present: {', '.join(present)}")
        return None
    if baseline is None:
        return DEFAULT_BASELINE if any(r.model == DEFAULT_BASELINE for r in rows) else None
    if not any(r.model == baseline for r in rows):
        present = ", ".join(dict.fromkeys(r.model for r in rows))
        raise UserError(f"baseline {baseline!r} has no runs in this table; models present: {present} (pass --baseline)")
    return baseline


def _bases(groups: dict[tuple, list[RunRow]], group_by, baseline, baseline_value) -> dict[tuple, tuple]:
    """Each row's key -> (whether it is a baseline row, the key of the row it is compared to or None)."""
    # Where each row finds the row it is compared to: same depth, settings (and, by value, architecture).
    bases: dict[tuple, tuple] = {}
    for key, g in groups.items():
        if not baseline_value and g[0].model == baseline and bases.setdefault(key[1:], key) != key:
            raise UserError(
                f"baseline {baseline} has more than one row of the same settings ({bases[key[1:]][0]}, {key[0]}): "
                "pick one with --filter, or compare each row with its own architecture by --baseline-value "
                "(e.g. se_reduction=16)"
            )
    same_arch = {}
    for key, g in groups.items():
        same_arch.setdefault((g[0].model, base_name(key[0], group_by), *key[1:]), key)
    out = {}
    for key, g in groups.items():
        if baseline_value:
            target = tuple(baseline_value.get(k, v) for k, v in zip(group_by, key[3]))
            base_key = same_arch.get((g[0].model, base_name(key[0], group_by), key[1], key[2], target))
            is_base = base_key == key
        else:
            is_base = baseline is not None and g[0].model == baseline
            base_key = bases.get(key[1:]) if baseline is not None else None
        out[key] = (is_base, None if is_base else base_key)
    return out


def _row(
    g: list[RunRow], name: str, select: str, base: tuple[list[RunRow], str] | None, is_base: bool, group: dict
) -> TableRow:
    """One row from its runs: means and spreads in percent, and the difference to ``base`` (its
    baseline row's runs and name) with Welch's CI and p."""
    train_metric, val_metric = METRICS[select]
    val = [100 * r.val_acc for r in g]
    vm, vs = mean_std(val)
    tm = ts = gm = gs = None
    note = ""
    if all(r.train_eval_acc is not None for r in g):
        train = [100 * r.train_eval_acc for r in g]
        (tm, ts), (gm, gs) = mean_std(train), mean_std([t - v for t, v in zip(train, val)])
    else:
        note = f"no {train_metric} in {sum(r.train_eval_acc is None for r in g)} of {len(g)} runs"
    delta = low = high = p = None
    if base is not None:
        base_val = [100 * r.val_acc for r in base[0]]
        delta = vm - statistics.fmean(base_val)
        low, high, p = welch(val, base_val)
    params = [r.params_total for r in g if r.params_total is not None]
    return TableRow(
        g[0].model,
        name,
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
        base[1] if base else None,
        select,
        train_metric,
        val_metric,
        note=note,
        group=group,
        run_ids=[r.run_id for r in g],
    )


# --- the notes under the table --------------------------------------------------------------------------


def _names(rows: list[TableRow]) -> str:
    return ", ".join(r.name for r in rows)


def _notes(
    table: Table,
    differing: dict[str, list[str]],
    baseline: str | None,
    group_by: list[str] = (),
    baseline_value: dict[str, str] | None = None,
    missing_bench: list[str] = (),
    tuned: list[str] | tuple[str, ...] = (),
    judging: Judging | None = None,
) -> list[str]:
    """What a reader must know to read the numbers: one sentence each."""
    notes = _reading_notes(table, differing, baseline, group_by, baseline_value)
    notes += _statistics_notes(table)
    notes += judging_notes(table, judging or Judging())
    notes += _bench_notes(table, missing_bench)
    if tuned:
        notes.append(
            f"Each architecture at its own best trial's {', '.join(tuned)} (zar sweep): rows differ in those by "
            "design, and in no other setting."
        )
    return notes


def _reading_notes(table: Table, differing, baseline, group_by, baseline_value) -> list[str]:
    """Which numbers each column holds, and what each row is compared to."""
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
    return notes


def _statistics_notes(table: Table) -> list[str]:
    """How the intervals and p-values were made, and why a row has none."""
    notes = []
    compared = [r for r in table if r.val_acc_vs_baseline is not None]
    with_ci = [r for r in compared if r.ci_low is not None]
    welch_ci = [r for r in with_ci if r.method != "bootstrap"]
    if welch_ci:
        which = "each difference" if len(welch_ci) == len(with_ci) else _names(welch_ci)
        notes.append(
            f"[95% CI]: Welch t interval (Welch–Satterthwaite df) of {which}, "
            "not adjusted for the number of comparisons."
        )
    elif with_ci:
        notes.append("[95% CI]: not adjusted for the number of comparisons.")
    tested = [r for r in compared if r.p_value is not None]
    if tested:
        test = "Welch t-test" if all(r.method != "bootstrap" for r in tested) else "t-test (method below)"
        notes.append(f"p: {test}, Holm-adjusted for {len(tested)} comparison{'s' * (len(tested) > 1)}.")
    few = [r for r in compared if r.p_value is None and min(r.runs, _base_runs(table, r)) < MIN_RUNS_FOR_P]
    if few:
        notes.append(f"p-values need at least {MIN_RUNS_FOR_P} runs per side: none for {_names(few)}.")
    constant = [r for r in compared if r.p_value is None and r not in few and r.ci_low is None]
    if constant:
        notes.append(f"No p-value for {_names(constant)}: neither side's val accuracy varies across its runs.")
    return notes


def _base_runs(table: Table, row: TableRow) -> int:
    return next(r.runs for r in table if r.name == row.baseline)


def _bench_notes(table: Table, missing_bench: list[str]) -> list[str]:
    """Where the bench columns come from, and which rows no bench run measured."""
    notes = []
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
