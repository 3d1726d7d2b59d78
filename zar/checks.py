"""What a user can get wrong that needs neither torch nor MLflow to see, each checked in one place.

The command line calls these before torch loads, so that a typo costs no wait; zar.training,
zar.study and zar.learn.data call them again for callers other than the command line.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError, UserError, clip
from .variants import Variant, get_variant

BUILT_IN_DATA = ("digits", "synthetic")


def known_model(name: str) -> Variant:
    """The architecture called ``name``; an unknown name is a user mistake listing the valid ones."""
    try:
        return get_variant(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_data_path(data: str) -> None:
    """A folder of images must exist and be a folder (what is inside is zar.learn.data's to check)."""
    if data in BUILT_IN_DATA:
        return
    root = Path(data)
    if not root.exists():
        raise DataError(f"data folder {clip(root)} does not exist; pass an image folder, 'digits' or 'synthetic'")
    if not root.is_dir():
        raise DataError(f"data path {clip(root)} is a file; pass a folder with one sub-folder per class")


def check_study(models: list[str], baseline: str, seeds: list[int] = ()) -> None:
    """Every model is an architecture, named once; seeds are not repeated; the baseline is one of the models.

    A repeated model or seed would train the same run twice and count it as two independent samples.
    """
    for model in models:
        known_model(model)
    for kind, values in (("--models", models), ("--seeds", seeds)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise UserError(f"{kind} names {clip(', '.join(repeated))} more than once; each must appear once")
    if baseline not in models:
        raise UserError(f"baseline {clip(repr(baseline))} is not among --models {clip(','.join(models))}")


def check_model_name(name: str) -> None:
    """What MLflow's Model Registry refuses in a name (mlflow.utils.validation), said before anything trains."""
    if not name.strip() or any(c in name for c in "/:") or not name.strip("."):
        raise UserError(
            f"--register {clip(repr(name))} is no registered model name: it must be non-empty, without '/' or ':'"
        )
