"""The statistics of the table: mean and spread of a row's runs, Welch's t against its baseline, Holm's adjustment."""

from __future__ import annotations

import statistics
import warnings

from scipy import stats

MIN_RUNS_FOR_P = 3  # per side: below it a t-test's p-value rests on too little


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean, and the sample standard deviation where there are two values or more."""
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
