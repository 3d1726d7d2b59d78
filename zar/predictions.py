"""Each training run's per-image predictions on the validation set, so that runs on the same split
compare image by image (zar.analysis.verdicts pairs them).

One compressed ``val_predictions.npz`` per run: the validation images' ids and labels, and for the
last epoch and the best one the predicted class and the probability of the true class, with the
split's fingerprint to check that two runs saw the same images. The run is tagged
``zar.val_predictions`` so that a table knows which runs have one without asking for artifacts.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import tracking

ARTIFACT = "val_predictions.npz"
TAG = "zar.val_predictions"  # "1": the run logged ARTIFACT
FORMAT = 1  # bump when the arrays change meaning


@dataclass(frozen=True)
class Predictions:
    """One run's validation predictions, as read back: arrays over the same images in the same order."""

    split_fingerprint: str
    ids: np.ndarray  # the images' sample ids (str)
    y_true: np.ndarray  # int
    pred: dict[str, np.ndarray]  # "last" / "best" -> predicted class per image
    p_true: dict[str, np.ndarray]  # "last" / "best" -> probability of the true class per image
    epochs: dict[str, int]  # "last" / "best" -> which epoch

    def correct(self, select: str) -> np.ndarray:
        """1.0 where the ``select`` epoch's prediction is right, else 0.0."""
        return (self.pred[select] == self.y_true).astype(np.float64)


def log_predictions(prepared, trainer, run_id: str) -> None:
    """The last and best epochs' predictions of a finished training, as the run's ARTIFACT."""
    data, last, best = prepared.data, trainer.evaluate(), trainer.evaluate_best()
    arrays = {
        "format": np.int16(FORMAT),
        "split_fingerprint": np.str_(data.fingerprint),
        "ids": np.asarray(data.val_ids, dtype=str),
        "y_true": np.asarray(last.y_true, dtype=np.int32),
        "last_pred": np.asarray(last.y_pred, dtype=np.int32),
        "last_p_true": np.asarray(last.p_true, dtype=np.float32),
        "last_epoch": np.int32(trainer.epoch),
        "best_pred": np.asarray(best.y_pred, dtype=np.int32),
        "best_p_true": np.asarray(best.p_true, dtype=np.float32),
        "best_epoch": np.int32(trainer.best_epoch or trainer.epoch),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ARTIFACT
        np.savez_compressed(path, **arrays)
        tracking.log_artifacts_file(run_id, path)
    tracking.set_tags(run_id, {TAG: "1"})


def load_predictions(blob: bytes) -> Predictions:
    """ARTIFACT's bytes as Predictions; ValueError when they are not one zar wrote."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as f:
            if int(f["format"]) != FORMAT:
                raise ValueError(f"format {int(f['format'])}, this zar reads {FORMAT}")
            selects = ("last", "best")
            return Predictions(
                str(f["split_fingerprint"]),
                f["ids"],
                f["y_true"],
                {s: f[f"{s}_pred"] for s in selects},
                {s: f[f"{s}_p_true"] for s in selects},
                {s: int(f[f"{s}_epoch"]) for s in selects},
            )
    except (OSError, KeyError, EOFError) as e:
        raise ValueError(f"not a zar {ARTIFACT}: {e}") from None
