"""The image cache over time: one cache per folder and size, rebuilt from the last one when files change.

Real folders, real images, real processes: a changed file supersedes the folder's cache, and the
new cache decodes only the files the last one does not hold.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import AN_HOUR_AGO, SIZE, Spy, age, cached_pixels, load, old_pixels, truncate, write_folder
from torch.utils.data import DataLoader

from zar.config import TrainConfig
from zar.learn import imagecache
from zar.learn.data import load_data


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, so that what a test sees was built by it."""
    monkeypatch.setenv("ZAR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def caches(cache: Path) -> list[str]:
    """The complete caches (pixels and their metadata) in the cache folder, by name."""
    return sorted(p.stem for p in cache.glob("v*.npy") if p.with_suffix(".json").exists())


def cache_of(data) -> str:
    """The name of the cache a bundle reads (the bundle is let go by the caller)."""
    return data.train.pixels_path.stem


def change(path: Path, colour: tuple[int, int, int]) -> None:
    """New content for one image, written a minute after the folder's other files."""
    Image.new("RGB", (40, 30), colour).save(path, quality=90)
    age(path, when=AN_HOUR_AGO + 60)


# --- superseded caches are removed, once the new one is complete ------------------------------------


def test_changing_a_file_twice_leaves_one_cache_of_the_folder(tmp_path, cache):
    folder = write_folder(tmp_path / "pets")
    names = [cache_of(load(folder))]
    for colour in ((250, 10, 10), (10, 250, 10)):
        change(folder / "dog" / "0.jpg", colour)
        names.append(cache_of(load(folder)))
    assert len(set(names)) == 3 and caches(cache) == [names[-1]]
    left = sorted(p.name for p in cache.iterdir() if not p.name.startswith(("stats-", "caches-")))
    assert left == [f"{names[-1]}{suffix}" for suffix in (".json", ".lock", ".npy")]  # no lock nor temp file left


def test_caches_of_other_folders_of_a_copy_and_of_other_sizes_are_kept(tmp_path, cache):
    pets = write_folder(tmp_path / "pets")
    copy = shutil.copytree(pets, tmp_path / "copy")  # the same content: it shares pets's cache
    birds = write_folder(tmp_path / "birds", classes=("owl", "tit"))
    kept = {cache_of(load(copy)), cache_of(load(birds))}
    kept.add(cache_of(load_data(TrainConfig(data=str(pets), image_size=SIZE + 8))))
    assert cache_of(load(pets)) in kept
    for colour in ((250, 10, 10), (10, 250, 10)):
        change(pets / "dog" / "0.jpg", colour)
        newest = cache_of(load(pets))
    assert caches(cache) == sorted(kept | {newest})


def test_a_cache_that_a_process_is_building_is_not_removed(tmp_path, cache):
    folder = write_folder(tmp_path / "pets")
    old = cache_of(load(folder))
    with open(cache / f"{old}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a process building it holds it
        change(folder / "dog" / "0.jpg", (250, 10, 10))
        new = cache_of(load(folder))
        assert caches(cache) == sorted([old, new])
    assert cache_of(load(folder)) == new and caches(cache) == [new]  # the next load removes it


READER = """
import hashlib, sys
from pathlib import Path
import numpy as np
from zar.learn import imagecache
root = Path(sys.argv[1])
files = [(str(p.relative_to(root)), ["cat", "dog"].index(p.parent.name)) for p in sorted(root.rglob("*.*"))]
cached = imagecache.load(root, ["cat", "dog"], files, 24)  # held until this process ends
print(cached.pixels_path.stem, hashlib.sha256(np.load(cached.pixels_path)).hexdigest(), flush=True)
sys.stdin.readline()  # meanwhile the folder changes and another process loads it
pixels = np.load(cached.pixels_path, mmap_mode="r")  # opened by name only now, as a DataLoader worker does
print(hashlib.sha256(pixels).hexdigest(), flush=True)
"""


def test_a_process_reading_the_old_cache_keeps_it_until_it_exits(tmp_path, cache):
    folder = write_folder(tmp_path / "pets")
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        old, before = reader.stdout.readline().split()
        change(folder / "dog" / "0.jpg", (250, 10, 10))
        new = cache_of(load(folder))
        assert caches(cache) == sorted([old, new])
        after = reader.communicate("go\n", timeout=120)[0].strip()
    finally:
        reader.kill()
    assert reader.returncode == 0 and after == before
    assert cache_of(load(folder)) == new and caches(cache) == [new]  # let go of: the next load removes it


def test_a_bundle_in_use_keeps_its_cache_until_it_is_let_go(tmp_path, cache):
    """A DataLoader opens the pixels by name, in each worker, each epoch: they must outlive the training."""
    folder = write_folder(tmp_path / "pets")
    data = load(folder)
    change(folder / "dog" / "0.jpg", (250, 10, 10))
    new = cache_of(load(folder))
    assert caches(cache) == sorted([cache_of(data), new])
    loader = DataLoader(data.train, batch_size=len(data.train), num_workers=2)
    x, _ = next(iter(loader))  # workers started now open the old pixels
    assert x.shape == (len(data.train), 3, SIZE, SIZE)
    del data, loader
    assert cache_of(load(folder)) == new and caches(cache) == [new]


def test_pixels_mapped_before_their_cache_is_removed_read_the_same(tmp_path, cache):
    """What removing relies on: on Linux (POSIX), a file unlinked while mapped lives on until unmapped."""
    folder = write_folder(tmp_path / "pets")
    path = load(folder).train.pixels_path
    mapped = np.load(path, mmap_mode="r")  # a map alone does not keep the cache (a loaded bundle does)
    pixels = np.array(mapped)
    change(folder / "dog" / "0.jpg", (250, 10, 10))
    load(folder)
    assert not path.exists() and np.array_equal(mapped, pixels)


# --- a new cache reuses the rows of the last one -------------------------------------------------------


def test_only_the_files_that_changed_are_decoded(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "pets")  # 10 images
    load(folder)
    decodes = Spy(monkeypatch, imagecache, "decode")
    changed = folder / "dog" / "0.jpg"
    change(changed, (250, 10, 10))
    data = load(folder)
    assert decodes.calls == 1
    ids = data.train_ids + data.val_ids
    pixels = np.concatenate([cached_pixels(data.train), cached_pixels(data.val)])
    assert np.array_equal(pixels[ids.index(os.path.join("dog", "0.jpg"))], old_pixels(changed))

    change(folder / "cat" / "added.jpg", (10, 10, 250))
    load(folder)
    assert decodes.calls == 2  # a file added: it alone
    (folder / "cat" / "1.png").unlink()
    load(folder)
    (folder / "dog" / "2.png").rename(folder / "cat" / "2-from-dog.png")  # other name, other class
    load(folder)
    assert decodes.calls == 2  # a file removed, a file moved: nothing to decode


def test_a_cache_built_from_the_last_one_is_byte_identical_to_one_built_from_nothing(tmp_path, cache, monkeypatch):
    folder = write_folder(tmp_path / "pets", per_class=6)
    truncate(folder / "dog" / "3.jpg")  # a row that does not decode, carried over
    load(folder, skip_bad_images=True)
    change(folder / "dog" / "0.jpg", (250, 10, 10))
    change(folder / "cat" / "added.jpg", (10, 10, 250))
    (folder / "cat" / "1.png").unlink()
    (folder / "dog" / "2.png").rename(folder / "cat" / "2-from-dog.png")
    truncate(folder / "cat" / "4.png")  # a row that no longer decodes
    decodes = Spy(monkeypatch, imagecache, "decode")
    reused = load(folder, skip_bad_images=True)
    assert decodes.calls == 3  # the changed, the added and the newly truncated file
    monkeypatch.setenv("ZAR_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = load(folder, skip_bad_images=True)
    assert decodes.calls == 3 + 12
    name = cache_of(reused)
    assert cache_of(fresh) == name
    assert reused.skipped == fresh.skipped == [os.path.join("cat", "4.png"), os.path.join("dog", "3.jpg")]
    for suffix in (".npy", ".json"):
        built = (tmp_path / "fresh" / "images" / name).with_suffix(suffix).read_bytes()
        assert (cache / name).with_suffix(suffix).read_bytes() == built, suffix
    assert reused.data_fingerprint == fresh.data_fingerprint


def test_a_cache_made_before_rows_were_reused_is_still_hit_then_replaced(tmp_path, cache, monkeypatch):
    """Its metadata names no file's bytes: it serves the same folder, and a change decodes the folder again."""
    folder = write_folder(tmp_path / "pets")
    old = cache_of(load(folder))
    meta = json.loads((cache / f"{old}.json").read_text())
    del meta["sha256"]
    (cache / f"{old}.json").write_text(json.dumps(meta))
    decodes = Spy(monkeypatch, imagecache, "decode")
    assert cache_of(load(folder)) == old and decodes.calls == 0
    change(folder / "dog" / "0.jpg", (250, 10, 10))
    assert cache_of(load(folder)) != old and decodes.calls == 10 and len(caches(cache)) == 1
