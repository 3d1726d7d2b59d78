"""A decoded-image cache for image folders: decode each image once, then train from a memory map.

Why: decoding JPEGs with PIL for every image of every epoch made the data loader, not the model,
the bottleneck on CPU, and checking that each image opens cost one more full decode per run.
Here the first run decodes every image once, in parallel, to uint8 at the training size, into one
memory-mapped file (a folder larger than RAM works); every later epoch and run only reads pixels.

The cache is keyed by the folder's content (each file's relative path, class, size and sha256)
and the image size, never by timestamps, so it can only be hit by the very bytes it was built
from. Hashing reads every file, so a stat cache remembers each file's hash next to its size,
mtime, ctime and inode, as git's index does: an unchanged folder then costs one stat per file
and no reads, and a file replaced by one of the same size and mtime (``cp -p``, ``rsync -t``)
still has a new ctime, so it is hashed again.

A folder keeps one cache per image size. When files change, the new cache copies the rows of
files whose bytes the last one holds (by sha256: a moved file is not decoded either) and decodes
the others, which gives the bytes a build from nothing gives. Once it is complete, the caches it
supersedes are removed unless a copy of the folder uses them, or a process builds them (holds
their lock) or reads them (holds a ``Pin``, a shared flock on the pixels, for as long as it uses
them: a DataLoader opens the pixels by name in each worker, so they must outlive its run). A
process that has mapped the pixels reads on in any case: a file unlinked while open or mapped
lives until it is closed (POSIX).

Decoding reads an image as an image library shows it: EXIF orientation applied, 16-bit and
float images scaled to 8 bits, transparency composited on black (see ``decode``).

Files under ``$ZAR_CACHE_DIR/images/`` (default ``~/.cache/zar/images/``):

- ``v2-<digest>.npy``: N x 3 x S x S uint8, one row per file in listing order (CHW, as the model
  takes it, so a batch needs no transpose); rows of files that do not decode stay zero.
- ``v2-<digest>.json``: its metadata (which rows do not decode, and why; each row's sha256).
  Written last: its presence means the .npy next to it is complete.
- ``v2-<digest>.lock``: held while building, so concurrent runs build it once, and while removing.
- ``stats-<folder>.json``: one folder's stat cache.
- ``caches-<folder>.json``: one folder's caches per image size; all but the last are superseded.

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a
half-written file under a name that is trusted. This module knows files and pixels only: no
torch, no MLflow, no click, so that decoding processes start quickly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

# Names the files' layout and decode()'s pixels: bump it when either changes, so that no cache
# (nor data fingerprint) made by another version is used. 2: EXIF, 16-bit, float, transparency.
CACHE_VERSION = 2
# A file modified within this long before it was hashed may change again without its size or
# mtime changing (timestamps are coarse: a few ms on Linux, 2 s on FAT), so its hash is not
# remembered and the next run hashes it again ("racy git").
RACY_NS = 2_000_000_000
PARALLEL_MIN_FILES = 64  # below this, starting processes costs more than it saves
MAX_CHUNK = 256
# Fork on Linux, as torch's DataLoader does: spawn would re-import the caller's main script (which
# then needs an ``if __name__ == "__main__"`` guard) and leave a resource-tracker process behind.
# The children only hash and decode, touching no lock that the parent's threads could hold.
_START = "fork" if sys.platform.startswith("linux") else "spawn"


class CacheError(Exception):
    """The cache cannot be used (unwritable folder, a file changing while read); one line."""


class _FolderChanged(Exception):
    """Files whose bytes differ from the hash the digest was made of."""

    def __init__(self, rows: list[int]):
        super().__init__(rows)
        self.rows = rows


class FileStat(NamedTuple):
    size: int
    mtime_ns: int
    sha256: str  # "" when the file cannot be read: it then counts as an unreadable image
    ctime_ns: int = -1  # changes on every write, also when mtime is set back; nobody can set it
    inode: int = -1  # changes when another file is renamed over this one


UNREADABLE = "truncated or not an image"  # why a file does not decode, unless it is too large


class BadImage(Exception):
    """A file that does not decode; its message says why (UNREADABLE, or a decompression bomb)."""


@dataclass
class CachedFolder:
    """A folder's images in the cache: row i of ``pixels_path`` is ``files[i]``."""

    digest: str  # sha256 hex of the folder's content and the image size
    pixels_path: Path
    bad: dict[int, str]  # rows whose file does not decode -> why (UNREADABLE or a bomb's story)
    hashed: int  # files whose bytes were read to hash them (0 when the stat cache knew all)
    decoded: int  # files decoded (0 on a cache hit; only those the last cache lacks when files changed)
    sha256: list[str]  # of each file's bytes, in listing order ("" for a file that cannot be read)
    pin: Pin  # keeps other processes from removing the pixels for as long as it lives: keep it while reading


def cache_dir() -> Path:
    return Path(os.environ.get("ZAR_CACHE_DIR") or Path.home() / ".cache" / "zar") / "images"


def load(
    root: Path, classes: list[str], files: list[tuple[str, int]], image_size: int, workers: int | None = None
) -> CachedFolder:
    """The cache of ``files`` ((path relative to ``root``, class index) in listing order).

    Builds it when missing; ``workers`` processes decode (default: one per core, none for a few
    files). Raises CacheError when the cache folder cannot be written.
    """
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        pool = _Workers(_processes(workers, len(files)))
        try:
            return _load(directory, root, classes, files, image_size, pool)
        finally:
            pool.close()
    except OSError as e:
        raise CacheError(
            f"cannot use the image cache in {directory}: {e.strerror or e}; set ZAR_CACHE_DIR to a writable folder"
        ) from None


def _load(
    directory: Path, root: Path, classes: list[str], files: list[tuple[str, int]], image_size: int, pool: _Workers
) -> CachedFolder:
    folder = _short_hash(os.fsencode(root.resolve()))
    stat_cache = StatCache(directory / f"stats-{folder}.json")
    history = _History(directory / f"caches-{folder}.json", image_size)
    rels = [rel for rel, _ in files]
    stats, hashed = _stats(root, rels, stat_cache, pool)
    digest = content_digest(classes, files, stats, image_size)
    store = _ImageStore(directory, digest)
    pin, decoded = store.pin(), 0
    if pin is None:
        with _flocked(store.lock):  # held while building or removing it
            pin = store.pin()  # another process may have built it while we waited
            if pin is None:
                last = history.last(directory, digest)
                try:
                    decoded = store.build(root, rels, stats, image_size, pool, last)
                except _FolderChanged as e:
                    # Rewritten since hashed, or rewritten keeping size and mtime: forget their hashes,
                    # so that the next run reads them again instead of failing the same way.
                    forget = set(e.rows)
                    stat_cache.save({rels[i]: st for i, st in enumerate(stats) if i not in forget})
                    raise CacheError(
                        f"image {root / printable(rels[e.rows[0]])} changed while zar was reading the folder; run again"
                    ) from None
                finally:
                    if last is not None:
                        last.close()
                pin = store.pin()  # cannot fail: a process removing the cache would need our lock
    stat_cache.save(dict(zip(rels, stats)))
    history.supersede(directory, digest)
    return CachedFolder(digest, store.pixels, pin.bad, hashed, decoded, [st.sha256 for st in stats], pin)


def content_digest(classes: list[str], files: list[tuple[str, int]], stats: list[FileStat], image_size: int) -> str:
    """sha256 over (path, class, size, sha256 of the bytes) of every file, the classes and the size.

    Paths are hashed as the file system's bytes, so names that are not UTF-8 work too.
    """
    h = hashlib.sha256(f"zar image folder v{CACHE_VERSION}, size {image_size}\n".encode())
    h.update(b"\0".join(os.fsencode(c) for c in classes) + b"\n")
    for (rel, label), st in zip(files, stats):
        h.update(b"%s\0%s\0%d\0%s\n" % (os.fsencode(rel), os.fsencode(classes[label]), st.size, st.sha256.encode()))
    return h.hexdigest()


# --- hashing, paid once per file thanks to the stat cache -------------------------------------


class StatCache:
    """path -> (size, mtime_ns, sha256, ctime_ns, inode) of one folder, so that unchanged files are not read again."""

    def __init__(self, path: Path):
        self.path = path
        self.known = self._read()

    def _read(self) -> dict[str, FileStat]:
        try:
            data = json.loads(self.path.read_text())
            if data["version"] != CACHE_VERSION:
                return {}
            return {rel: FileStat(*entry) for rel, entry in data["files"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # no stat cache, or an unusable one: files get hashed again, nothing worse

    def lookup(self, path: Path, rel: str) -> FileStat | None:
        """The remembered hash when the file's size, mtime, ctime and inode are unchanged."""
        known = self.known.get(rel)
        if known is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None  # gone since the listing: reading it will say so
        return known if _stat_key(st) == (known.size, known.mtime_ns, known.ctime_ns, known.inode) else None

    def save(self, stats: dict[str, FileStat]) -> None:
        """Remembers ``stats`` (files gone from the folder are forgotten), except racy ones."""
        now = time.time_ns()
        trusted = {rel: list(st) for rel, st in stats.items() if st.sha256 and now - st.mtime_ns >= RACY_NS}
        if trusted != {rel: list(st) for rel, st in self.known.items()}:
            # ensure_ascii escapes the lone surrogates that stand for non-UTF-8 bytes in names
            text = json.dumps({"version": CACHE_VERSION, "files": trusted}, ensure_ascii=True)
            _write_atomic(self.path, lambda f: f.write(text.encode()))


def _stats(root: Path, rels: list[str], stat_cache: StatCache, pool: _Workers) -> tuple[list[FileStat], int]:
    """Each file's FileStat, from the stat cache where it is current, else by reading the file."""
    stats = [stat_cache.lookup(root / rel, rel) for rel in rels]
    missing = [i for i, st in enumerate(stats) if st is None]
    parts = pool.chunks(missing)
    jobs = [([str(root / rels[i]) for i in part],) for part in parts]
    for part, results in zip(parts, pool.map(_hash_files, jobs)):
        for i, st in zip(part, results):
            stats[i] = st
    return stats, len(missing)


def _hash_files(paths: list[str]) -> list[FileStat]:
    return [_hash_file(path)[0] for path in paths]


def _hash_file(path: str) -> tuple[FileStat, bytes | None]:
    """The file's FileStat and its bytes (None when it cannot be read), from one open."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # of the bytes read, not of an earlier listing
            data = f.read()
    except OSError:
        return FileStat(-1, -1, ""), None
    return FileStat(st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest(), st.st_ctime_ns, st.st_ino), data


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


# --- the image store: one .npy of pixels and its metadata per digest -----------------------------


class Pin:
    """A complete cache's pixels, open and share-locked: while a process holds one, no other removes the cache.

    Forked DataLoader workers share the open file: the lock lasts until the last of them closes it.
    """

    def __init__(self, fd: int, path: Path, bad: dict[int, str], sha256: list[str] | None):
        self.fd, self.path, self.bad, self.sha256 = fd, path, bad, sha256

    def close(self, _close=os.close) -> None:  # a default survives interpreter shutdown, when __del__ may run
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _close(fd)

    __del__ = close


class _ImageStore:
    def __init__(self, directory: Path, digest: str):
        stem = directory / f"v{CACHE_VERSION}-{digest}"
        self.pixels, self.meta, self.lock = (stem.with_suffix(s) for s in (".npy", ".json", ".lock"))

    def pin(self) -> Pin | None:
        """The pixels, share-locked against removal; None when the store is not (completely) there."""
        try:
            fd = os.open(self.pixels, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a process removes the store
            meta = json.loads(self.meta.read_text())
            bad = {row: why for row, why in meta["bad"]}
            if os.path.samestat(os.fstat(fd), os.stat(self.pixels)):  # not removed (nor rebuilt) since opened
                return Pin(fd, self.pixels, bad, meta.get("sha256"))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        os.close(fd)
        return None

    def remove(self) -> bool:
        """Deletes the store unless a process builds it (holds its lock) or reads it (holds a Pin); True when gone."""
        with _flocked(self.lock, wait=False) as free, contextlib.ExitStack() as held:
            if not free:
                return False
            try:
                fd = os.open(self.pixels, os.O_RDONLY)
                held.callback(os.close, fd)  # before the lock is let go: the lock guards the whole removal
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except FileNotFoundError:
                pass  # a build that never finished
            except BlockingIOError:
                return False
            leftovers = self.pixels.parent.glob(f"{self.pixels.name}.*.tmp")  # of a build that was killed
            # the metadata first (the pixels are not trusted without it), the lock last, while we hold it
            for path in (self.meta, self.pixels, *leftovers, self.lock):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            return True

    def build(
        self, root: Path, rels: list[str], stats: list[FileStat], image_size: int, pool: _Workers, last: Pin | None
    ) -> int:
        """Copies the rows ``last`` holds, decodes the others, publishes the file; returns how many it decoded."""
        fd, tmp = tempfile.mkstemp(dir=self.pixels.parent, prefix=self.pixels.name + ".", suffix=".tmp")
        os.close(fd)
        shas = [st.sha256 for st in stats]
        try:
            shape = (len(rels), 3, image_size, image_size)
            pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            whys = _copy_rows(last, shas, pixels) if last is not None else {}  # row -> why it does not decode
            pixels.flush()
            del pixels
            todo = [i for i in range(len(rels)) if i not in whys]
            parts = pool.chunks(todo)
            jobs = [(tmp, part, [str(root / rels[i]) for i in part], image_size) for part in parts]
            changed = []
            for part, results in zip(parts, pool.map(_decode_files, jobs)):
                for i, (sha, why) in zip(part, results):
                    whys[i] = why  # and the pixels must be of the bytes the digest names, not of newer ones
                    if sha != shas[i]:
                        changed.append(i)
            if changed:
                raise _FolderChanged(changed)
            _fsync(tmp)
            os.replace(tmp, self.pixels)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        bad = [[i, whys[i]] for i in range(len(rels)) if whys[i] is not None]
        meta = {"version": CACHE_VERSION, "shape": list(shape), "bad": bad, "sha256": shas}
        _write_atomic(self.meta, lambda f: f.write(json.dumps(meta).encode()))
        return len(todo)


def _copy_rows(last: Pin, shas: list[str], pixels: np.ndarray) -> dict[int, str | None]:
    """Copies from ``last`` the rows of files with these bytes (a row depends on them alone); row -> why not decoded."""
    # "": a file that could not be read, so read it again; no sha256 at all: made before rows were copied
    held = {sha: row for row, sha in enumerate(last.sha256 or []) if sha}
    pairs = [(i, held[sha]) for i, sha in enumerate(shas) if sha in held]
    source = np.load(last.path, mmap_mode="r")  # of the same image size: the folder's record is per size
    for new, old in pairs:  # row by row: a folder's pixels may not fit in memory
        pixels[new] = source[old]
    return {i: last.bad.get(j) for i, j in pairs}


def _decode_files(npy_path: str, rows: list[int], paths: list[str], image_size: int) -> list[tuple[str, str | None]]:
    """Decodes ``paths`` into ``rows`` of the .npy; (sha256, why it does not decode or None) of each.

    Runs in a worker process: pixels go straight into the shared file, only hashes come back.
    """
    pixels = np.load(npy_path, mmap_mode="r+")
    results = []
    for row, path in zip(rows, paths):
        st, data = _hash_file(path)  # hashed again: proves the pixels are of the bytes the digest names
        why = UNREADABLE if data is None else None
        if data is not None:
            try:
                pixels[row] = decode(data, image_size)
            except BadImage as e:
                why = str(e)
        results.append((st.sha256, why))
    pixels.flush()
    del pixels
    return results


def decode(data: bytes, image_size: int) -> np.ndarray:
    """3 x S x S uint8 RGB, as an image viewer shows the file, resized as torchvision's ``Resize((S, S))``.

    - EXIF orientation applied (``ImageOps.exif_transpose``), so a phone's portrait is upright;
    - 16-bit images (Pillow's modes I;16* and I, which it also gives 16-bit PGM files) keep their
      high byte, ``value >> 8``, as OpenCV, scikit-image and torchvision's ``ToDtype`` do; an
      ``I`` image with values outside 0..65535 (real 32-bit data) and float images (mode F) have
      no range of their own, so they are stretched from their min..max to 0..255, as ImageJ does;
    - transparency (RGBA, LA, palettes with transparency) composited on black, i.e. colours
      premultiplied by alpha: equal to ``convert('RGB')`` wherever the image is opaque.

    Raises BadImage: UNREADABLE (truncated, not an image), or a decompression bomb: an image of
    more than ``Image.MAX_IMAGE_PIXELS`` pixels, which Pillow warns of and zar refuses to decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(_bomb(e)) from None
    except Exception:  # noqa: BLE001 -- PIL raises many types for broken files; all mean "unreadable"
        raise BadImage(UNREADABLE) from None
    try:
        with im:
            im.load()  # decodes fully: a truncated file fails here
            _upright(im)
            rgb = _rgb(im)
            # Resize((S, S)) on a PIL image is PIL's bilinear resize, which antialiases when shrinking
            resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    except Exception:  # noqa: BLE001
        raise BadImage(UNREADABLE) from None
    return np.asarray(resized).transpose(2, 0, 1)


def _bomb(e: Exception) -> str:
    """Why a file is refused as a decompression bomb, with its pixel count where Pillow's message has it."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found[1]):,} pixels, " if found else ""
    return f"too large to decode ({size}over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,})"


def _upright(im: Image.Image) -> None:
    """Applies the EXIF orientation in place; broken EXIF leaves the image as stored."""
    with contextlib.suppress(Exception):  # EXIF is metadata: a bad tag does not make the pixels unreadable
        ImageOps.exif_transpose(im, in_place=True)


def _rgb(im: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (see ``decode``)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return Image.fromarray(_eight_bit(im), "L").convert("RGB")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")  # convert('RGB') would drop (and, for a palette, warn about) transparency
        rgb = Image.new("RGB", im.size)  # black
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return im.convert("RGB")


def _eight_bit(im: Image.Image) -> np.ndarray:
    """H x W uint8 of a 16-bit, 32-bit or float grayscale image (see ``decode``)."""
    if im.mode != "F":
        values = np.asarray(im).astype(np.int64)
        if im.mode != "I" or (values.size and 0 <= values.min() and values.max() <= 65535):
            return (values.clip(0, 65535) >> 8).astype(np.uint8)
    values = np.asarray(im, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - lo) * (255 / (hi - lo))).astype(np.uint8)


# --- which caches a folder has: the current one, and those it superseded that are still in use ---------


class _History:
    """One folder's caches at one image size in ``caches-<folder>.json``, oldest first: the last is current."""

    def __init__(self, path: Path, image_size: int):
        self.path, self.key = path, str(image_size)

    def last(self, directory: Path, digest: str) -> Pin | None:
        """The folder's last cache before ``digest``, pinned; None when there is none, or it is incomplete."""
        older = [d for d in _record(self.path).get(self.key, []) if d != digest]
        return _ImageStore(directory, older[-1]).pin() if older else None

    def supersede(self, directory: Path, digest: str) -> None:
        """Makes ``digest`` current; removes those before it that no process and no other folder uses."""
        if _record(self.path).get(self.key) == [digest]:
            return  # the usual load writes nothing, so a read-only cache folder still serves it
        with _flocked(self.path):  # read, change, write: one process at a time
            record = _record(self.path)
            older = [d for d in record.get(self.key, []) if d != digest]
            if older:  # a copy of the folder shares its caches: the copy's record keeps those it names
                others = [_record(path) for path in directory.glob("caches-*.json") if path != self.path]
                elsewhere = {d for other in others for digests in other.values() for d in digests}
                older = [d for d in older if d not in elsewhere and not _ImageStore(directory, d).remove()]
            record[self.key] = [*older, digest]  # those in use stay, for a later load to remove
            _write_atomic(self.path, lambda f: f.write(json.dumps(record).encode()))


def _record(path: Path) -> dict[str, list[str]]:
    """A folder's record, image size -> digests; {} when missing or unusable (which leaves a cache behind at worst)."""
    try:
        return {size: [str(d) for d in digests] for size, digests in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


# --- processes and files ---------------------------------------------------------------------------


def _processes(workers: int | None, n_files: int) -> int:
    """How many processes decode: as asked, else one per usable core (one for a few files)."""
    if workers is not None:
        return max(1, workers)
    if n_files < PARALLEL_MIN_FILES:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Workers:
    """Processes that hash and decode, started on first use and shared by both passes of a load."""

    def __init__(self, processes: int):
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def chunks(self, items: list[int]) -> list[list[int]]:
        """Runs of consecutive ``items``, about four per process, so that a slow one does not stall the rest."""
        size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (4 * self.processes))))
        return [items[start : start + size] for start in range(0, len(items), size)]

    def map(self, fn: Callable, jobs: list[tuple]) -> list:
        """``[fn(*job) for job in jobs]``, in the processes when there is more than one job."""
        if self.processes <= 1 or len(jobs) <= 1:
            return [fn(*job) for job in jobs]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context(_START))
        futures = [self._pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:  # no process outlives the load, also on an error or Ctrl-C
            self._pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _flocked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Holds an exclusive flock on ``path`` (made if missing); yields False if ``wait`` is off and another holds it.

    Released when the file closes, also if we are killed. Locks ``path`` anew if it was unlinked or
    replaced meanwhile (a removal unlinks a cache's lock; writing a folder's record replaces it).
    """
    while True:
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return


def _write_atomic(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)  # makes the rename itself durable


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def printable(rel: str) -> str:
    """A path as text: bytes that are not UTF-8 become \\xNN, where printing the raw name would crash."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
