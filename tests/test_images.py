"""Image folders read as an image library reads them: hidden files, EXIF, bit depths, transparency, bombs, names."""

from __future__ import annotations

import io
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_data import SIZE, Spy, age, cached_pixels, load, write_folder

from zar.learn import imagecache
from zar.learn.data import DataError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, so that what a test sees was built by it."""
    monkeypatch.setenv("ZAR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def pixels_of(data, sample_id: str) -> np.ndarray:
    """The cached 3 x S x S uint8 of one sample of a bundle."""
    for dataset, ids in ((data.train, data.train_ids), (data.val, data.val_ids)):
        if sample_id in ids:
            return cached_pixels(dataset)[ids.index(sample_id)]
    raise KeyError(sample_id)


def decoded(image: Image.Image, fmt: str = "PNG", **save) -> np.ndarray:
    """What zar makes of ``image`` saved as ``fmt``: S x S x 3 uint8, refusing any warning."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return imagecache.decode(buffer.getvalue(), SIZE).transpose(1, 2, 0)


def resized(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


# --- which files are samples ---------------------------------------------------------------------


def test_hidden_files_and_folders_at_any_depth_are_never_samples(tmp_path):
    folder = write_folder(tmp_path / "pets")
    images = [str(p.relative_to(folder)) for p in folder.rglob("*.*")]
    cat = folder / "cat"
    (cat / "._0.jpg").write_bytes(b"\0\5\26\7 AppleDouble resource fork, not an image")
    (cat / ".DS_Store").write_bytes(b"Bud1")
    for hidden in (cat / ".ipynb_checkpoints", cat / ".hidden", cat / "sub" / ".cache", folder / ".trash"):
        hidden.mkdir(parents=True)
        shutil.copy(cat / "1.png", hidden / "1-checkpoint.png")  # a copy could land in the other split
    shutil.copy(cat / "1.png", cat / "sub" / ".1.png")
    shutil.copy(cat / "2.png", cat / "sub" / "kept.png")
    age(*folder.rglob("*"))
    data = load(folder)
    ids = data.train_ids + data.val_ids
    assert sorted(ids) == sorted([*images, os.path.join("cat", "sub", "kept.png")]) and len(ids) == 11
    assert data.classes == ["cat", "dog"]


# --- how a file becomes pixels -----------------------------------------------------------------------


def test_exif_orientation_is_applied_before_resizing(tmp_path):
    """A phone's portrait is stored landscape with Orientation 6 (turn 90 degrees clockwise to view)."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = write_folder(tmp_path / "pets")
    Image.fromarray(stored).save(folder / "cat" / "portrait.png", exif=exif)
    age(folder / "cat" / "portrait.png")
    pixels = pixels_of(load(folder), os.path.join("cat", "portrait.png")).transpose(1, 2, 0)
    assert (pixels[: SIZE // 3] == (255, 0, 0)).all() and (pixels[-SIZE // 3 :] == (0, 0, 255)).all()  # red on top
    with Image.open(folder / "cat" / "portrait.png") as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert upright.shape == (40, 20, 3) and np.array_equal(pixels, resized(upright))


GRADIENT = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))  # 16 x 64, black to white


def test_a_16_bit_gradient_keeps_its_high_byte_in_every_format_pillow_reads_it_in(tmp_path):
    """PNG and TIFF open as Pillow's mode I;16, a 16-bit PGM as mode I: the same picture, the same pixels."""
    expected = resized(np.stack([(GRADIENT >> 8).astype(np.uint8)] * 3, axis=-1))
    for fmt in ("PNG", "TIFF", "PPM"):
        pixels = decoded(Image.fromarray(GRADIENT), fmt)
        assert np.array_equal(pixels, expected), fmt
    assert pixels.min() < 10 and pixels.max() > 245 and len(np.unique(pixels)) > 20  # not black, not white


def test_float_and_32_bit_images_are_stretched_from_their_range():
    """Mode F and an I image beyond 16 bits have no fixed range: their min..max becomes 0..255."""
    ramp = GRADIENT.astype(np.float64) / 65535  # 0..1
    expected = resized(np.stack([np.rint(ramp * 255).astype(np.uint8)] * 3, axis=-1))
    assert np.array_equal(decoded(Image.fromarray((ramp * 10 - 3).astype(np.float32)), "TIFF"), expected)
    assert np.array_equal(decoded(Image.fromarray((ramp * 2**24).round().astype(np.int32)), "TIFF"), expected)


def test_transparency_is_composited_on_black_without_warnings():
    """RGBA, LA and palettes with transparency: colour times alpha, the same as convert('RGB') where opaque."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (200, 100, 50, 255)  # opaque
    rgba[:, 4:] = (200, 100, 50, 128)  # half transparent
    pixels = decoded(Image.fromarray(rgba))
    assert tuple(pixels[4, 0]) == (200, 100, 50) and tuple(pixels[4, -1]) == (100, 50, 25)
    la = decoded(Image.fromarray(rgba).convert("LA"))
    grey = Image.fromarray(rgba[..., :3]).convert("L").getpixel((0, 0))
    assert tuple(la[4, 0]) == (grey,) * 3 and tuple(la[4, -1]) == (round(grey * 128 / 255),) * 3

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([200, 100, 50, 10, 200, 30])
    palette.paste(1, (4, 0, 8, 8))
    # alpha per palette entry, as bytes: convert('RGB') warns of it and drops it
    pixels = decoded(palette, transparency=bytes([0, 255]))
    assert tuple(pixels[4, 0]) == (0, 0, 0) and tuple(pixels[4, -1]) == (10, 200, 30)
    pixels = decoded(palette, "GIF", transparency=0)  # one transparent index
    assert tuple(pixels[4, 0]) == (0, 0, 0) and tuple(pixels[4, -1]) == (10, 200, 30)


def test_opaque_images_decode_as_before():
    """RGB, grayscale and palette images without transparency: convert('RGB') and PIL's bilinear resize."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    for image in (rgb, rgb.convert("L"), rgb.convert("P"), rgb.convert("1"), rgb.convert("CMYK")):
        fmt = "TIFF" if image.mode == "CMYK" else "PNG"
        expected = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        assert np.array_equal(decoded(image, fmt), expected), image.mode


def bomb_png(path: Path, width: int, height: int) -> None:
    """A real PNG of width x height black 1-bit pixels: tens of kB that decode to far more."""
    row = b"\0" + bytes((width + 7) // 8)  # filter byte, then the row's bits

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )
    age(path)


@pytest.mark.parametrize(("width", "height"), [(20000, 10000), (10000, 9000)], ids=["error", "warning"])
def test_a_decompression_bomb_is_named_as_such_and_skipped_on_request(tmp_path, width, height):
    """Over twice Pillow's MAX_IMAGE_PIXELS it raises DecompressionBombError, over once it warns: both refused."""
    folder = write_folder(tmp_path / "pets")
    bomb = folder / "dog" / "bomb.png"
    bomb_png(bomb, width, height)
    message = (
        f"image {bomb} is too large to decode ({width * height:,} pixels, over Pillow's decompression-bomb "
        f"limit of {Image.MAX_IMAGE_PIXELS:,}); remove or shrink it, or pass --skip-bad-images"
    )
    for _ in range(2):  # building the cache, then from the cache
        with pytest.raises(DataError) as e:
            load(folder)
        assert str(e.value) == message
    skipping = load(folder, skip_bad_images=True)
    assert skipping.skipped == [os.path.join("dog", "bomb.png")] and len(skipping.train) + len(skipping.val) == 10


# --- file names that are not UTF-8 -------------------------------------------------------------------


def test_names_that_are_not_utf8_are_kept_and_shown_as_escapes(tmp_path, monkeypatch):
    """A class folder and a file whose names' bytes are not UTF-8, as old archives have them."""
    folder = write_folder(tmp_path / "pets")
    cafe = folder / os.fsdecode(b"caf\xe9")
    try:
        cafe.mkdir()
        for i in range(3):
            Image.new("RGB", (20, 20), (i, 2, 3)).save(cafe / os.fsdecode(b"\xff%d.png" % i))
        (cafe / os.fsdecode(b"\xfe.png")).write_bytes(b"not an image")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    age(*cafe.iterdir())
    with pytest.raises(DataError) as e:
        load(folder)
    assert str(e.value).startswith(f"unreadable image {folder}/caf\\xe9/\\xfe.png (")
    str(e.value).encode("utf-8")  # printable, also where stdout is UTF-8
    data = load(folder, skip_bad_images=True)
    ids = data.train_ids + data.val_ids
    assert data.classes == ["caf\\xe9", "cat", "dog"] and data.skipped == ["caf\\xe9/\\xfe.png"]
    assert {"caf\\xe9/\\xff0.png", "caf\\xe9/\\xff1.png", "caf\\xe9/\\xff2.png"} <= set(ids) and len(ids) == 13
    for text in (*ids, *data.classes, *data.skipped, data.name, data.source, data.fingerprint, data.data_fingerprint):
        text.encode("utf-8")  # the MLflow dataset records, tags and params take text
    for name in ("_hash_file", "decode"):
        Spy(monkeypatch, imagecache, name, forbid=True)
    hits = load(folder, skip_bad_images=True)  # from the stat cache and the image cache
    assert (hits.data_fingerprint, hits.fingerprint, hits.val_ids) == (
        data.data_fingerprint,
        data.fingerprint,
        data.val_ids,
    )
