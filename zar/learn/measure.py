"""What each architecture costs to run: parameters, FLOPs, latency, throughput, a training step, memory.

torch only, numbers in and numbers out: ``zar bench`` records them in MLflow. Each architecture
is measured in a fresh Python process (``python -m zar.learn.measure SPEC OUT``), because the peak
memory of a process (``ru_maxrss``) is its high-water mark over its whole life: measured one
after another in one process, every architecture would carry the peaks of those before it.
On Linux the process also resets its high-water mark once torch is imported (``/proc/self/clear_refs``),
so that a transient peak of the imports is not taken for the architecture's; the peak is then
``VmHWM``. The increase is that peak less the RSS just before the model was built.

Timings use ``torch.utils.benchmark.Timer`` with torch's own thread count (the Timer's default
is one thread), which synchronises the accelerator around each timed block:

- latency: batch 1, inference mode, one call per sample (``Timer.timeit(1)``, which runs the call
  twice untimed before each timed one), so that its median and p90 are those of single calls;
- throughput: batch ``BATCH``, inference mode, ``blocked_autorange`` (blocks of calls, median);
- training step: batch ``BATCH``, forward, cross-entropy, backward and the study's optimizer step
  (AdamW, fused, at the default config's lr and weight decay, as zar.learn.engine makes it),
  ``blocked_autorange``, median.

zar.learn.engine is not imported: it brings the data stack (scikit-learn, torchvision), which would
add seconds and hundreds of MiB to every measuring process.

Timings on a shared or throttled machine drift by tens of percent from one process to the next, so
``zar bench`` measures every architecture ``--rounds`` times, a round being each architecture once in
rotated order (``rounds_order``), and reports the median of each number with the range of the
latency medians (``combine``).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a forward pass of
``FLOP_BATCH`` images, divided by the batch: convolutions and matrix products only (a
multiply-add is 2 FLOPs); batch norm, activations, pooling and SE's scaling are not counted.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from torch.nn import functional as F
from torch.utils.benchmark import Measurement, Timer
from torch.utils.flop_counter import FlopCounterMode

from ..config import TrainConfig
from ..errors import UserError, ZarException
from ..variants import get_variant
from .models import build_model, count_params

LATENCY_BATCH = 1
BATCH = 32  # throughput and training step: the study's batch size
FLOP_BATCH = 2
WARMUP_CALLS = 3
MIN_LATENCY_SAMPLES = 10
# MLflow metric -> what it is; zar bench logs every one of them (cuda_peak_mb on CUDA only).
METRICS = {
    "params_total": "parameters",
    "flops_per_image": "FLOPs per image, forward pass (conv and linear; a multiply-add is 2)",
    "latency_ms_median": "ms per image at batch 1, median of single calls",
    "latency_ms_p90": "ms per image at batch 1, 90th percentile of single calls",
    "throughput_img_s": f"images per second at batch {BATCH}, inference",
    "train_step_ms": f"ms per training step at batch {BATCH} (forward, backward, optimizer), median",
    "peak_rss_mb": "the bench process's RSS high-water mark while measuring, MiB (torch and Python included)",
    "peak_rss_increase_mb": "that peak less the process's RSS before the model was built, MiB",
    "latency_ms_median_min": "the lowest of the rounds' batch-1 latency medians, ms",
    "latency_ms_median_max": "the highest of the rounds' batch-1 latency medians, ms",
}


class BenchFailed(ZarException):
    """A measurement failed (out of memory, a crash in the measuring process): exit code 1."""


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: one architecture at one size, on one device ('cpu' or 'cuda', resolved)."""

    model: str
    depth: int = 34
    image_size: int = 32
    num_classes: int = 10
    se_reduction: int = 16
    device: str = "cpu"
    min_time: float = 1.0  # seconds each timing runs for, after its warm-up

    @property
    def display_name(self) -> str:
        return get_variant(self.model).display_name(self.depth, self.se_reduction)


def device_name(name: str) -> str:
    """'auto', 'cpu' or 'cuda' as the device the bench will run on (as training resolves it); no GPU
    for 'cuda' is a UserError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available; use --device auto or cpu")
    return name


def flops_per_image(model: torch.nn.Module, image_size: int, device: str = "cpu", batch: int = FLOP_BATCH) -> float:
    """FLOPs of one forward pass per image, as FlopCounterMode counts them (conv and matmul, 2 per MAC)."""
    model.eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / batch


def _reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux 4.0+); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _rss_peak_mb(reset: bool) -> float:
    """The RSS high-water mark: since the reset (VmHWM) where there was one, else over the process's
    life (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def latency(model, x: torch.Tensor, min_time: float, threads: int) -> Measurement:
    """Single calls, each timed alone after two untimed ones, until ``min_time`` has passed."""
    timer = Timer("model(x)", globals={"model": model, "x": x}, num_threads=threads)
    samples = []
    deadline = time.perf_counter() + min_time
    with torch.inference_mode():
        while len(samples) < MIN_LATENCY_SAMPLES or time.perf_counter() < deadline:
            samples.append(timer.timeit(1))
    (merged,) = Measurement.merge(samples)
    return merged


def measure(spec: BenchSpec) -> dict[str, float]:
    """Every number of METRICS for one architecture, in this process (see measure_in_subprocess)."""
    threads = torch.get_num_threads()
    device = torch.device(spec.device)
    torch.manual_seed(0)
    reset = _reset_rss_peak()
    rss_start = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(spec.model, spec.depth, spec.num_classes, spec.se_reduction).to(device)
    out: dict[str, float] = {"params_total": float(count_params(model)["params_total"])}
    out["flops_per_image"] = flops_per_image(model, spec.image_size, spec.device)

    shape = (3, spec.image_size, spec.image_size)
    model.eval()
    one = torch.randn(LATENCY_BATCH, *shape, device=device)
    batch = torch.randn(BATCH, *shape, device=device)
    with torch.inference_mode():
        for _ in range(WARMUP_CALLS):
            model(one)
            model(batch)
    single = latency(model, one, spec.min_time, threads)
    out["latency_ms_median"] = 1e3 * single.median / LATENCY_BATCH
    out["latency_ms_p90"] = 1e3 * statistics.quantiles(single.times, n=10, method="inclusive")[-1] / LATENCY_BATCH
    with torch.inference_mode():
        timer = Timer("model(x)", globals={"model": model, "x": batch}, num_threads=threads)
        out["throughput_img_s"] = BATCH / timer.blocked_autorange(min_run_time=spec.min_time).median

    model.train()
    cfg = TrainConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    labels = torch.randint(0, spec.num_classes, (BATCH,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch), labels).backward()
        optimizer.step()

    for _ in range(WARMUP_CALLS):
        step()
    timer = Timer("step()", globals={"step": step}, num_threads=threads)
    out["train_step_ms"] = 1e3 * timer.blocked_autorange(min_run_time=spec.min_time).median

    out["peak_rss_mb"] = _rss_peak_mb(reset)
    out["peak_rss_increase_mb"] = out["peak_rss_mb"] - rss_start
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["torch_threads"] = float(threads)
    return out


def measure_in_subprocess(spec: BenchSpec) -> dict[str, float]:
    """``measure(spec)`` in a fresh Python process, so that its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, "-m", "zar.learn.measure", json.dumps(asdict(spec)), str(result)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not result.exists():
            lines = proc.stderr.strip().splitlines()
            reason = lines[-1] if lines else f"the measuring process ended with exit code {proc.returncode}"
            raise BenchFailed(f"bench of {spec.model} failed: {reason.removeprefix('Error: ')}")
        return json.loads(result.read_text())


def rounds_order(specs: list[BenchSpec], rounds: int) -> list[tuple[int, BenchSpec]]:
    """(round, spec) in the order to measure them: every architecture once per round, each round
    starting one architecture later, so that a slow spell of the machine, or the first process's
    cold caches, falls on different architectures rather than always on the same one."""
    n = len(specs)
    return [(r, specs[(r + i) % n]) for r in range(rounds) for i in range(n)]


def combine(measured: list[dict[str, float]]) -> dict[str, float]:
    """One architecture's rounds as one set of numbers: the median of each, and the spread of the
    batch-1 latency, so a reader sees how far one round's figure is to be trusted."""
    out = {k: statistics.median(m[k] for m in measured) for k in measured[0]}
    out["latency_ms_median_min"] = min(m["latency_ms_median"] for m in measured)
    out["latency_ms_median_max"] = max(m["latency_ms_median"] for m in measured)
    out["rounds"] = float(len(measured))
    return out


# --- the table ----------------------------------------------------------------------------------------


def columns(device: str) -> list[str]:
    memory = "Peak CUDA memory allocated (MiB)" if device == "cuda" else "Peak RSS (MiB, process)"
    return [
        "Model",
        "Params (M)",
        "MFLOPs/image, forward (conv+linear, 2 per MAC)",
        "Latency, batch 1, median (ms)",
        "Latency, batch 1, p90 (ms)",
        "Latency median, range over rounds (ms)",
        f"Throughput, batch {BATCH} (img/s)",
        f"Train step, batch {BATCH}, median (ms)",
        memory,
        "RSS increase (MiB)",
    ]


def render(results: list[tuple[BenchSpec, dict[str, float]]]) -> str:
    """The measured architectures as a Markdown table, one row each, with what the numbers are under it."""
    if not results:
        return ""
    device = results[0][0].device
    headers = columns(device)
    lines = ["| " + " | ".join(headers) + " |", "| --- | " + " | ".join(["---:"] * (len(headers) - 1)) + " |"]
    for spec, m in results:
        memory = m.get("cuda_peak_mb") if device == "cuda" else m["peak_rss_mb"]
        cells = [
            spec.display_name,
            f"{m['params_total'] / 1e6:.2f}",
            f"{m['flops_per_image'] / 1e6:,.1f}",
            f"{m['latency_ms_median']:.2f}",
            f"{m['latency_ms_p90']:.2f}",
            f"{m['latency_ms_median_min']:.2f}-{m['latency_ms_median_max']:.2f}",
            f"{m['throughput_img_s']:,.0f}",
            f"{m['train_step_ms']:.1f}",
            f"{memory:,.0f}",
            f"{m['peak_rss_increase_mb']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    spec, m = results[0]
    lines += [
        "",
        f"At {spec.image_size} px, depth {spec.depth}, {spec.num_classes} classes, on {device} with "
        f"{int(m['torch_threads'])} torch thread(s), fp32. Every number is the median over {int(m['rounds'])} "
        "round(s); a round measures each architecture once, in a fresh process, the rounds in rotated order.",
        "FLOPs: convolutions and linear layers of one forward pass (torch FlopCounterMode; a multiply-add is 2).",
        f"Latency: single calls, median and 90th percentile; throughput and train step (forward, backward, "
        f"AdamW step): median of timed blocks at batch {BATCH}.",
        "Peak RSS: the measuring process's high-water mark, torch and Python included; RSS increase: that peak "
        "less the process's RSS before the model was built."
        if device != "cuda"
        else "Peak CUDA memory: torch.cuda.max_memory_allocated over all measurements.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m zar.learn.measure SPEC_JSON OUT_PATH``: measure, write the numbers as JSON to OUT_PATH."""
    spec_json, out_path = argv
    try:
        numbers = measure(BenchSpec(**json.loads(spec_json)))
    except Exception as e:  # one line for the parent to report
        print(f"Error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    Path(out_path).write_text(json.dumps(numbers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
