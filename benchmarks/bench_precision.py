"""The study's 224 px setting on an image folder: zar's training step against the plain fp32 loop.

Side by side in one process, on one generated folder of JPEGs (bench_loader.write_jpegs):

  reference  torchvision resnet34, AdamW defaults, fp32, NCHW, fed by ImageFolder + PIL (the study's loop)
  zar        zar's engine (zar.learn.engine.train_one_epoch) on zar's cached loader, for each precision asked:
             fp32, bf16 (autocast + channels-last) and auto (what zar picks on this machine)

Each is timed over the same number of training batches after warm-up. Target: zar with
precision auto >= 3x the reference on a CPU with native bf16 (AMX or AVX512-BF16); on other
CPUs auto means fp32 and the script says that the target does not apply.

    python benchmarks/bench_precision.py [--images 256] [--size 224] [--steps 4]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # zar from this checkout, not an install

from _machine import header_lines  # noqa: E402
from bench_loader import study_loader, write_jpegs  # noqa: E402

TARGET = 3.0


def _endless(loader):
    """Batch after batch, epoch after epoch: a small folder still gives every timed step."""
    while True:
        yield from loader


def reference(root: Path, size: int, steps: int, warmup: int) -> float:
    """Images/s of the plain fp32 NCHW loop over ``steps`` batches."""
    torch.manual_seed(0)
    model = torchvision.models.resnet34(num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    batches = _endless(study_loader(root, size))
    seen, start = 0, None
    for i, (x, y) in enumerate(itertools.islice(batches, warmup + steps)):
        if i == warmup:
            seen, start = 0, time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def zar_engine(root: Path, size: int, steps: int, warmup: int, precision: str) -> tuple[float, str]:
    """Images/s of zar's engine at ``precision``, and the precision it resolved to."""
    from zar.config import load_config
    from zar.learn.data import load_data
    from zar.learn.engine import Trainer, resolve_device, train_one_epoch
    from zar.learn.models import build_model

    cfg = load_config(overrides={"data": str(root), "image_size": size, "precision": precision, "device": "cpu"})
    data = load_data(cfg)
    torch.manual_seed(0)
    trainer = Trainer(
        build_model("resnet", 34, len(data.classes)), data.train, data.val, cfg, resolve_device("cpu"), progress=False
    )
    batches = _endless(trainer.train_loader)
    if steps == 0:
        return 0.0, trainer.precision.name
    train_one_epoch(trainer.model, itertools.islice(batches, warmup), trainer.optimizer, trainer.precision, 0, False)
    start = time.perf_counter()
    train_one_epoch(trainer.model, itertools.islice(batches, steps), trainer.optimizer, trainer.precision, 0, False)
    return steps * cfg.batch_size / (time.perf_counter() - start), trainer.precision.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=4, help="timed training batches of 32 per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    from zar.learn.engine import native_bf16

    native = native_bf16(torch.device("cpu"))
    print("\n".join(header_lines(f"Training at {args.size} px: zar's engine vs the plain fp32 NCHW loop")))
    print(f"- native bf16 on this CPU: {'yes' if native else 'no (bf16 is emulated: auto keeps fp32)'}")
    print(f"- {args.images} generated JPEGs, batch 32, {args.steps} timed batches after {args.warmup} of warm-up\n")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ZAR_CACHE_DIR"] = str(Path(tmp) / "cache")
        root = Path(tmp) / "images"
        write_jpegs(root, args.images)
        zar_engine(root, args.size, 0, 0, "fp32")  # builds the image cache before any timing
        ref = reference(root, args.size, args.steps, args.warmup)
        rows = [("plain loop, fp32 NCHW, ImageFolder + PIL (reference)", ref)]
        speeds = {}
        for precision in ("fp32", "bf16", "auto"):
            speed, resolved = zar_engine(root, args.size, args.steps, args.warmup, precision)
            speeds[precision] = speed
            label = f"zar, precision {precision}" + (f" (= {resolved})" if precision == "auto" else "")
            rows.append((label, speed))
    print("| training | img/s | x reference |\n| --- | ---: | ---: |")
    for label, speed in rows:
        print(f"| {label} | {speed:.1f} | {speed / ref:.2f} |")
    ratio = speeds["auto"] / ref
    verdict = ("met" if ratio >= TARGET else "not met") if native else "does not apply: no native bf16 here"
    print(f"\nratio zar (precision auto) / plain fp32 loop: {ratio:.2f}x  (target >= {TARGET:.0f}x: {verdict})")


if __name__ == "__main__":
    main()
