"""Images per second of zar's cached image-folder loader against the study's PIL loader.

The study trained from torchvision's ImageFolder, which decodes and resizes every image with
PIL in every epoch. zar decodes each image once into a memory-mapped uint8 cache
(zar/imagecache.py) and trains from that. This measures both, in one process, on one folder of
JPEGs it generates in a temporary folder:

  (a) the reference: ImageFolder + Resize/ToTensor/Normalize, DataLoader(batch 32, shuffle,
      no workers), one full pass;
  (b) zar's first load_data: listing, hashing and decoding every image into the cache;
  (c) zar's cached loader over its training split, with the same DataLoader settings;
  (d) a second load_data on the unchanged folder: a cache hit, no image read.

Target: (c)/(a) >= 20x. Passes (a) and (c) are repeated (--repeat), taking turns so that neither
runs more often on the heap the other left behind, and the median of each is reported, as other
programs share the cores.

    python benchmarks/bench_loader.py [--images 1000] [--size 224] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # zar from this checkout, not an install

from _machine import header_lines  # noqa: E402

TARGET = 20.0
BATCH = 32
SOURCE_SIZE = 256


def write_jpegs(root: Path, n_images: int) -> int:
    """n_images 256 px JPEGs in up to 10 class folders: smooth colour gradients with mild noise,
    so that they compress like photos (tens of kB) rather than like noise. Returns the class count."""
    n_classes = max(2, min(10, n_images // 10))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SOURCE_SIZE, 0:SOURCE_SIZE].astype(np.float32) / SOURCE_SIZE
    for i in range(n_images):
        k = i % n_classes
        folder = root / f"class_{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 2 * np.pi, 3)
        channels = [127 + 100 * np.sin(2 * np.pi * (1 + k) * (x * np.cos(p) + y * np.sin(p)) + p) for p in phase]
        pixels = np.stack(channels, axis=-1) + rng.normal(0, 8, (SOURCE_SIZE, SOURCE_SIZE, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return n_classes


def one_pass(loader) -> tuple[float, int]:
    """Images/s of one full pass over ``loader``, and the images it gave."""
    seen, start = 0, time.perf_counter()
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - start), seen


def study_loader(root: Path, size: int):
    """The study's loader: torchvision's ImageFolder, PIL decoding and resizing every image."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from zar.learn.data import IMAGENET_MEAN, IMAGENET_STD

    transform = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(
        dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0), num_workers=0
    )


def median_pass(passes: list[tuple[float, int]]) -> tuple[float, int]:
    return statistics.median(rate for rate, _ in passes), passes[0][1]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="JPEGs to generate (default 1000)")
    parser.add_argument("--size", type=int, default=224, help="image_size to train at (default 224)")
    parser.add_argument("--repeat", type=int, default=3, help="passes of (a) and (c); the median counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="zar-bench-") as tmp:
        root = Path(tmp) / "jpegs"
        os.environ["ZAR_CACHE_DIR"] = str(Path(tmp) / "cache")  # a cold cache, gone afterwards
        n_classes = write_jpegs(root, args.images)
        written = time.time()
        folder_mb = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 1e6

        import torch
        from torch.utils.data import DataLoader

        from zar.config import TrainConfig
        from zar.learn.data import load_data
        from zar.learn.imagecache import RACY_NS

        # A file written in the last seconds is hashed again on the next run (its mtime cannot
        # vouch for it yet); a real data set is older than that, so wait until these are too.
        time.sleep(max(0.0, written + RACY_NS / 1e9 - time.time()))
        cfg = TrainConfig(data=str(root), image_size=args.size)
        data, first_s = timed(lambda: load_data(cfg))
        reference = study_loader(root, args.size)
        cached = DataLoader(
            data.train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0), num_workers=0
        )
        ref_passes, zar_passes = [], []
        for _ in range(args.repeat):
            ref_passes.append(one_pass(reference))
            zar_passes.append(one_pass(cached))
        ref_rate, ref_images = median_pass(ref_passes)
        zar_rate, zar_images = median_pass(zar_passes)
        again, second_s = timed(lambda: load_data(cfg))
        assert again.data_fingerprint == data.data_fingerprint

    ratio = zar_rate / ref_rate
    import torch

    title = f"zar image-folder loader vs torchvision ImageFolder + PIL ({args.size} px)"
    print("\n".join(header_lines(title)[:-1]))  # without its closing blank line
    print(f"- torch threads: {torch.get_num_threads()}")
    print(
        f"- data: {args.images} JPEGs of {SOURCE_SIZE} px in {n_classes} classes, {folder_mb:.1f} MB; "
        f"batch {BATCH}, shuffle, num_workers=0; median of {args.repeat} passes\n"
    )
    print("| step | images | time (s) | images/s |")
    print("| --- | --: | --: | --: |")
    print(
        f"| (a) reference: ImageFolder + PIL Resize/ToTensor/Normalize, one pass | {ref_images} | "
        f"{ref_images / ref_rate:.2f} | {ref_rate:,.0f} |"
    )
    print(
        f"| (b) zar first load_data: hash + decode into the cache | {args.images} | {first_s:.2f} | "
        f"{args.images / first_s:,.0f} |"
    )
    print(
        f"| (c) zar cached loader, training split, one pass | {zar_images} | "
        f"{zar_images / zar_rate:.2f} | {zar_rate:,.0f} |"
    )
    print(f"| (d) zar second load_data, unchanged folder (cache hit) | {args.images} | {second_s:.3f} | |")
    print(f"\n(c)/(a) = {ratio:.1f}x (target >= {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
