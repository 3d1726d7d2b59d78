"""Each compared row's interval and verdict, from its runs and its baseline's (zar.analysis.verdicts),
and the notes that say how they were made. Called by zar.analysis.table.build_table.

With per-image predictions on both sides (and ``--stats bootstrap``, the default) a row's interval
and p are the paired two-level bootstrap's; otherwise Welch's over the seeds, as before. A
sequential study (``zar study --until-decided``) judges each row at the look it stopped at,
against the baseline's runs of the same seeds, with O'Brien–Fleming boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..predictions import Predictions
from .fetch import RunRow
from .verdicts import (
    ALPHA,
    BOOTSTRAP_SAMPLES,
    DEFAULT_MARGIN,
    EQUIVALENCE_LEVEL,
    MEASURED_COVERAGE,
    POWER,
    STATS,
    Interval,
    decide,
    obrien_fleming,
    paired_bootstrap,
    planned_looks,
    welch_interval,
)


@dataclass(frozen=True)
class Judging:
    """How a table judges its comparisons."""

    stats: str = "bootstrap"  # or "welch": the seeds alone
    margin: float = DEFAULT_MARGIN  # δ, in points
    predictions: dict[str, Predictions] | None = None  # run id -> predictions; None: read them (per_image)
    sequential: tuple[int, int] | None = None  # a study --until-decided: (seeds of its first round, --max-seeds)

    def __post_init__(self):
        if self.stats not in STATS:
            raise UserError(f"unknown --stats {self.stats!r}; valid: {', '.join(STATS)}")
        if not 0 < self.margin < 100:
            raise UserError(f"--margin {self.margin:g}: a margin is in points of accuracy, more than 0 and under 100")


def judge(table, runs: list[RunRow], judging: Judging, holm) -> None:
    """Each compared row's interval (its CI and p), then Holm's adjustment, then its verdict."""
    by_id = {r.run_id: r for r in runs}
    predictions = judging.predictions
    if predictions is None and judging.stats == "bootstrap":
        from .per_image import fetch_predictions  # reads the network or disk: only here

        predictions = fetch_predictions(runs)
    rows = {row.name: row for row in table}
    intervals = {}
    for row in table:
        if row.val_acc_vs_baseline is None or row.is_baseline:
            continue
        mine = [by_id[i] for i in row.run_ids]
        theirs = [by_id[i] for i in rows[row.baseline].run_ids]
        if judging.sequential:  # as at the look this row stopped at: the baseline's runs of its seeds
            seeds = {r.seed for r in mine}
            theirs = [r for r in theirs if r.seed in seeds] or theirs
        iv = _interval(mine, theirs, judging.stats, predictions or {}, table.select)
        intervals[row.name] = iv
        row.method = iv.method if iv else "welch"
        if iv is not None and (iv.method == "bootstrap" or judging.sequential):
            row.val_acc_vs_baseline = iv.delta
            row.ci_low, row.ci_high = iv.ci(0.95)
            row.p_value = iv.p if min(iv.runs) >= 3 and iv.se > 0 else None
    tested = [r for r in table if r.p_value is not None]
    for r, adjusted in zip(tested, holm([r.p_value for r in tested])):
        r.p_adjusted, r.comparisons = adjusted, len(tested)
    _verdicts(table, intervals, judging, len(tested))


def _interval(mine: list[RunRow], theirs: list[RunRow], stats: str, predictions: dict, select: str) -> Interval | None:
    """The paired bootstrap where every run of both sides has predictions on one split, else Welch.

    Each side's runs in seed order: the bootstrap's draws fall on runs by position, so the order the
    store lists them in (a resumed or replaced child starts later) must not move the interval."""
    mine, theirs = sorted(mine, key=_by_seed), sorted(theirs, key=_by_seed)
    found = [predictions.get(r.run_id) for r in [*mine, *theirs]]
    if stats == "bootstrap" and min(len(mine), len(theirs)) >= 2 and all(p is not None for p in found):
        first = found[0]
        same = all(
            p.split_fingerprint == first.split_fingerprint and np.array_equal(p.y_true, first.y_true) for p in found
        )
        if same:
            correct = np.stack([p.correct(select) for p in found])
            return paired_bootstrap(correct[: len(mine)], correct[len(mine) :])
    return welch_interval([100 * r.val_acc for r in mine], [100 * r.val_acc for r in theirs])


def _by_seed(r: RunRow) -> tuple:
    return (not r.seed.isdigit(), int(r.seed) if r.seed.isdigit() else 0, r.seed, r.run_id)


def _verdicts(table, intervals: dict[str, Interval | None], judging: Judging, tested: int) -> None:
    bounds = None
    if judging.sequential:
        looks = planned_looks(*judging.sequential)
        bounds = dict(zip(looks, obrien_fleming([k / looks[-1] for k in looks], ALPHA / max(tested, 1))))
    for row in table:
        if row.name not in intervals:
            continue
        iv = intervals[row.name]
        boundary = None
        if bounds is not None and iv is not None:  # the look at or after this row's seeds
            boundary = next((c for k, c in bounds.items() if k >= min(iv.runs)), list(bounds.values())[-1])
        verdict = decide(iv, judging.margin, row.p_adjusted if iv is None or iv.se > 0 else None, boundary)
        row.verdict, row.seeds_needed = verdict.text, verdict.seeds_needed


def judging_notes(table, judging: Judging) -> list[str]:
    """How each verdict was made, and which method made each row's interval."""
    judged = [r for r in table if r.verdict]
    if not judged:
        return []
    margin, comparisons = f"{judging.margin:g}", max((r.comparisons for r in judged), default=0)
    if judging.sequential:
        looks = ", ".join(map(str, planned_looks(*judging.sequential)))
        decided = (
            f"better / worse: |z| crosses the O'Brien–Fleming boundary of the look the row stopped at (this "
            f"study looked at {looks} seeds a side; alpha {ALPHA:g} split over the comparisons by Bonferroni), "
            "each row against the baseline's runs of the same seeds"
        )
    else:
        adjusted = f", Holm-adjusted over {comparisons} comparisons" if comparisons > 1 else ""
        decided = f"better / worse: the 95% interval excludes 0 (p < {ALPHA:g}{adjusted}, from 3 runs a side)"
    notes = [
        f"Verdict: {decided}; equivalent (±{margin}): the {EQUIVALENCE_LEVEL:.0%} interval lies inside ±{margin} "
        f"points (two one-sided tests at 5%; --margin sets δ, default {DEFAULT_MARGIN:g}); otherwise undecided, "
        f"with ~N: the seeds per side that would decide it with {POWER:.0%} power were the observed difference "
        "and spread the true ones (a t-test's power, or the two one-sided tests'; the validation set's "
        "share of the variance does not shrink with seeds)."
    ]
    paired = [r.name for r in judged if r.method == "bootstrap"]
    if paired:
        coverage = ", ".join(f"{100 * c:.1f}% at {k} seeds a side" for k, c in MEASURED_COVERAGE.items())
        notes.append(
            f"Paired bootstrap for {', '.join(paired)}: [95% CI] and p from {BOOTSTRAP_SAMPLES:,} two-level "
            "resamples (each side's runs apart, the validation images jointly for both), their standard error less "
            "the images' seed noise it counts twice, in a t interval (Welch–Satterthwaite df); simulated coverage "
            f"{coverage} (tests/test_verdicts.py)."
        )
    welch = [r.name for r in judged if r.method == "welch"]
    if welch and paired:
        why = "--stats welch" if judging.stats == "welch" else "not every run logged per-image predictions"
        notes.append(f"Welch over seeds for {', '.join(welch)} ({why}): the validation set taken as fixed.")
    return notes
