"""The verdict of one comparison: ``better``, ``worse``, ``equivalent (±δ)`` or ``undecided`` (with
the seeds per side that would decide it), from an interval that sees both sources of noise.

``paired_bootstrap``: two levels, the runs (training seeds) of each side resampled apart, the
validation images resampled once for both sides, so that an image's difficulty cancels. Its
standard error makes a t interval with Welch–Satterthwaite degrees of freedom over the seed and
image components: a percentile bootstrap over 3 seeds covers less than it claims (a resample of 3
values is narrower than the spread it stands for), so each side's deviations from its mean are
first scaled by sqrt(k / (k - 1)) and the t quantile replaces the normal one.
tests/test_verdicts.py measures the coverage by simulation (MEASURED_COVERAGE holds its figures).
``welch_interval``: the seeds alone, for runs without per-image predictions.

Pure numpy and scipy: the arrays come from zar.analysis.per_image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

STATS = ("bootstrap", "welch")
ALPHA = 0.05  # better / worse: the 95% interval (Holm-adjusted p) excludes 0
EQUIVALENCE_LEVEL = 0.90  # equivalent: the 90% interval lies inside ±margin (two one-sided tests at 5%)
POWER = 0.80  # the seed estimate: seeds per side that decide the comparison with this probability
DEFAULT_MARGIN = 1.0  # points of val accuracy
BOOTSTRAP_SAMPLES = 2000
MIN_SEEDS = 3  # per side for better / worse, as for any p-value (zar.analysis.stats.MIN_RUNS_FOR_P)
MAX_SEEDS_ESTIMATE = 200  # beyond it the estimate says "more than"
BOOTSTRAP_SEED = 0  # the same runs give the same interval every time
# Simulated coverage of the 95% interval, by seeds per side (tests/test_verdicts.py measures it
# again and fails if these no longer hold): 2,000 simulated comparisons each, true difference +1 point.
MEASURED_COVERAGE = {3: 0.968, 5: 0.960}


@dataclass(frozen=True)
class Interval:
    """A difference in points with its standard error, degrees of freedom and noise components."""

    delta: float
    se: float
    df: float
    image_var: float  # the share of se² (points²) that more seeds would not shrink: the validation set's; 0 for Welch
    runs: tuple[int, int]  # seeds per side
    method: str  # "bootstrap" or "welch"

    def se_at(self, seeds: np.ndarray) -> np.ndarray:
        """The standard error with ``seeds`` per side: the seeds' share falls as 1 / seeds."""
        now = 2 / (1 / self.runs[0] + 1 / self.runs[1])
        return np.sqrt((self.se**2 - self.image_var) * now / seeds + self.image_var)

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        half = float(stats.t.ppf((1 + level) / 2, self.df)) * self.se if self.se > 0 else 0.0
        return self.delta - half, self.delta + half

    @property
    def p(self) -> float:
        if self.se == 0:
            return 1.0 if self.delta == 0 else 0.0
        return float(2 * stats.t.sf(abs(self.delta) / self.se, self.df))

    @property
    def z(self) -> float:
        """The t statistic on the normal scale (the same one-sided p), for sequential boundaries."""
        if self.se == 0:
            return 0.0 if self.delta == 0 else math.copysign(math.inf, self.delta)
        return float(math.copysign(stats.norm.isf(stats.t.sf(abs(self.delta) / self.se, self.df)), self.delta))


@dataclass(frozen=True)
class Verdict:
    text: str  # what the cell shows: "better", "equivalent (±1.0)", "undecided (~12 seeds)"
    word: str  # better, worse, equivalent, undecided
    seeds_needed: int | None = None  # per side, for an undecided one (None: none estimated)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, rng=None) -> Interval:
    """The interval of mean(a) - mean(b) in points; ``a`` (seeds_a x images) and ``b`` (seeds_b x
    images) hold 1 where a run classified an image right, over the same images in the same order."""
    a, b = np.asarray(a, dtype=np.float64)[None], np.asarray(b, dtype=np.float64)[None]
    return bootstrap_batch(a, b, samples, rng)[0]


def bootstrap_batch(a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, rng=None) -> list[Interval]:
    """``paired_bootstrap`` of many comparisons at once: ``a`` (batch x seeds_a x images), ``b`` likewise."""
    rng = np.random.default_rng(BOOTSTRAP_SEED) if rng is None else rng
    (batch, ka, n), kb = a.shape, b.shape[1]
    # One set of resamples for the whole batch (each comparison's bootstrap is still a bootstrap):
    # images drawn once for both sides, and the mean over them taken before the runs' weights.
    images = rng.multinomial(n, np.full(n, 1 / n), size=samples) / n  # samples x images
    boot = _resampled(a, images, rng) - _resampled(b, images, rng)  # batch x samples
    per_image = a.mean(axis=1) - b.mean(axis=1)  # batch x images
    delta = 100 * per_image.mean(axis=1)
    va = 1e4 * a.mean(axis=2).var(axis=1, ddof=1) / ka  # the seeds' share of the variance, each side
    vb = 1e4 * b.mean(axis=2).var(axis=1, ddof=1) / kb
    vi = 1e4 * per_image.var(axis=1, ddof=1) / n  # the images' share, with the seeds fixed
    # Each image's seed-to-seed noise is drawn twice, by both levels (McCullagh 2000 on crossed designs):
    # once subtracted, it leaves the images' own share of vi, which stays with any number of seeds.
    within = 1e4 * (a.var(axis=1, ddof=1).mean(axis=1) / ka + b.var(axis=1, ddof=1).mean(axis=1) / kb) / n
    se = np.sqrt(np.maximum(1e4 * boot.var(axis=1, ddof=1) - 2 * within, va + vb))
    fixed = np.clip(vi - within, 0, se**2)
    # The images' share is measured through the seeds' means: it has their degrees of freedom, not the images'.
    df = _satterthwaite([(va, ka - 1), (vb, kb - 1), (fixed, ka + kb - 2)])
    return [
        Interval(float(delta[i]), float(se[i]), float(df[i]), float(fixed[i]), (ka, kb), "bootstrap")
        for i in range(batch)
    ]


def _resampled(x: np.ndarray, images: np.ndarray, rng) -> np.ndarray:
    """Each resample's mean over ``images`` (its weights) and over a resample of the runs, after
    scaling the runs' deviations from their mean by sqrt(k / (k - 1)): batch x samples."""
    k = x.shape[1]
    centre = x.mean(axis=1, keepdims=True)
    x = centre + math.sqrt(k / (k - 1)) * (x - centre)
    runs = rng.multinomial(k, np.full(k, 1 / k), size=len(images)) / k  # samples x runs
    per_run = x @ images.T  # batch x runs x samples: each run's accuracy on each resample of images
    return np.einsum("bks,sk->bs", per_run, runs)


def _satterthwaite(parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
    total = sum(v for v, _ in parts)
    spread = sum(np.divide(v**2, d) for v, d in parts if d > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(spread > 0, total**2 / np.where(spread > 0, spread, 1), 1e9)


def welch_interval(a: list[float], b: list[float]) -> Interval | None:
    """The seeds alone (values in points): Welch's interval; None below 2 runs a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = float(_satterthwaite([(np.float64(va), len(a) - 1), (np.float64(vb), len(b) - 1)]))
    delta = float(np.mean(a) - np.mean(b))
    return Interval(delta, float(math.sqrt(va + vb)), df, 0.0, (len(a), len(b)), "welch")


def decide(iv: Interval | None, margin: float, p_adjusted: float | None, boundary: float | None = None) -> Verdict:
    """The verdict, with the seeds per side that would decide an undecided one (``classify`` says which)."""
    if iv is None:
        return Verdict("undecided (needs 2 runs a side)", "undecided")
    word = classify(iv, margin, p_adjusted, boundary)
    if word in ("better", "worse"):
        return Verdict(word, word)
    if word == "equivalent":
        return Verdict(f"equivalent (±{margin:g})", word)
    needed = seeds_needed(iv, margin)
    if needed is None:
        return Verdict("undecided (seeds alone cannot decide: too few validation images)", word)
    if needed > MAX_SEEDS_ESTIMATE:
        return Verdict(f"undecided (>{MAX_SEEDS_ESTIMATE} seeds)", word, needed)
    return Verdict(f"undecided (~{needed} seeds)", word, needed)


def classify(iv: Interval, margin: float, p_adjusted: float | None, boundary: float | None = None) -> str:
    """better / worse when the (Holm-adjusted) p is under ALPHA, or, in a sequential study, when |z|
    crosses its look's ``boundary`` (MIN_SEEDS a side at least); equivalent when the 90% interval
    lies inside ±margin; else undecided."""
    if min(iv.runs) >= MIN_SEEDS:
        crossed = abs(iv.z) >= boundary if boundary is not None else p_adjusted is not None and p_adjusted < ALPHA
        if crossed:
            return "better" if iv.delta > 0 else "worse"
    low, high = iv.ci(EQUIVALENCE_LEVEL)
    return "equivalent" if -margin < low and high < margin else "undecided"


def seeds_needed(iv: Interval, margin: float) -> int | None:
    """Seeds per side at which, were the true difference and spread what this comparison observed,
    it would be decided with probability POWER: a t-test's power (scipy's noncentral t) for better / worse,
    two one-sided tests' for equivalence; whichever needs fewer. The validation set's share of the
    variance does not shrink with seeds: None when it alone keeps the comparison undecided."""
    if iv.se == 0:
        return MIN_SEEDS
    k = np.arange(MIN_SEEDS, MAX_SEEDS_ESTIMATE + 1, dtype=np.float64)
    se = iv.se_at(k)
    difference = np.zeros_like(k)
    if iv.delta != 0:  # a two-sided t-test's power: the noncentral t beyond the critical values
        df, noncentrality = 2 * k - 2, abs(iv.delta) / se
        critical = stats.t.isf(ALPHA / 2, df)
        difference = stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality)
    equivalence = _equivalence_power(iv.delta, margin, se, 2 * k - 2)
    decided = np.flatnonzero((difference >= POWER) | (equivalence >= POWER))
    if decided.size:
        return int(k[decided[0]])
    # With endless seeds only the validation set's variance is left: could that decide it?
    rest = math.sqrt(iv.image_var)
    z_needed = stats.norm.isf(ALPHA / 2) + stats.norm.ppf(POWER)
    by_difference = rest > 0 and abs(iv.delta) / rest > z_needed
    by_equivalence = rest == 0 or _equivalence_power(iv.delta, margin, np.array([rest]), np.array([1e9]))[0] >= POWER
    return MAX_SEEDS_ESTIMATE + 1 if by_difference or by_equivalence else None


def _equivalence_power(delta: float, margin: float, se: np.ndarray, df: np.ndarray) -> np.ndarray:
    """The probability that both one-sided tests reject at the observed difference (t approximation)."""
    quantile = stats.t.ppf(EQUIVALENCE_LEVEL, df)
    upper = stats.t.cdf((margin - abs(delta)) / se - quantile, df)
    lower = stats.t.cdf((margin + abs(delta)) / se - quantile, df)
    return np.clip(upper + lower - 1, 0, 1)


def obrien_fleming(fractions: list[float], alpha: float = ALPHA, paths: int = 200_000) -> list[float]:
    """Two-sided O'Brien–Fleming boundaries on the z scale at these information fractions (seeds so
    far / planned), so that crossing one at any look has probability ``alpha`` under no difference.
    The constant is the 1 - alpha quantile of max_j |W(t_j)| over the looks, by a fixed simulation
    of Brownian paths (the z statistics of a growing sample have independent increments)."""
    t = np.asarray(fractions, dtype=np.float64)
    steps = np.diff(np.concatenate([[0.0], t]))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    walk = np.cumsum(rng.standard_normal((paths, len(t))) * np.sqrt(steps), axis=1)
    constant = float(np.quantile(np.abs(walk).max(axis=1), 1 - alpha))
    return [constant / math.sqrt(f) for f in t]


def planned_looks(first: int, max_seeds: int) -> list[int]:
    """Seeds per side at each look: ``first``, then ``first`` more each round, the last at ``max_seeds``."""
    looks = list(range(first, max_seeds + 1, first))
    return looks if looks[-1] == max_seeds else [*looks, max_seeds]
