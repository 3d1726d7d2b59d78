"""The figures a person would otherwise save by hand: curves, confusion matrix, study charts."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def literal_text(plot):
    """Text as given: class names and labels are user data, and matplotlib would read '$1_$5' in
    'price_$1_$5' as math (and fail). Set per figure, not for the process that imports zar."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return wrapper


DPI = 120
CONFUSION_WIDTH_PX = 1100  # the report's widest image (its body's max-width)
CONFUSION_FONT_PT = 9


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


@literal_text
def curve(history: Sequence[dict], key: str, title: str, path: Path) -> Path:
    """Train and validation ``key`` per epoch: the train set measured as validation is (eval mode,
    after the epoch) against validation, and the train-mode running mean over the epoch's batches
    (``train_acc``, what the study reported) dashed beside them. Accuracies in percent."""
    scale, unit = (100, " (%)") if key == "acc" else (1, "")
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    if all(np.isfinite(h.get(f"train_eval_{key}", np.nan)) for h in history):  # measured with a train_eval_set
        ax.plot(epochs, [scale * h[f"train_eval_{key}"] for h in history], marker="o", label="train (eval mode)")
    ax.plot(epochs, [scale * h[f"val_{key}"] for h in history], marker="o", label="validation")
    ax.plot(
        epochs,
        [scale * h[f"train_{key}"] for h in history],
        ls="--",
        color="0.5",
        label="train (train mode, running mean)",
    )
    ax.set(xlabel="epoch", ylabel=key + unit, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


@literal_text
def confusion_matrix(matrix: np.ndarray, labels: Sequence[str], title: str, path: Path) -> Path:
    n = len(labels)
    size = min(12, 3 + 0.5 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    if n <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black",
                )
    return _save(fig, path)


@literal_text
def val_acc_per_epoch(series: dict[str, Sequence[dict]], path: Path) -> Path:
    """One line per run label: validation accuracy (%) per epoch."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, history in series.items():
        ax.plot([h["epoch"] for h in history], [100 * h["val_acc"] for h in history], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


@literal_text
def final_val_acc_bars(names: Sequence[str], means: Sequence[float], stds: Sequence[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(len(names))
    ax.bar(x, means, yerr=[s if s == s else 0 for s in stds], capsize=6, color="tab:blue", alpha=0.8)
    ax.set(xticks=x, ylabel="validation accuracy (%)", title="Final validation accuracy")
    ax.set_xticklabels(names, rotation=20, ha="right")
    for xi, m in zip(x, means):
        ax.text(xi, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# --- the report's figures: one colour per table row, the same in every chart ---------------------------


@dataclass
class Series:
    """One table row's runs, per epoch: ``values[run][i]`` is that run's value at ``epochs[i]``."""

    label: str
    color: str
    epochs: list[int]
    values: list[list[float]]


def row_colors(labels: Sequence[str]) -> dict[str, str]:
    """A colour per table row, in the table's order: tab10, then tab20 for long tables."""
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, label in enumerate(labels)}


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs:
        ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


HATCHES = ("////", "\\\\\\\\", "||||", "----", "xxx", "....", "++")


@literal_text
def mean_band(series: Sequence[Series], ylabel: str, title: str, path: Path, scale: float = 1.0) -> Path:
    """Per row, the mean over its runs (line) and their min-max (band, where there are several)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    every = []
    for k, s in enumerate(series):
        values = scale * np.array(s.values, dtype=float)
        ax.plot(s.epochs, values.mean(0), marker="o", ms=3, color=s.color, label=f"{s.label} (n={len(values)})")
        if len(values) > 1:  # hatched and edged in its row's colour: overlapping bands stay apart
            ax.fill_between(s.epochs, values.min(0), values.max(0), facecolor=s.color, alpha=0.08, lw=0)
            ax.fill_between(s.epochs, values.min(0), values.max(0), facecolor="none", edgecolor=s.color, lw=0.8,
                            ls=":", hatch=HATCHES[k % len(HATCHES)])  # fmt: skip
        every += s.epochs
    _epoch_axis(ax, every)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


@literal_text
def losses(train: Sequence[Series], val: Sequence[Series], path: Path) -> Path:
    """Per row, the mean training loss (dashed) and validation loss (solid) over its runs."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    every = []
    for t, v in zip(train, val):
        ax.plot(t.epochs, np.mean(t.values, 0), ls="--", color=t.color, alpha=0.8)
        ax.plot(v.epochs, np.mean(v.values, 0), marker="o", ms=3, color=v.color, label=v.label)
        every += v.epochs
    _epoch_axis(ax, every)
    ax.set(ylabel="cross-entropy loss", title="Loss per epoch: validation (solid), training (dashed)")
    ax.legend(fontsize=8)
    return _save(fig, path)


@literal_text
def confusion_grid(matrices: Sequence[tuple[str, str, np.ndarray]], labels: Sequence[str], path: Path) -> Path:
    """The rows' confusion matrices side by side, each titled and framed in its row's colour."""
    n, k = len(matrices), len(labels)
    # The report shows the figure at most 1100 px wide (CONFUSION_WIDTH_PX): two matrices a row at
    # most, one when there are many classes, so that a 9 pt number is still 13 px on the page.
    cols = 1 if k > 12 else min(n, 2)
    rows = -(-n // cols)
    side = min(CONFUSION_WIDTH_PX / DPI / cols, 2.0 + 0.45 * k)
    size = CONFUSION_FONT_PT if k <= 12 else 7
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows + 0.4), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, color, matrix) in zip(axes.flat, matrices):
        ax.imshow(matrix, cmap="Blues")
        ax.set_title(title, fontsize=10, color=color)
        ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true")
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(labels, fontsize=8)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2)
        if k <= 20:
            threshold = matrix.max() / 2 if matrix.size else 0
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=size,
                            color="white" if matrix[i, j] > threshold else "black")  # fmt: skip
    return _save(fig, path)
