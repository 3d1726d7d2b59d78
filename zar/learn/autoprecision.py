"""``precision: auto`` on a CPU: bf16 where a quick measurement on this machine says it trains faster.

Whether bf16 pays depends on the CPU and the thread count as much as on the image size. On a
2-core AMD EPYC with avx512_bf16, a ResNet-34 training step at 32 px was 1.15x faster in bf16 on
one thread and 0.94-1.10x on two (benchmarks/bench_bf16.py, issue 23); on a Xeon with AMX bf16 was
slower than fp32 at 32 px (issue 8). So ``auto`` times a few training steps of ResNet-34 at the
run's image size, batch size and thread count (a study's children one thread each, ``zar train``
alone every core) in both precisions, once per CPU model, torch version, size, batch and thread
count, and keeps the answer in ``$ZAR_CACHE_DIR/precision.json`` (default ``~/.cache/zar``).
A CPU without native bf16 (AMX or AVX512-BF16) never gets bf16: emulated, it is slower, and
nothing is measured.

The measurement takes a few seconds at 32 px (about 30 s at 224 px), paid once per machine and size.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from . import imagecache

FASTER = 0.9  # bf16 is chosen when its step takes at most this share of fp32's: timings on a busy machine wobble
STEPS, WARMUP = 2, 1  # timed steps (the fastest counts) after warm-up steps, per precision
CACHE_NAME = "precision.json"


def cache_path() -> Path:
    """Beside the image cache, under the one cache root zar has ($ZAR_CACHE_DIR, else ~/.cache/zar)."""
    return imagecache.cache_dir().parent / CACHE_NAME


def choose(image_size: int, batch_size: int, threads: int) -> str:
    """'bf16' or 'fp32' for CPU training at ``image_size`` px on ``threads`` threads of this machine
    (measured once, then cached)."""
    return "bf16" if measured(image_size, batch_size, threads)["bf16_vs_fp32"] <= FASTER else "fp32"


def measured(image_size: int, batch_size: int, threads: int) -> dict:
    """This machine's measurement: seconds per training step in each precision and their ratio."""
    key = f"{cpu_model()} | torch {torch.__version__} | {image_size} px | batch {batch_size} | {threads} threads"
    known = _read_cache()
    if key not in known:
        known = _read_cache() | {key: measure(image_size, batch_size, threads)}  # again: another process wrote?
        _write_cache(known)
    return known[key]


def measure(image_size: int, batch: int, threads: int = 1) -> dict:
    """Seconds per training step of ResNet-34 (AdamW) on ``batch`` images, on ``threads`` threads, in fp32 and bf16."""
    from .models import build_model

    x, y = torch.rand(batch, 3, image_size, image_size), torch.arange(batch) % 10
    seconds = {}
    with _threads(threads):
        for name in ("fp32", "bf16"):
            # As zar.learn.engine.Precision trains: bf16 is autocast with channels-last memory.
            memory_format = torch.channels_last if name == "bf16" else torch.contiguous_format
            torch.manual_seed(0)
            model = build_model("resnet", 34, 10).to(memory_format=memory_format)
            optimizer = torch.optim.AdamW(model.parameters(), fused=True)
            inputs = x.contiguous(memory_format=memory_format)
            times = []
            for step in range(WARMUP + STEPS):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    loss = nn.functional.cross_entropy(model(inputs), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step >= WARMUP:
                    times.append(time.perf_counter() - start)
            seconds[name] = min(times)
    return {
        "fp32_s": round(seconds["fp32"], 4),
        "bf16_s": round(seconds["bf16"], 4),
        "bf16_vs_fp32": round(seconds["bf16"] / seconds["fp32"], 3),
        "batch": batch,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def _threads(n: int):
    """Torch's CPU ops on ``n`` threads, then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_model() -> str:
    """The first 'model name' of /proc/cpuinfo; the platform's processor string elsewhere."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _read_cache() -> dict:
    try:
        known = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_cache(known: dict) -> None:
    """Whole or not at all; a cache that cannot be written is no error (the next run measures again)."""
    path = cache_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, path)
