"""How long the verdicts of a table take once the predictions are fetched: 5 architectures x 10 seeds
x 360 validation images (the digits' split), 4 comparisons against the baseline, paired bootstrap.

Target (issue 21, item 6): under a second. The predictions are made up (95% right, as on the
digits) and handed to build_table as zar compare hands it those it fetched.

    python benchmarks/bench_verdicts.py [--seeds 10] [--images 360] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import numpy as np

from _machine import header_lines

TARGET_S = 1.0


def lscpu_model() -> str:
    """The CPU as lscpu names it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def rows_and_predictions(seeds: int, images: int):
    from zar.analysis.fetch import RunRow
    from zar.predictions import Predictions

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, images)
    rows, predictions = [], {}
    for model in ("plain", "resnet", "se", "mish", "se_mish"):
        for seed in range(seeds):
            pred = np.where(rng.random(images) < 0.95, labels, (labels + 1) % 10)
            run_id = f"{model}-{seed}"
            rows.append(
                RunRow(run_id, model, model, 0.97, float((pred == labels).mean()), 21_000_000, 34, {}, str(seed))
            )
            p_true = np.full(images, 0.9, dtype=np.float32)
            predictions[run_id] = Predictions(
                "f" * 16,
                np.arange(images).astype(str),
                labels,
                {"last": pred, "best": pred},
                {"last": p_true, "best": p_true},
                {"last": 10, "best": 10},
            )
    return rows, predictions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--images", type=int, default=360)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from zar.analysis.judging import Judging
    from zar.analysis.table import build_table

    rows, predictions = rows_and_predictions(args.seeds, args.images)
    judging = Judging(predictions=predictions)
    build_table(rows, judging=judging)  # imports and scipy's first calls, not timed
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        table = build_table(rows, judging=judging)
        times.append(time.perf_counter() - start)
    assert all(r.method == "bootstrap" for r in table if not r.is_baseline)
    print("\n".join(header_lines("zar compare's verdicts after the fetch")))
    print(f"\nCPU (lscpu): {lscpu_model()}")
    median = statistics.median(times)
    print(
        f"5 architectures x {args.seeds} seeds x {args.images} images, 4 paired bootstraps: median {median:.3f} s "
        f"of {args.repeat} (target < {TARGET_S:.0f} s: {'met' if median < TARGET_S else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
