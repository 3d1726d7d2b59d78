"""Training speed on the digits: `zar train` against a plain PyTorch loop, and where zar's extra time goes.

Two measurements, side by side in one invocation (timings on shared machines are noisy; ratios
measured together are not):

1. Whole process: `python -m zar train --epochs E` (fresh run in an initialised SQLite store)
   against `python benchmarks/plain_loop.py --epochs E` (torchvision resnet34, AdamW defaults,
   fp32, no tracking). Target: zar at least 1.4x the plain loop.
2. Overhead: one in-process `zar.training.train` with timers around every tracking, checkpoint and
   result-logging call. Targets: checkpoints (the per-epoch copy, `snapshot`, and the writes,
   `save_checkpoint`, under ZAR_CHECKPOINT_BUDGET's default) at most 2% of the run's wall time;
   all of it printed with the rest of the tracking.

    python benchmarks/bench_train.py --epochs 3 --repeat 2 --overhead-epochs 10
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _machine import PYTHON, header_lines

HERE = Path(__file__).resolve().parent


def _init_store(folder: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    subprocess.run(
        [PYTHON, "-c", "from mlflow import MlflowClient; MlflowClient().search_experiments()"],
        env=env,
        check=True,
        capture_output=True,
    )
    return env


def _timed(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - start


def whole_process(epochs: int, repeat: int, extra: list[str]) -> tuple[float, float]:
    """Median wall seconds of (plain loop, zar train), alternated so that both see the same machine."""
    plain, zar = [], []
    with tempfile.TemporaryDirectory() as tmp:
        env = _init_store(Path(tmp))
        for _ in range(repeat):
            plain.append(_timed([PYTHON, str(HERE / "plain_loop.py"), "--epochs", str(epochs), *extra]))
            zar.append(
                _timed(
                    [PYTHON, "-m", "zar", "train", "--epochs", str(epochs), "--no-progress", *extra], env=env, cwd=tmp
                )
            )
    return statistics.median(plain), statistics.median(zar)


# What counts as tracking and checkpoint overhead: every call that talks to MLflow or writes state.
OVERHEAD = {
    "zar.tracking": [
        "check_reachable",
        "get_experiment_id",
        "start_run",
        "set_tags",
        "log_params",
        "log_metrics",
        "end_run",
    ],
    "zar.recording": ["snapshot", "save_checkpoint", "log_datasets", "log_results"],
}


def overhead(epochs: int, extra: dict) -> tuple[float, dict[str, float], float]:
    """(wall seconds, seconds per overhead call, seconds inside Trainer epochs) of one in-process run."""
    import importlib

    spent: dict[str, float] = defaultdict(float)
    for module_name, names in OVERHEAD.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, _stopwatch(getattr(module, name), f"{module_name}.{name}", spent))
    from zar import training
    from zar.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(_init_store(Path(tmp)))
        os.chdir(tmp)
        cfg = load_config(overrides={"epochs": epochs, **extra})
        start = time.perf_counter()
        result = training.train("resnet", cfg, progress=False, echo=lambda line: None)
        wall = time.perf_counter() - start
    return wall, dict(spent), sum(r.epoch_time_s for r in result.history)


def _stopwatch(fn, label: str, spent: dict):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the whole-process comparison")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--overhead-epochs", type=int, default=10, help="epochs of the overhead run (0 skips it)")
    parser.add_argument("--tiny", action="store_true", help="ResNet-18 at 16 px: a smoke test of the script")
    args = parser.parse_args()
    extra = ["--depth", "18", "--image-size", "16"] if args.tiny else []  # to both commands

    print("\n".join(header_lines("zar train vs a plain PyTorch loop (digits)")))
    plain, zar = whole_process(args.epochs, args.repeat, extra)
    print(
        f"Whole process, {args.epochs} epochs, median of {args.repeat}"
        + (" (tiny: ResNet-18 at 16 px)" if args.tiny else "")
        + ":\n"
    )
    print("| command | wall (s) |\n| --- | ---: |")
    print(f"| `python benchmarks/plain_loop.py` (reference) | {plain:.1f} |")
    print(f"| `zar train` | {zar:.1f} |")
    print(
        f"\nratio zar train / plain loop speed: {plain / zar:.2f}x  "
        f"(target >= 1.4x: {'met' if plain / zar >= 1.4 else 'not met'})"
    )

    if args.overhead_epochs:
        extra_cfg = {"depth": 18, "image_size": 16} if args.tiny else {}
        wall, spent, epochs_s = overhead(args.overhead_epochs, extra_cfg)
        print(
            f"\nOverhead of one in-process `zar train`, {args.overhead_epochs} epochs: wall {wall:.1f} s, "
            f"training epochs {epochs_s:.1f} s\n"
        )
        print("| call | total (s) | share of wall |\n| --- | ---: | ---: |")
        for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"| `{label}` | {seconds:.2f} | {100 * seconds / wall:.2f}% |")
        total = sum(spent.values())
        checkpoints = sum(
            v for k, v in spent.items() if k in ("zar.recording.snapshot", "zar.recording.save_checkpoint")
        )
        print(
            f"\nratio checkpoint overhead / wall: {100 * checkpoints / wall:.2f}%  "
            f"(target <= 2%: {'met' if checkpoints / wall <= 0.02 else 'not met'})"
        )
        print(f"ratio all tracking, checkpoints and results / wall: {100 * total / wall:.2f}%")


if __name__ == "__main__":
    main()
