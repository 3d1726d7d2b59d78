"""The bench join: each row of the table with the ``zar bench`` run that measured its architecture
and settings (latency, FLOPs, peak memory), or the settings no bench run measured."""

from __future__ import annotations

from ..variants import VARIANTS
from .fetch import BenchRun, RunRow, param_value

# What a row keeps of its bench run, in the order CSV columns show them.
BENCH_KEYS = (
    "run_id",
    "device",
    "latency_ms_median",
    "latency_ms_p90",
    "latency_ms_median_min",
    "latency_ms_median_max",
    "flops_per_image",
    "peak_memory_mb",
)


def match_bench(runs_of_row: list[RunRow], bench: list[BenchRun]) -> tuple[BenchRun | None, str]:
    """The most recent bench run of the row's architecture, depth, image size and device (and SE
    reduction, for an architecture with SE); else None and the settings no bench run measured."""
    first = runs_of_row[0]
    devices = sorted({r.device for r in runs_of_row})
    image_size = param_value(first, "image_size")
    variant = VARIANTS.get(first.model)
    uses_se = variant is None or variant.attn == "se"
    se_reduction = param_value(first, "se_reduction") if uses_se else None
    wanted = f"{first.model}, depth {first.depth}, image_size {image_size or 'unrecorded'}"
    wanted += f", se_reduction {se_reduction or 'unrecorded'}" if uses_se else ""
    if len(devices) > 1:
        return None, f"{wanted}: its runs trained on {', '.join(d or 'unrecorded' for d in devices)}"
    wanted += f", device {devices[0] or 'unrecorded'}"
    candidates = [
        b
        for b in bench
        if (b.model, b.depth, b.image_size, b.device) == (first.model, first.depth, image_size, devices[0])
        and (not uses_se or b.se_reduction == se_reduction)
    ]
    if not candidates:
        return None, wanted
    return max(candidates, key=lambda b: b.start_time), wanted


def bench_numbers(b: BenchRun) -> dict:
    """What the table shows of a bench run: latency, FLOPs, memory (RSS on CPU, allocated on CUDA)."""
    memory = b.metrics.get("cuda_peak_mb") if b.device == "cuda" else b.metrics.get("peak_rss_mb")
    return {
        "run_id": b.run_id,
        "device": b.device,
        "latency_ms_median": b.metrics.get("latency_ms_median"),
        "latency_ms_p90": b.metrics.get("latency_ms_p90"),
        "latency_ms_median_min": b.metrics.get("latency_ms_median_min"),
        "latency_ms_median_max": b.metrics.get("latency_ms_median_max"),
        "flops_per_image": b.metrics.get("flops_per_image"),
        "peak_memory_mb": memory,
    }
