"""Per-image predictions of the runs a table compares: read in parallel, cached locally by run id.

Only runs tagged ``zar.val_predictions`` are read (a table of runs without them reads nothing).
A finished run's artifacts never change, so each file is kept under
``$ZAR_CACHE_DIR/predictions/<run id>.npz`` (default ``~/.cache/zar``) and read from there next time.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import tracking
from ..learn import imagecache
from ..predictions import ARTIFACT, Predictions, load_predictions
from .fetch import RunRow

THREADS = 8  # downloads from a tracking server wait on the network, not the CPU


def cache_dir() -> Path:
    """Beside the image cache, under the one cache root zar has ($ZAR_CACHE_DIR, else ~/.cache/zar)."""
    return imagecache.cache_dir().parent / "predictions"


def fetch_predictions(rows: list[RunRow]) -> dict[str, Predictions]:
    """run id -> its Predictions, for the rows that logged them (a file unreadable is left out)."""
    return read_predictions([r.run_id for r in rows if r.has_predictions])


def read_predictions(wanted: list[str]) -> dict[str, Predictions]:
    """run id -> its Predictions, for the given runs that logged them; read in parallel, through the cache."""
    if not wanted:
        return {}
    with ThreadPoolExecutor(min(THREADS, len(wanted))) as pool:
        found = dict(zip(wanted, pool.map(_read, wanted)))
    return {run_id: p for run_id, p in found.items() if p is not None}


def _read(run_id: str) -> Predictions | None:
    cached = cache_dir() / f"{run_id}.npz"
    blob = cached.read_bytes() if cached.is_file() else None
    if blob is None:
        blob = tracking.read_artifact(run_id, ARTIFACT)
        if blob is None:
            return None
        _keep(cached, blob)
    try:
        return load_predictions(blob)
    except ValueError:
        return None


def _keep(path: Path, blob: bytes) -> None:
    """Write the cache file whole or not at all; a cache that cannot be written is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    except OSError:
        pass
