"""The decoded-image cache behind image folders: real files, real decoding, a cache per test."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from torchvision import transforms

from zar.config import TrainConfig
from zar.learn import data as data_module
from zar.learn import imagecache
from zar.learn.data import IMAGENET_MEAN, IMAGENET_STD, DataError, content_digest, load_data, resized_mean_std

from helpers import ROOT

SIZE = 24
AN_HOUR_AGO = time.time() - 3600


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, so that what a test sees was built by it."""
    monkeypatch.setenv("ZAR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def write_folder(root: Path, classes=("cat", "dog"), per_class=5) -> Path:
    """Non-square images in the formats and modes people have: JPEG, RGBA and grayscale PNG.

    Files are dated an hour back: a file written in the last seconds is hashed again on the next
    run (its mtime cannot prove it unchanged), and these tests are about files written long ago.
    """
    rng = np.random.default_rng(0)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (31 + i, 45, 3), dtype=np.uint8) + np.uint8(60 * k)
            image = Image.fromarray(pixels)
            if i % 3 == 0:
                image.save(root / cls / f"{i}.jpg", quality=90)
            elif i % 3 == 1:
                image.convert("RGBA").save(root / cls / f"{i}.png")
            else:
                image.convert("L").save(root / cls / f"{i}.png")
    age(*root.rglob("*.*"))
    return root


def age(*paths: Path, when: float = AN_HOUR_AGO) -> None:
    for path in paths:
        os.utime(path, (when, when))


def load(root: Path, **overrides):
    return load_data(TrainConfig(data=str(root), image_size=SIZE, **overrides))


def cached_pixels(dataset) -> np.ndarray:
    """The uint8 rows a cached dataset reads, N x 3 x S x S."""
    return np.load(dataset.pixels_path, mmap_mode="r")[dataset.rows]


def old_transform(normalise: bool):
    steps = [transforms.Resize((SIZE, SIZE))]
    if normalise:
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def old_pixels(path: Path) -> np.ndarray:
    """What the loader before the cache made of an image, before ToTensor, as 3 x S x S."""
    with Image.open(path) as im:
        return np.asarray(old_transform(False)(im.convert("RGB"))).transpose(2, 0, 1)


def everything(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return x, y


class Spy:
    """Counts calls of a function, or forbids them."""

    def __init__(self, monkeypatch, owner, name: str, forbid: bool = False):
        self.calls = 0
        real = getattr(owner, name)

        def spy(*args, **kwargs):
            if forbid:
                raise AssertionError(f"{name} was called on a cache hit")
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)


def test_cached_pixels_equal_the_old_pil_resize_path(tmp_path):
    folder = write_folder(tmp_path / "pets")
    data = load(folder)
    for dataset, ids in ((data.train, data.train_ids), (data.val, data.val_ids)):
        expected = np.stack([old_pixels(folder / i) for i in ids])
        assert np.array_equal(cached_pixels(dataset), expected)
        # and the tensors are ToTensor + Normalize of those pixels, alone or batched
        old = torch.stack([old_transform(True)(Image.open(folder / i).convert("RGB")) for i in ids])
        x, y = everything(dataset)
        assert x.dtype == torch.float32 and x.shape == (len(ids), 3, SIZE, SIZE)
        torch.testing.assert_close(x, old, rtol=0, atol=1e-5)
        torch.testing.assert_close(dataset[0][0], old[0], rtol=0, atol=1e-5)
        assert y.tolist() == [data.classes.index(i.split(os.sep)[0]) for i in ids]


class OneByOne(torch.utils.data.Dataset):
    """The same dataset without batched reads: the DataLoader stacks item after item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def test_batches_from_a_shuffling_loader_equal_stacked_single_items(tmp_path):
    data = load(write_folder(tmp_path / "pets", per_class=9))

    def batches(dataset):
        return list(
            DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1), drop_last=True)
        )

    batched, one_by_one = batches(data.train), batches(OneByOne(data.train))
    assert len(batched) == len(data.train) // 4
    for (x, y), (x1, y1) in zip(batched, one_by_one):
        assert type(x) is torch.Tensor and x.shape == (4, 3, SIZE, SIZE)
        assert torch.equal(x, x1) and torch.equal(y, y1)


def test_a_second_load_reads_no_image_bytes_and_returns_equal_tensors(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "pets")
    first = load(folder)
    for name in ("_hash_file", "decode"):
        Spy(monkeypatch, imagecache, name, forbid=True)
    Spy(monkeypatch, Image, "open", forbid=True)
    second = load(folder)
    assert second.data_fingerprint == first.data_fingerprint and len(second.data_fingerprint) == 16
    assert (second.train_ids, second.val_ids) == (first.train_ids, first.val_ids)
    for a, b in ((first.train, second.train), (first.val, second.val)):
        assert all(torch.equal(p, q) for p, q in zip(everything(a), everything(b)))


def test_new_content_in_one_file_changes_the_fingerprint_and_rebuilds(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "pets")
    before = load(folder).data_fingerprint
    changed = folder / "dog" / "0.jpg"
    Image.new("RGB", (40, 30), (250, 10, 10)).save(changed, quality=90)
    age(changed, when=AN_HOUR_AGO + 60)
    decodes = Spy(monkeypatch, imagecache, "decode")
    data = load(folder)
    assert data.data_fingerprint != before
    assert decodes.calls == 1  # that file alone: the other rows are copied from the last cache
    ids = data.train_ids + data.val_ids
    pixels = np.concatenate([cached_pixels(data.train), cached_pixels(data.val)])
    assert np.array_equal(pixels[ids.index(os.path.join("dog", "0.jpg"))], old_pixels(changed))


def test_a_touched_file_is_hashed_again_and_keeps_the_fingerprint(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "pets")
    before = load(folder).data_fingerprint
    age(folder / "cat" / "1.png", when=AN_HOUR_AGO + 60)  # same bytes, same size, new mtime
    hashes = Spy(monkeypatch, imagecache, "_hash_file")
    decodes = Spy(monkeypatch, imagecache, "decode")
    assert load(folder).data_fingerprint == before
    assert (hashes.calls, decodes.calls) == (1, 0)
    assert load(folder).data_fingerprint == before and hashes.calls == 1  # remembered again


def test_a_file_written_seconds_ago_is_hashed_again_next_time(tmp_path, monkeypatch):
    """Its mtime may not change when it is rewritten within the file system's time resolution."""
    folder = write_folder(tmp_path / "pets")
    age(folder / "cat" / "0.jpg", when=time.time())
    load(folder)
    hashes = Spy(monkeypatch, imagecache, "_hash_file")
    load(folder)
    assert hashes.calls == 1


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])
    age(path)


def test_a_truncated_jpeg_is_named_and_skipped_on_request_also_on_a_cache_hit(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "pets", per_class=6)
    bad = folder / "dog" / "3.jpg"
    truncate(bad)
    with pytest.raises(DataError) as e:
        load(folder)
    assert str(e.value) == (f"unreadable image {bad} (truncated or not an image); remove it or pass --skip-bad-images")
    skipping = load(folder, skip_bad_images=True)  # a hit: the failed run built the cache
    assert skipping.skipped == [os.path.join("dog", "3.jpg")]
    assert len(skipping.train) + len(skipping.val) == 11
    assert os.path.join("dog", "3.jpg") not in skipping.train_ids + skipping.val_ids

    Spy(monkeypatch, imagecache, "decode", forbid=True)
    again = load(folder, skip_bad_images=True)
    assert again.skipped == skipping.skipped and again.val_ids == skipping.val_ids
    with pytest.raises(DataError, match=f"unreadable image {bad}"):
        load(folder)


def test_a_file_name_that_is_not_utf8_works(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "pets")
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as old archives have them
    try:
        Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "cat" / name)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    age(folder / "cat" / name)
    data = load(folder)
    ids = data.train_ids + data.val_ids
    assert os.path.join("cat", "caf\\xe9.png") in ids and len(ids) == 11
    Spy(monkeypatch, imagecache, "decode", forbid=True)
    assert load(folder).data_fingerprint == data.data_fingerprint


def test_decoding_in_processes_gives_the_same_cache_and_leaves_no_process(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "pets", per_class=12)
    classes = ["cat", "dog"]
    files = [(str(p.relative_to(folder)), classes.index(p.parent.name)) for p in sorted(folder.rglob("*.*"))]
    serial = imagecache.load(folder, classes, files, SIZE, workers=1)
    monkeypatch.setenv("ZAR_CACHE_DIR", str(tmp_path / "other"))
    children_before = set(psutil.Process().children(recursive=True))
    parallel = imagecache.load(folder, classes, files, SIZE, workers=2)
    assert parallel.digest == serial.digest and parallel.decoded == len(files)
    assert np.array_equal(np.load(parallel.pixels_path), np.load(serial.pixels_path))
    assert set(psutil.Process().children(recursive=True)) <= children_before


BUILD = """
import sys
from pathlib import Path
from zar.learn import imagecache
root = Path(sys.argv[1])
files = [(str(p.relative_to(root)), ["cat", "dog"].index(p.parent.name)) for p in sorted(root.rglob("*.*"))]
print(imagecache.load(root, ["cat", "dog"], files, 24, workers=1).digest)
"""


def test_processes_building_the_same_cache_at_once_share_one_complete_copy(tmp_path, cache):
    folder = write_folder(tmp_path / "pets", per_class=30)
    runs = [
        subprocess.Popen([sys.executable, "-c", BUILD, str(folder)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    digests = {run.communicate(timeout=120)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs) and len(digests) == 1
    # the cache, its metadata and lock, the folder's stat cache and record of caches: no temp files
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".json", ".json", ".lock", ".npy"]


def test_a_cache_without_its_metadata_is_not_trusted(tmp_path, cache, monkeypatch):
    """A crash between writing the pixels and their metadata leaves a cache that is rebuilt."""
    folder = write_folder(tmp_path / "pets")
    first = load(folder)
    (meta,) = cache.glob("v*.json")
    meta.unlink()
    first.train.pixels_path.write_bytes(b"half a file")
    decodes = Spy(monkeypatch, imagecache, "decode")
    again = load(folder)
    assert decodes.calls == 10
    assert all(torch.equal(p, q) for p, q in zip(everything(first.val), everything(again.val)))


def test_a_file_rewritten_keeping_size_and_mtime_is_caught_and_read_again_next_time(tmp_path, cache):
    """The stat cache vouches for a hash the bytes no longer have: decoding notices, once."""
    folder = write_folder(tmp_path / "pets")
    before = load(folder).data_fingerprint
    for built in cache.glob("v*"):
        built.unlink()
    (stats,) = cache.glob("stats-*.json")
    lying = json.loads(stats.read_text())
    lying["files"][os.path.join("cat", "1.png")][2] = "0" * 64
    stats.write_text(json.dumps(lying))
    with pytest.raises(DataError, match=r"image .*cat/1.png changed while zar was reading the folder; run again"):
        load(folder)
    assert load(folder).data_fingerprint == before


def test_the_cache_lives_in_zar_cache_dir_else_in_the_home_folder(tmp_path, monkeypatch):
    assert imagecache.cache_dir() == tmp_path / "cache" / "images"
    monkeypatch.delenv("ZAR_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert imagecache.cache_dir() == tmp_path / "home" / ".cache" / "zar" / "images"


def test_an_unwritable_cache_folder_is_a_one_line_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ZAR_CACHE_DIR", str(blocker))
    with pytest.raises(DataError, match="cannot use the image cache in .*; set ZAR_CACHE_DIR"):
        load(write_folder(tmp_path / "pets"))


@pytest.mark.parametrize("source", ["digits", "synthetic"])
def test_tensor_data_fingerprint_is_stable_and_names_the_image_size(source):
    a = load_data(TrainConfig(data=source, image_size=16))
    b = load_data(TrainConfig(data=source, image_size=16))
    c = load_data(TrainConfig(data=source, image_size=20))
    assert a.data_fingerprint == b.data_fingerprint != c.data_fingerprint
    assert len(a.data_fingerprint) == 16 and a.fingerprint == c.fingerprint  # same validation images


def test_a_second_load_opens_no_file_of_the_folder(tmp_path, monkeypatch):
    """The stat cache vouches for every file: not one is opened, whatever reads it."""
    folder = write_folder(tmp_path / "pets")
    load(folder)
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        opened.append(path)
        return real_os_open(path, *args, **kwargs)

    for owner, name, spy in ((builtins, "open", spy_open), (io, "open", spy_open), (os, "open", spy_os_open)):
        monkeypatch.setattr(owner, name, spy)
    everything(load(folder).train)
    assert opened and not [f for f in opened if not isinstance(f, int) and str(f).startswith(str(folder))]


# --- the data fingerprint: every sample's bytes and class, the classes, the image size ------------------


def with_a_byte_changed(path: Path) -> None:
    """The same JPEG but for one byte of its header (a pixel density), keeping its size and mtime.

    As ``cp -p`` or ``rsync -t`` leave a file: only its ctime says it was written.
    """
    st = path.stat()
    data = bytearray(path.read_bytes())
    assert data[6:11] == b"JFIF\0"
    data[15] ^= 1  # X density, low byte: the pixels stay the same
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def jpeg_folder(root: Path, per_class: int) -> Path:
    """write_folder's images, all as JPEG."""
    folder = write_folder(root, per_class=per_class)
    for png in folder.rglob("*.png"):
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    age(*folder.rglob("*.jpg"))
    return folder


def test_the_data_fingerprint_names_content_not_file_names(tmp_path):
    folder = jpeg_folder(tmp_path / "pets", per_class=6)
    base = load(folder).data_fingerprint
    (folder / "cat" / "1.jpg").rename(folder / "cat" / "renamed.jpg")
    (folder / "dog" / "sub").mkdir()
    (folder / "dog" / "2.jpg").rename(folder / "dog" / "sub" / "2.jpg")
    assert load(folder).data_fingerprint == base

    (folder / "dog" / "4.jpg").rename(folder / "cat" / "4-from-dog.jpg")  # another class
    moved = load(folder).data_fingerprint
    (folder / "cat" / "4-from-dog.jpg").rename(folder / "dog" / "4.jpg")
    assert moved != base and load(folder).data_fingerprint == base
    assert load_data(TrainConfig(data=str(folder), image_size=SIZE + 1)).data_fingerprint != base


def test_one_byte_changed_in_either_split_changes_the_data_fingerprint_even_with_size_and_mtime_kept(tmp_path):
    folder = jpeg_folder(tmp_path / "pets", per_class=6)
    first = load(folder)
    seen = {first.data_fingerprint}
    for sample_id in (first.train_ids[0], first.val_ids[0]):
        with_a_byte_changed(folder / sample_id)
        changed = load(folder)
        assert changed.data_fingerprint not in seen and changed.fingerprint == first.fingerprint
        seen.add(changed.data_fingerprint)


def test_the_data_fingerprint_is_of_the_samples_trained_on(tmp_path):
    """A broken file left out with --skip-bad-images is as if it were not there."""
    folder = write_folder(tmp_path / "pets", per_class=6)
    truncate(folder / "dog" / "3.jpg")
    skipping = load(folder, skip_bad_images=True)
    (folder / "dog" / "3.jpg").unlink()
    assert load(folder).data_fingerprint == skipping.data_fingerprint


def test_the_content_digest_names_the_classes_labels_and_samples():
    samples = [(0, "a" * 64), (1, "b" * 64), (1, "c" * 64)]
    digest = content_digest("zar test, size 24", ["cat", "dog"], samples)
    assert digest == content_digest("zar test, size 24", ["cat", "dog"], reversed(samples))  # order does not count
    assert (
        len(
            {
                digest,
                content_digest("zar test, size 24", ["cat", "dog", "owl"], samples),  # a class more
                content_digest("zar test, size 24", ["cat", "dog"], [(0, "a" * 64), (0, "b" * 64), (1, "c" * 64)]),
                content_digest("zar test, size 24", ["cat", "dog"], samples[:2]),  # a sample less
                content_digest("zar test, size 24", ["cat", "dog"], [*samples, samples[0]]),  # a duplicate more
                content_digest("zar test, size 32", ["cat", "dog"], samples),
            }
        )
        == 6
    )


def test_tensor_data_fingerprints_cover_every_pixel_label_and_class(monkeypatch):
    real = data_module._synthetic
    base = load_data(TrainConfig(data="synthetic", image_size=16)).data_fingerprint

    def fingerprint(change) -> str:
        def changed():
            images, labels, classes = real()
            change(images, labels, classes)
            return images, labels, classes

        monkeypatch.setattr(data_module, "_synthetic", changed)
        return load_data(TrainConfig(data="synthetic", image_size=16)).data_fingerprint

    assert fingerprint(lambda images, labels, classes: None) == base
    fingerprints = {
        fingerprint(lambda images, labels, classes: images[95, 0, 7, 7].add_(1e-3)),
        fingerprint(lambda images, labels, classes: labels.__setitem__(95, (labels[95] + 1) % 4)),
        fingerprint(lambda images, labels, classes: classes.__setitem__(3, "other")),
    }
    assert base not in fingerprints and len(fingerprints) == 3


# --- the digits and the synthetic data: held at 8x8, resized batch by batch ------------------------


def originals(data) -> torch.Tensor:
    """The N x 1 x 8 x 8 images that a built-in bundle holds, in sample-id order."""
    images = torch.empty(len(data.train) + len(data.val), 1, 8, 8)
    for dataset, ids in ((data.train, data.train_ids), (data.val, data.val_ids)):
        images[[int(i) for i in ids]] = dataset.images
    return images


def resized_up_front(images: torch.Tensor, train_ids: list[str], size: int) -> torch.Tensor:
    """What zar's data loading did before: every image resized, then normalised, N x 3 x S x S."""
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    train_idx = [int(i) for i in train_ids]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    return ((x - mean) / std).contiguous()


@pytest.mark.parametrize("size", [8, 13, 32, 61])
@pytest.mark.parametrize("source", ["digits", "synthetic"])
def test_batches_resized_when_read_equal_the_images_resized_up_front(source, size):
    data = load_data(TrainConfig(data=source, image_size=size))
    images = originals(data)
    if source == "digits":
        assert torch.equal(images, torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16)
    old = resized_up_front(images, data.train_ids, size)
    for dataset, ids, labels in (
        (data.train, data.train_ids, data.train_labels),
        (data.val, data.val_ids, data.val_labels),
    ):
        expected = old[[int(i) for i in ids]]
        x, y = everything(dataset)
        assert type(x) is torch.Tensor and x.shape == (len(ids), 3, size, size) and x.is_contiguous()
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
        assert y.tolist() == labels
        torch.testing.assert_close(dataset[5][0], expected[5], rtol=0, atol=1e-6)
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0)).tolist()
        for k, (x, _) in enumerate(DataLoader(dataset, batch_size=32, sampler=order)):
            torch.testing.assert_close(x, expected[order[32 * k : 32 * k + 32]], rtol=0, atol=1e-6)


def test_the_normalisation_is_that_of_the_resized_training_images():
    """resized_mean_std computes, from the 8x8 images, what resizing them all and measuring gives."""
    images = torch.from_numpy(load_digits().images[:80]).float().unsqueeze(1) / 16
    for size in (8, 9, 31, 224):
        x = F.interpolate(images.double(), size=(size, size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        mean, std = resized_mean_std(images, size)
        assert mean == pytest.approx(x.mean().item(), rel=1e-7) and std == pytest.approx(x.std().item(), rel=1e-7)


def tensor_bytes(dataset) -> int:
    """Bytes of the tensors a dataset holds (also in tuples, as TensorDataset holds them)."""
    held = [v for v in vars(dataset).values() if isinstance(v, torch.Tensor)]
    held += [
        t for v in vars(dataset).values() if isinstance(v, (tuple, list)) for t in v if isinstance(t, torch.Tensor)
    ]
    return sum(t.numel() * t.element_size() for t in held)


@pytest.mark.parametrize("source", ["digits", "synthetic"])
def test_a_large_image_size_holds_only_the_small_images(source):
    data = load_data(TrainConfig(data=source, image_size=224))
    assert tensor_bytes(data.train) + tensor_bytes(data.val) < 600_000  # the digits: 1,797 x 8 x 8 floats
    for workers in (0, 2):
        loader = DataLoader(data.train, batch_size=32, shuffle=True, num_workers=workers)
        x, y = next(iter(loader))
        assert x.shape == (32, 3, 224, 224) and x.dtype == torch.float32 and y.shape == (32,)
        assert torch.equal(x[:, 0], x[:, 2]) and x.isfinite().all()


def test_the_benchmark_runs_tiny():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_loader.py", "--images", "40", "--size", "32"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "(c)/(a)" in result.stdout and ">= 20x" in result.stdout
