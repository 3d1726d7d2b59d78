"""Data sources behind one interface: the embedded digits, an image folder, synthetic data.

``load_data(cfg)`` returns train/validation datasets split the same way for every
architecture (stratified, by ``split_seed``), with a fingerprint of the validation
set so that runs can be proven to share it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from .config import TrainConfig
from .errors import ZarError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_CLASSES = 4
SYNTHETIC_PER_CLASS = 24


class DataError(ZarError):
    pass


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
    skipped: list[str] = field(default_factory=list)  # unreadable images left out

    @property
    def fingerprint(self) -> str:
        """Names the validation set: equal fingerprints mean the same images, same labels."""
        h = hashlib.sha256("\n".join(self.classes).encode())
        for sample_id, label in sorted(zip(self.val_ids, self.val_labels)):
            h.update(f"\n{sample_id}\t{label}".encode())
        return h.hexdigest()[:16]


def load_data(cfg: TrainConfig) -> DataBundle:
    if cfg.data == "digits":
        images, labels, classes = _digits()
        return _tensor_bundle("digits", "sklearn.datasets.load_digits", images, labels, classes, cfg)
    if cfg.data == "synthetic":
        images, labels, classes = _synthetic()
        return _tensor_bundle("synthetic", "zar.data.synthetic", images, labels, classes, cfg)
    return _folder_bundle(Path(cfg.data), cfg)


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
    x = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)  # the ResNet stem takes RGB
    mean, std = x[train_idx].mean(), x[train_idx].std()  # from training images only
    x = ((x - mean) / std).contiguous()
    y = torch.as_tensor(labels, dtype=torch.long)
    ids = [str(i) for i in range(len(labels))]
    return DataBundle(
        name=name,
        source=source,
        classes=classes,
        train=TensorDataset(x[train_idx], y[train_idx]),
        val=TensorDataset(x[val_idx], y[val_idx]),
        train_ids=[ids[i] for i in train_idx],
        val_ids=[ids[i] for i in val_idx],
        train_labels=[int(labels[i]) for i in train_idx],
        val_labels=[int(labels[i]) for i in val_idx],
    )


class ImageFiles(Dataset):
    """(path, label) pairs decoded on demand, as torchvision's ImageFolder does."""

    def __init__(self, samples: list[tuple[Path, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() alone lets truncated JPEGs through
        return True
    except Exception:
        return False


def _scan_folder(root: Path, skip_bad_images: bool) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass an image folder, 'digits' or 'synthetic'")
    if not root.is_dir():
        raise DataError(f"data path {root} is a file; pass a folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples, bad = [], []
    for label, cls in enumerate(classes):
        files = sorted(
            p for p in (root / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        )
        for path in files:
            if _readable(path):
                samples.append((path, label))
            elif skip_bad_images:
                bad.append(str(path.relative_to(root)))
            else:
                raise DataError(
                    f"unreadable image {path} (truncated or not an image); "
                    "remove it or pass --skip-bad-images"
                )
    counts = {cls: sum(1 for _, y in samples if y == k) for k, cls in enumerate(classes)}
    classes_with_images = [c for c in classes if counts[c] > 0]
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    if not classes and loose:
        raise DataError(f"data folder {root} holds images but no class sub-folders; "
                        "put each class's images in a sub-folder named after the class")
    if not samples:
        raise DataError(
            f"data folder {root} has no images; expected one sub-folder per class holding "
            f"{', '.join(sorted(IMG_EXTENSIONS))} files"
        )
    if len(classes_with_images) < 2:
        raise DataError(
            f"data folder {root} has images of {len(classes_with_images)} class; "
            "a classifier needs at least 2 class sub-folders"
        )
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise DataError(f"class folder {root / empty[0]} has no readable images")
    return classes, samples, bad


def _folder_bundle(root: Path, cfg: TrainConfig) -> DataBundle:
    classes, samples, bad = _scan_folder(root, cfg.skip_bad_images)
    labels = np.array([y for _, y in samples])
    train_idx, val_idx = _split(labels, cfg)
    transform = transforms.Compose(
        [
            transforms.Resize((cfg.image_size, cfg.image_size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    full = ImageFiles(samples, transform)
    ids = [str(p.relative_to(root)) for p, _ in samples]
    return DataBundle(
        name=root.resolve().name,
        source=str(root.resolve()),
        classes=classes,
        train=Subset(full, train_idx.tolist()),
        val=Subset(full, val_idx.tolist()),
        train_ids=[ids[i] for i in train_idx],
        val_ids=[ids[i] for i in val_idx],
        train_labels=[int(labels[i]) for i in train_idx],
        val_labels=[int(labels[i]) for i in val_idx],
        skipped=bad,
    )
