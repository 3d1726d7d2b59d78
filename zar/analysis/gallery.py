"""Where an architecture and its baseline disagree: the validation images one gets right and the
other wrong, counted over the seeds both ran, with the images themselves (zar.learn.data.raw_images).

Runs are paired by seed, as the verdicts pair them, and read from each run's per-image predictions
(``val_predictions.npz``, zar.predictions) at the epoch the table reports (``select``). Runs
without predictions, or a seed only one side ran, are left out and the counts say over how many
seeds they are.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..learn.data import raw_images
from ..predictions import TAG as PREDICTIONS_TAG
from ..predictions import Predictions
from .per_image import read_predictions
from .table import TableRow

MAX_SHOWN = 12  # images a side; the count says how many more there are
THUMB_PX = 112  # a folder's photos are shrunk to this before they go into the page


@dataclass(frozen=True)
class Case:
    """One validation image where one side was right and the other wrong."""

    id: str
    true: str  # its class
    wrong_as: str  # what the wrong side predicted (the most frequent, over the seeds counted)
    seeds: int  # in how many of the paired seeds it happened


@dataclass
class Disagreement:
    row: str
    baseline: str
    select: str  # "last" or "best": the epoch whose predictions are compared
    seeds: list[str] = field(default_factory=list)  # the seeds paired
    baseline_only: list[Case] = field(default_factory=list)  # the baseline right, the row wrong
    row_only: list[Case] = field(default_factory=list)  # the row right, the baseline wrong
    images: dict[str, np.ndarray] = field(default_factory=dict)  # id -> uint8 pixels


def disagreements(rows: list[tuple[TableRow, list]], classes: list[str]) -> list[Disagreement]:
    """For each compared table row (with its MLflow runs), its disagreements with its baseline."""
    runs_of = {table_row.name: runs for table_row, runs in rows}
    every = [run for _, runs in rows for run in runs if run.data.tags.get(PREDICTIONS_TAG) == "1"]
    predictions = read_predictions([run.info.run_id for run in every])
    out = []
    for table_row, runs in rows:
        if table_row.is_baseline or table_row.baseline not in runs_of:
            continue
        found = Disagreement(table_row.name, table_row.baseline, table_row.select)
        pairs = _pairs(runs_of[table_row.baseline], runs, predictions)
        if pairs:
            found.seeds = list(pairs)
            _count(found, list(pairs.values()), classes)
            data = runs[0].data.params.get("data", "")
            shown = [c.id for c in found.baseline_only[:MAX_SHOWN] + found.row_only[:MAX_SHOWN]]
            found.images = raw_images(data, shown) if data else {}
        out.append(found)
    return out


def _pairs(base_runs, row_runs, predictions) -> dict[str, tuple[Predictions, Predictions]]:
    """seed -> (baseline's, row's) predictions over the same images in the same order."""
    base = {_seed(r): predictions.get(r.info.run_id) for r in base_runs}
    pairs = {}
    for run in sorted(row_runs, key=_seed_order):
        seed, mine = _seed(run), predictions.get(run.info.run_id)
        theirs = base.get(seed)
        if mine is None or theirs is None or mine.split_fingerprint != theirs.split_fingerprint:
            continue
        pairs[seed] = (theirs, _aligned(mine, theirs.ids))
    return pairs


def _aligned(p: Predictions, ids: np.ndarray) -> Predictions:
    if np.array_equal(p.ids, ids):
        return p
    where = {image: k for k, image in enumerate(p.ids.tolist())}
    order = np.array([where[image] for image in ids.tolist()])
    return Predictions(
        p.split_fingerprint,
        ids,
        p.y_true[order],
        {k: v[order] for k, v in p.pred.items()},
        {k: v[order] for k, v in p.p_true.items()},
        p.epochs,
    )


def _count(found: Disagreement, pairs: list[tuple[Predictions, Predictions]], classes: list[str]) -> None:
    select = found.select
    base_right = np.stack([b.correct(select) for b, _ in pairs]).astype(bool)  # seeds x images
    row_right = np.stack([r.correct(select) for _, r in pairs]).astype(bool)
    base_pred = np.stack([b.pred[select] for b, _ in pairs])
    row_pred = np.stack([r.pred[select] for _, r in pairs])
    ids, y_true = pairs[0][0].ids, pairs[0][0].y_true

    def cases(happened: np.ndarray, wrong_pred: np.ndarray) -> list[Case]:
        counts = happened.sum(0)
        out = []
        for k in np.flatnonzero(counts):
            said = Counter(wrong_pred[happened[:, k], k].tolist()).most_common(1)[0][0]
            out.append(Case(str(ids[k]), _name(classes, y_true[k]), _name(classes, said), int(counts[k])))
        return sorted(out, key=lambda c: (-c.seeds, c.id))

    found.baseline_only = cases(base_right & ~row_right, row_pred)
    found.row_only = cases(row_right & ~base_right, base_pred)


def _seed(run) -> str:
    return run.data.params.get("seed", "")


def _seed_order(run) -> tuple:
    seed = _seed(run)
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def _name(classes: list[str], k) -> str:
    k = int(k)
    return classes[k] if 0 <= k < len(classes) else str(k)


def png_data_uri(pixels: np.ndarray) -> str:
    """The image as an inline PNG, photos shrunk to THUMB_PX (small images stay as they are: the page scales them)."""
    from PIL import Image

    image = Image.fromarray(pixels)
    if max(image.size) > THUMB_PX:
        image.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
