"""The figures a person would otherwise save by hand: curves, confusion matrix, study charts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curve(history: Sequence[dict], key: str, title: str, path: Path) -> Path:
    """Train and validation ``key`` per epoch, as in the study's accuracy and loss plots."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
    ax.plot(epochs, [h[f"val_{key}"] for h in history], marker="o", label="validation")
    ax.set(xlabel="epoch", ylabel=key, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


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


def val_acc_per_epoch(series: dict[str, Sequence[dict]], path: Path) -> Path:
    """One line per run label: validation accuracy (%) per epoch."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, history in series.items():
        ax.plot([h["epoch"] for h in history], [100 * h["val_acc"] for h in history], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


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
