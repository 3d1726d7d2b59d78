"""bf16 against fp32 on this CPU: one training step of zar's ResNet-34 at 32, 64 and 224 px.

Side by side in one process, on random images, AdamW (fused), batch 32, for each thread count
asked (1: as a ``--jobs 2`` child trains on two cores; all: as ``zar train`` alone):

  fp32     the reference: NCHW, float32
  bf16     autocast to bfloat16, NCHW
  bf16-cl  autocast to bfloat16, channels-last (what zar's ``precision: bf16`` runs)

Prints each median step time and its speed-up over fp32, and what ``precision: auto`` chose here
(zar.learn.autoprecision). Only meaningful on a CPU with native bf16 (AMX or AVX512-BF16): it
says so on others.

    python benchmarks/bench_bf16.py [--sizes 32,64,224] [--threads 1,2] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # zar from this checkout, not an install

from _machine import header_lines  # noqa: E402

VARIANTS = {
    "fp32": (None, torch.contiguous_format),
    "bf16": (torch.bfloat16, torch.contiguous_format),
    "bf16-cl": (torch.bfloat16, torch.channels_last),
}


def step_time(size: int, batch: int, variant: str, steps: int, warmup: int = 2) -> float:
    """Median seconds of one training step (forward, backward, optimizer) of ResNet-34."""
    from zar.learn.models import build_model

    dtype, memory_format = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model("resnet", 34, 10).to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=memory_format)
    y = torch.arange(batch) % 10
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,64,224")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    from zar.learn.autoprecision import choose
    from zar.learn.engine import native_bf16

    print("\n".join(header_lines("bf16 vs fp32: one ResNet-34 training step")))
    native = native_bf16(torch.device("cpu"))
    print(f"native bf16 (AMX or AVX512-BF16): {'yes' if native else 'no: bf16 is emulated here, auto stays fp32'}\n")
    print("| threads | px | batch | fp32 (ms) | bf16 NCHW (ms) | bf16 channels-last (ms) | speed-up, bf16-cl | auto |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | :-: |")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for size in (int(s) for s in args.sizes.split(",")):
            steps = args.steps if size < 128 else max(2, args.steps // 2)
            ms = {v: 1000 * step_time(size, args.batch, v, steps) for v in VARIANTS}
            auto = choose(size, args.batch, threads) if native else "fp32"
            print(
                f"| {threads} | {size} | {args.batch} | {ms['fp32']:.0f} | {ms['bf16']:.0f} | {ms['bf16-cl']:.0f} "
                f"| {ms['fp32'] / ms['bf16-cl']:.2f}x | {auto} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
