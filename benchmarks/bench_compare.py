"""How long ``zar compare`` takes on a store of many runs, against ``mlflow experiments csv``.

Both read every run of one experiment from the same SQLite store and print a table of it, so
MLflow's own export is the natural yardstick: target "zar compare no slower than mlflow
experiments csv". The store is filled with runs shaped like zar's training runs (its tags,
params and metrics, a few epochs each) through MlflowClient.create_run + log_batch, which is
fast enough for thousands of runs; the fluent API per metric would take minutes.

    python benchmarks/bench_compare.py [--runs 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from _machine import PYTHON, header_lines, median_wall_time

EPOCHS = 3  # per-epoch steps of train_acc / val_acc per run
TARGET = "zar compare no slower than mlflow experiments csv (ratio <= 1.00)"


def run_shape(i: int) -> tuple[dict[str, str], dict[str, str], list[tuple[str, float, int]]]:
    """Tags, params and (metric, value, step) of the i-th fake training run, as zar logs them.

    Models cycle through zar's architectures and each gets its own seed, so that the table has
    every row and compare's 'repeated seed' warning stays quiet, as for a real multi-seed study.
    """
    from zar.config import TrainConfig
    from zar.variants import VARIANTS

    model = list(VARIANTS)[i % len(VARIANTS)]
    seed = i // len(VARIANTS)
    cfg = TrainConfig(seed=seed)
    tags = {
        "zar.model": model,
        "zar.display_name": VARIANTS[model].display_name(cfg.depth),
        "zar.split_fingerprint": "0123456789abcdef",
    }
    params = {f.name: str(getattr(cfg, f.name)) for f in fields(cfg)}
    params.update(model=model, dataset="digits", num_classes="10")
    acc = 0.5 + 0.4 * ((i * 37) % 100) / 100
    metrics = [(key, acc * (epoch + 1) / EPOCHS, epoch) for epoch in range(EPOCHS) for key in ("train_acc", "val_acc")]
    metrics += [("best_val_acc", acc, 0), ("train_acc_at_best", acc, 0), ("params_total", 21_289_802.0, 0)]
    return tags, params, metrics


def build_store(uri: str, n_runs: int) -> str:
    """Fill the store at ``uri`` with ``n_runs`` FINISHED runs in experiment 'zar'; returns its id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    for noisy in ("alembic", "mlflow.store.db.utils"):  # table creation chatter, not results
        logging.getLogger(noisy).setLevel(logging.WARNING)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("zar")
    now = int(time.time() * 1000)
    for i in range(n_runs):
        tags, params, metrics = run_shape(i)
        run_id = client.create_run(experiment_id, start_time=now, tags=tags).info.run_id
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, step) for k, v, step in metrics],
            params=[Param(k, v) for k, v in params.items()],
        )
        client.set_terminated(run_id, "FINISHED", end_time=now + 1000)
    return experiment_id


def build_store_file(path: Path, n_runs: int) -> str:
    """``build_store`` into the SQLite file ``path``, built in memory-backed /dev/shm where there is one.

    Each MLflow write is an SQLite commit, and a commit waits for the disk (six per run): on
    tmpfs 1000 runs take seconds, not minutes. The finished file is then copied to ``path`` so
    that the commands are timed reading a store on the ordinary disk, as users have it.
    """
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="zar-bench-build-", dir=shm) as build:
        experiment_id = build_store(f"sqlite:///{Path(build) / path.name}", n_runs)
        shutil.copy(Path(build) / path.name, path)
    return experiment_id


def commands(experiment_id: str) -> dict[str, list[str]]:
    """The two commands timed, as a user would type them (in this interpreter's environment)."""
    bindir = Path(PYTHON).parent
    return {
        "zar compare --experiment zar": [str(bindir / "zar"), "compare", "--experiment", "zar"],
        f"mlflow experiments csv --experiment-id {experiment_id}": [
            str(bindir / "mlflow"),
            "experiments",
            "csv",
            "--experiment-id",
            experiment_id,
        ],
    }


def time_commands(n_runs: int, repeat: int) -> tuple[float, dict[str, float]]:
    """Seconds to build the store, and the median seconds of each command on it.

    Every MLFLOW_* variable of the caller is dropped: both commands read this store and nothing else.
    """
    with tempfile.TemporaryDirectory(prefix="zar-bench-") as tmp:
        db = Path(tmp) / "mlflow.db"
        start = time.perf_counter()
        experiment_id = build_store_file(db, n_runs)
        built_s = time.perf_counter() - start
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
        timings = {}
        for name, cmd in commands(experiment_id).items():
            timings[name], code = median_wall_time(cmd, repeat, env=env, cwd=tmp)
            if code != 0:
                raise SystemExit(f"error: '{name}' exited {code}; its time would mean nothing")
    return built_s, timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in the store (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each command; the median counts")
    args = parser.parse_args()
    built_s, timings = time_commands(args.runs, args.repeat)
    print("\n".join(header_lines(f"zar compare vs mlflow experiments csv, {args.runs} runs")))
    print(
        f"Store: SQLite, {args.runs} FINISHED runs, {EPOCHS} epochs each, built in {built_s:.1f} s. "
        f"Median of {args.repeat} run(s) each, as subprocesses (interpreter start and imports included).\n"
    )
    print("| command | median (s) |\n| --- | ---: |")
    for name, seconds in timings.items():
        print(f"| `{name}` | {seconds:.2f} |")
    zar_s, ref_s = timings.values()
    verdict = "met" if zar_s <= ref_s else "NOT met"
    print(f"\nratio zar compare / mlflow experiments csv: {zar_s / ref_s:.2f}  (target: {TARGET}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
