"""What a user can get wrong that needs neither torch nor MLflow to see, each checked in one place.

The command line calls these before torch loads, so that a typo costs no wait; zar.train,
zar.study and zar.data call them again for callers other than the command line.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError, ZarError
from .variants import Variant, get_variant

BUILT_IN_DATA = ("digits", "synthetic")


def known_model(name: str) -> Variant:
    """The architecture called ``name``; an unknown name is a user mistake listing the valid ones."""
    try:
        return get_variant(name)
    except ValueError as e:
        raise ZarError(str(e)) from None


def check_data_path(data: str) -> None:
    """A folder of images must exist and be a folder (what is inside is zar.data's to check)."""
    if data in BUILT_IN_DATA:
        return
    root = Path(data)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass an image folder, 'digits' or 'synthetic'")
    if not root.is_dir():
        raise DataError(f"data path {root} is a file; pass a folder with one sub-folder per class")


def check_study(models: list[str], baseline: str) -> None:
    """Every model is an architecture, and the baseline is one of them."""
    for model in models:
        known_model(model)
    if baseline not in models:
        raise ZarError(f"baseline {baseline!r} is not among --models {','.join(models)}")
