"""torch.compile against eager, honestly: compile time included, with inductor's caches cold and warm.

Three processes, one after another, each training zar's ResNet-34 on the digits at 32 px (AdamW,
batch 32, fp32, one thread as a ``--jobs 2`` study child) for ``--epochs`` epochs:

  eager      the reference: zar's engine as it trains today
  cold       torch.compile(model), with empty FX-graph / AOT-autograd caches (a first run)
  warm       the same again, with the caches the cold run left (every later run of the architecture)

Each reports its first epoch (which pays for compiling) and its later epochs. The verdict is the
projected wall time of a 10-epoch run: ``first + 9 x later`` for each, warm against eager.

    python benchmarks/bench_compile.py [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import PYTHON, header_lines

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from zar.config import load_config
from zar.learn.data import load_data
from zar.learn.engine import Trainer, resolve_device, train_one_epoch
from zar.learn.models import build_model

mode, epochs = sys.argv[2], int(sys.argv[3])
cfg = load_config(overrides={"data": "digits", "image_size": 32, "precision": "fp32", "device": "cpu", "workers": 0})
data = load_data(cfg)
torch.manual_seed(0)
model = build_model("resnet", 34, len(data.classes))
trainer = Trainer(model, data.train, data.val, cfg, resolve_device("cpu"), progress=False)
net = torch.compile(trainer.model) if mode != "eager" else trainer.model
times = []
for epoch in range(1, epochs + 1):
    start = time.perf_counter()
    train_one_epoch(net, trainer.train_loader, trainer.optimizer, trainer.precision, epoch, False)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def run(mode: str, epochs: int, threads: int, cache: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = env["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-c", CHILD, str(ROOT), mode, str(epochs)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {mode}: {', '.join(f'{t:.1f}' for t in times)} s per epoch ({time.perf_counter() - start:.0f} s process)")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print("\n".join(header_lines("torch.compile vs eager: ResNet-34, digits at 32 px, fp32")))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "inductor"
        results = {mode: run(mode, args.epochs, args.threads, cache) for mode in ("eager", "cold", "warm")}
    print("\n| | first epoch (s) | later epochs (s, mean) | 10-epoch run, projected (s) |")
    print("| --- | ---: | ---: | ---: |")
    projected = {}
    for mode, times in results.items():
        later = sum(times[1:]) / max(1, len(times) - 1)
        projected[mode] = times[0] + 9 * later
        print(f"| {mode} | {times[0]:.1f} | {later:.1f} | {projected[mode]:.0f} |")
    print(f"\nratio eager / compiled with warm caches, 10-epoch run: {projected['eager'] / projected['warm']:.2f}x")
    print(f"ratio eager / compiled with cold caches, 10-epoch run: {projected['eager'] / projected['cold']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
