"""Data sources behind one interface: the embedded digits, an image folder, synthetic data.

``load_data(cfg)`` returns train/validation datasets split the same way for every
architecture (stratified, by ``split_seed``), with a fingerprint of the validation
set so that runs can be proven to share it, and one of the data's content.

An image folder is decoded once into zar.learn.imagecache's memory-mapped cache; training reads
pixels from there, so no epoch and no later run decodes an image again. The digits and the
synthetic data are kept at their native 8x8 and resized batch by batch, so that a large
``image_size`` costs no memory.

Every name that leaves this module (sample ids, class names, messages) is text that can be
printed: bytes of a file name that are not UTF-8 appear as \\xNN (``imagecache.printable``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate_fn_map
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..checks import check_data_path
from ..config import DATA_KEYS, TrainConfig
from ..errors import DataError
from . import imagecache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_CLASSES = 4
SYNTHETIC_PER_CLASS = 24


@dataclass
class DataBundle:
    name: str  # "digits", "synthetic" or the folder's name
    source: str  # where it came from, for the MLflow dataset record
    classes: list[str]
    train: Dataset
    val: Dataset
    train_ids: list[str]
    val_ids: list[str]
    train_labels: list[int]
    val_labels: list[int]
    skipped: list[str] = field(default_factory=list)  # images that do not decode, left out
    content_sha256: str = ""  # of every sample's bytes and label, the classes and the image size

    @property
    def data_fingerprint(self) -> str:
        """Names the data's content: equal for the same bytes in the same classes at the same image size.

        Covers every sample of both splits; not file names nor the order of the samples, so a
        renamed or moved copy of a folder has the same fingerprint.
        """
        return self.content_sha256[:16]

    @property
    def fingerprint(self) -> str:
        """Names the validation set: equal fingerprints mean the same images, same labels."""
        h = hashlib.sha256("\n".join(self.classes).encode())
        for sample_id, label in sorted(zip(self.val_ids, self.val_labels)):
            h.update(f"\n{sample_id}\t{label}".encode())
        return h.hexdigest()[:16]


def data_key(cfg: TrainConfig) -> tuple:
    """What ``load_data(cfg)`` depends on: configs with the same key share one load (a study's children)."""
    return tuple(getattr(cfg, k) for k in DATA_KEYS)


def load_data(cfg: TrainConfig) -> DataBundle:
    if cfg.data == "digits":
        images, labels, classes = _digits()
        return _tensor_bundle("digits", "sklearn.datasets.load_digits", images, labels, classes, cfg)
    if cfg.data == "synthetic":
        images, labels, classes = _synthetic()
        return _tensor_bundle("synthetic", "zar.data.synthetic", images, labels, classes, cfg)
    return _folder_bundle(Path(cfg.data), cfg)


def raw_images(data: str, ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Samples by id as a person looks at them: uint8 pixels, H x W (grey) or H x W x 3, at their own size.

    ``data`` is a run's ``data`` param. An image that can no longer be read (a folder moved or
    changed since the run) is left out.
    """
    ids = list(ids)
    if data in ("digits", "synthetic"):
        images = (_digits() if data == "digits" else _synthetic())[0]
        pixels = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return {i: pixels[int(i)] for i in ids if i.isdigit() and int(i) < len(pixels)}
    from PIL import Image

    out = {}
    for i in ids:
        try:
            with Image.open(Path(data) / i) as image:
                out[i] = np.asarray(image.convert("RGB"))
        except (OSError, ValueError):
            continue
    return out


def _digits() -> tuple[torch.Tensor, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # N x 1 x 8 x 8
    return images, digits.target, [str(c) for c in digits.target_names]


def _synthetic() -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Noisy images whose class is a bright quadrant: learnable in a few steps, made offline."""
    g = torch.Generator().manual_seed(0)
    n = SYNTHETIC_CLASSES * SYNTHETIC_PER_CLASS
    labels = np.arange(n) % SYNTHETIC_CLASSES
    images = 0.3 * torch.rand(n, 1, 8, 8, generator=g)
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 0.7
    return images, labels, [f"class_{k}" for k in range(SYNTHETIC_CLASSES)]


def _split(labels: np.ndarray, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=cfg.val_ratio, stratify=labels, random_state=cfg.split_seed
        )
    except ValueError as e:
        raise DataError(f"cannot split {len(labels)} images with val_ratio={cfg.val_ratio}: {e}") from None
    return np.sort(train_idx), np.sort(val_idx)


def _tensor_bundle(name, source, images, labels, classes, cfg: TrainConfig) -> DataBundle:
    train_idx, val_idx = _split(labels, cfg)
    mean, std = resized_mean_std(images[train_idx], cfg.image_size)  # from training images only
    y = torch.as_tensor(labels, dtype=torch.long)
    ids = [str(i) for i in range(len(labels))]
    return DataBundle(
        name=name,
        source=source,
        classes=classes,
        train=SmallImages(images[train_idx], y[train_idx], cfg.image_size, mean, std),
        val=SmallImages(images[val_idx], y[val_idx], cfg.image_size, mean, std),
        train_ids=[ids[i] for i in train_idx],
        val_ids=[ids[i] for i in val_idx],
        train_labels=[int(labels[i]) for i in train_idx],
        val_labels=[int(labels[i]) for i in val_idx],
        content_sha256=_tensor_digest(images, labels, classes, cfg.image_size),
    )


def _tensor_digest(images: torch.Tensor, labels: np.ndarray, classes: list[str], image_size: int) -> str:
    """content_digest of in-memory images: each image's bytes stand for a file's."""
    rows = images.contiguous().numpy().reshape(len(images), -1)
    samples = [(int(label), hashlib.sha256(row.tobytes()).hexdigest()) for label, row in zip(labels, rows)]
    return content_digest(f"zar tensors {tuple(images.shape[1:])} {images.dtype}, size {image_size}", classes, samples)


def content_digest(header: str, classes: list[str], samples: Iterable[tuple[int, str]]) -> str:
    """sha256 hex of the samples, (label, sha256 of the sample's bytes), as a sorted list; the classes; ``header``.

    Sorted: a sample's name and place do not count, only what it holds and which class it is in.
    """
    h = hashlib.sha256(f"{header}\n".encode())
    h.update("\0".join(classes).encode() + b"\n")
    for label, sha256 in sorted(samples):
        h.update(f"{label}\t{sha256}\n".encode())
    return h.hexdigest()


class SmallImages(Dataset):
    """Small images (N x 1 x h x w floats) served resized to S x S, normalised and as 3 channels.

    Only the originals are held (the 1,797 digits: 460 kB, at any size); each batch is resized
    when it is read (bilinear, no align_corners), in one go through ``__getitems__`` as
    CachedImages does: the same pixels as resizing all images up front, which at 224 px took 1 GB.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, mean: float, std: float):
        self.images, self.labels, self.size = images.contiguous(), labels, size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self._batch([i])[0], int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list:
        batch = self._batch(indices)
        return [(_BatchRow.of(batch, k), int(label)) for k, label in enumerate(self.labels[indices])]

    def _batch(self, indices: list[int]) -> torch.Tensor:
        x = F.interpolate(self.images[indices], size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = x.sub_(self.mean).div_(self.std)
        return x.expand(-1, 3, -1, -1).contiguous()  # the ResNet stem takes RGB


def resized_mean_std(images: torch.Tensor, size: int) -> tuple[float, float]:
    """Mean and std (with Bessel's correction) of ``images`` (N x 1 x h x w) resized to S x S, as 3 channels.

    Computed exactly (float64, then rounded to float32) without resizing a single image, so a
    large ``image_size`` costs no memory. Bilinear resizing is linear and separable:
    an image X (h x w) becomes Y = A X B^T, with A (S x h) and B (S x w) the weights of resizing
    one column and one row. So sum(Y) = a^T X b with a, b the column sums of A, B, and
    sum(Y * Y) = trace(Y^T Y) = sum((A^T A) X (B^T B) * X). The three channels are copies: they
    triple both sums and the count, which changes only Bessel's n - 1.
    """
    x = images[:, 0].double()
    a, b = (_resize_weights(n, size) for n in x.shape[1:])
    total = torch.einsum("i,nij,j->", a.sum(0), x, b.sum(0)).item()
    squares = torch.einsum("ik,nkl,lj,nij->", a.T @ a, x, b.T @ b, x).item()
    n = 3 * len(x) * size * size
    mean = total / (len(x) * size * size)
    var = (3 * squares - n * mean * mean) / (n - 1)
    return float(np.float32(mean)), float(np.float32(np.sqrt(max(var, 0.0))))


def _resize_weights(n: int, size: int) -> torch.Tensor:
    """The S x n matrix that resizes a column of n pixels as F.interpolate's bilinear mode does."""
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, n, 1)  # one image per input pixel
    return F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T


class CachedImages(Dataset):
    """Rows of the decoded-image cache as normalised float tensors, labels as ints.

    The DataLoader asks for a whole batch through ``__getitems__``: its pixels are gathered from
    the memory map and normalised in one go, instead of image by image. ``pin`` (the cache's
    ``imagecache.Pin``) is held for as long as the dataset lives, so that no other process removes
    the pixels, which each worker opens by name.
    """

    def __init__(self, pixels_path: Path, rows: np.ndarray, labels: np.ndarray, pin: imagecache.Pin | None = None):
        self.pixels_path, self.rows, self.labels, self.pin = pixels_path, rows, labels, pin
        self._pixels = None  # opened on first use, in each DataLoader worker process separately

    def __getstate__(self):
        # a pickled memmap would copy all the pixels; the pin stays with this process, which outlives its workers
        return {**self.__dict__, "_pixels": None, "pin": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return _normalise(self._gather([i]))[0], int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list:
        batch = _normalise(self._gather(indices))
        return [(_BatchRow.of(batch, k), int(label)) for k, label in enumerate(self.labels[indices])]

    def _gather(self, indices: list[int]) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.pixels_path, mmap_mode="r")
        return self._pixels[self.rows[indices]]  # fancy indexing: a copy in memory


# (x / 255 - mean) / std = x * scale + shift, per channel
_SCALE = [1 / (255 * s) for s in IMAGENET_STD]
_SHIFT = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    """B x 3 x S x S uint8 -> float32 as ToTensor + Normalize(IMAGENET_MEAN, IMAGENET_STD) make it.

    Equal to within float rounding (5e-7). In-place ops with a scalar per channel: the fastest
    form torch has for it, about half the cost of broadcasting per-channel tensors.
    """
    out = torch.empty(pixels.shape, dtype=torch.float32)
    out.copy_(torch.from_numpy(pixels))
    for c in range(3):
        out[:, c].mul_(_SCALE[c]).add_(_SHIFT[c])
    return out


class _BatchRow(torch.Tensor):
    """One image of a batch that ``CachedImages`` normalised in one go.

    A tensor like any other, but it remembers its batch, so that ``default_collate`` (which
    zar's DataLoaders use) returns that batch instead of stacking copies of its rows: the copy
    would cost as much as the normalisation itself.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # results are plain tensors

    @staticmethod
    def of(batch: torch.Tensor, k: int) -> _BatchRow:
        row = batch[k].as_subclass(_BatchRow)
        row.batch, row.k = batch, k
        return row


def _collate_rows(rows, *, collate_fn_map=None) -> torch.Tensor:
    """The batch itself when ``rows`` are all of it, in order (as a DataLoader fetches them)."""
    batch = getattr(rows[0], "batch", None)
    if (
        batch is not None
        and len(rows) == len(batch)
        and all(getattr(r, "batch", None) is batch and r.k == k for k, r in enumerate(rows))
    ):
        return batch
    return torch.stack([r.as_subclass(torch.Tensor) for r in rows])  # rows of several batches


default_collate_fn_map[_BatchRow] = _collate_rows  # torch's documented way to extend default_collate


def _list_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The class sub-folders and every image file under them, as (relative path, class index)."""
    check_data_path(str(root))
    classes, files = _scan_folder(root)
    if not files:
        loose = [p for p in root.iterdir() if _is_image(p.name) and p.is_file()]
        if not classes and loose:
            raise DataError(
                f"data folder {_printable(root)} holds images but no class sub-folders; "
                "put each class's images in a sub-folder named after the class"
            )
        raise _no_images(root)
    return classes, files


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The ImageFolder layout: one sub-folder per class, image files at any depth below.

    Hidden files and folders (a name starting with '.') are skipped at every depth: macOS's
    ``._x.png`` and ``.DS_Store``, Jupyter's ``.ipynb_checkpoints/`` (whose copies of images
    could put a training image into validation). Symbolic links to folders below a class
    folder are not followed (a link may loop). Files in the order of their path's parts.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (os.path.join(cls, *parts), label)
        for label, cls in enumerate(classes)
        for parts in sorted(_images_below(root / cls))
    ]
    return classes, files


def _images_below(folder: Path, above: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path parts, below ``folder``, of each image file at any depth, hidden ones aside."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from _images_below(folder / entry.name, (*above, entry.name))
            elif _is_image(entry.name) and entry.is_file():
                yield (*above, entry.name)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


def _printable(path: Path | str) -> str:
    return imagecache.printable(str(path))


def _no_images(root: Path) -> DataError:
    return DataError(
        f"data folder {_printable(root)} has no images; expected one sub-folder per class holding "
        f"{', '.join(sorted(IMG_EXTENSIONS))} files"
    )


def _readable_rows(root: Path, files: list[tuple[str, int]], bad: dict[int, str], skip_bad_images: bool) -> list[int]:
    """The rows to train on: all but those that do not decode, which are an error unless skipped."""
    if bad and not skip_bad_images:
        row = min(bad)
        path = _printable(root / files[row][0])
        if bad[row] == imagecache.UNREADABLE:
            raise DataError(f"unreadable image {path} ({bad[row]}); remove it or pass --skip-bad-images")
        raise DataError(f"image {path} is {bad[row]}; remove or shrink it, or pass --skip-bad-images")
    return [i for i in range(len(files)) if i not in bad]


def _check_classes(root: Path, classes: list[str], labels: np.ndarray) -> None:
    """At least two classes, and a readable image in every class folder."""
    if len(labels) == 0:
        raise _no_images(root)
    counts = np.bincount(labels, minlength=len(classes))
    if np.count_nonzero(counts) < 2:
        raise DataError(
            f"data folder {_printable(root)} has images of {np.count_nonzero(counts)} class; "
            "a classifier needs at least 2 class sub-folders"
        )
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise DataError(f"class folder {_printable(root / empty[0])} has no readable images")


def _folder_bundle(root: Path, cfg: TrainConfig) -> DataBundle:
    classes, files = _list_folder(root)
    try:
        cached = imagecache.load(root, classes, files, cfg.image_size)
    except imagecache.CacheError as e:
        raise DataError(str(e)) from None
    rows = np.array(_readable_rows(root, files, cached.bad, cfg.skip_bad_images), dtype=np.int64)
    labels = np.array([files[i][1] for i in rows], dtype=np.int64)
    _check_classes(root, classes, labels)
    train_idx, val_idx = _split(labels, cfg)
    ids = [imagecache.printable(files[i][0]) for i in rows]
    names = [imagecache.printable(c) for c in classes]
    header = f"zar image folder v{imagecache.CACHE_VERSION}, size {cfg.image_size}"
    return DataBundle(
        name=_printable(root.resolve().name),
        source=_printable(root.resolve()),
        classes=names,
        train=CachedImages(cached.pixels_path, rows[train_idx], labels[train_idx], cached.pin),
        val=CachedImages(cached.pixels_path, rows[val_idx], labels[val_idx], cached.pin),
        train_ids=[ids[i] for i in train_idx],
        val_ids=[ids[i] for i in val_idx],
        train_labels=[int(labels[i]) for i in train_idx],
        val_labels=[int(labels[i]) for i in val_idx],
        skipped=[imagecache.printable(files[i][0]) for i in sorted(cached.bad)],
        content_sha256=content_digest(header, names, ((files[i][1], cached.sha256[i]) for i in rows)),
    )
