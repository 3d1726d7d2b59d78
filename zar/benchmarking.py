"""``zar bench`` from measurement to MLflow: every architecture measured in rounds, each recorded in a run.

zar.learn.measure measures one architecture in a fresh process and knows nothing of MLflow; this module
interleaves the rounds (so that a drift of the machine reaches every architecture alike), then
records each architecture's combined numbers as a run of its own, tagged ``zar.bench``, as
zar.training records a training run. Under ``mlflow run -e bench`` those runs are children of
the run it made, which also keeps the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import tracking
from .learn import measure
from .learn.measure import BenchFailed, BenchSpec
from .tracking import provenance, runs


@dataclass
class BenchResult:
    measured: list[tuple[BenchSpec, dict[str, float]]] = field(default_factory=list)  # spec, combined numbers
    failures: list[str] = field(default_factory=list)
    experiment_id: str | None = None

    @property
    def table(self) -> str:
        return measure.render(self.measured)


def run_benches(
    specs: list[BenchSpec], rounds: int, experiment: str, echo: Callable[[str], None], warn: Callable[[str], None]
) -> BenchResult:
    """Measure every spec ``rounds`` times, interleaved, then record each in a run of its own;
    runs.closing ends each FINISHED, or FAILED with the reason."""
    measured, failed = _measure_rounds(specs, rounds, echo, warn)
    result = BenchResult()
    with runs.in_env_run("bench", {tracking.TAG_RUN_NAME: "bench"}) as env_run:
        for spec in specs:
            run = runs.start(experiment, f"bench-{spec.model}-{spec.depth}-{spec.image_size}px")
            result.experiment_id = run.info.experiment_id
            try:
                numbers = _record(run, spec, rounds, measured[spec], failed.get(spec))
            except BenchFailed as e:  # the run is FAILED already
                result.failures.append(str(e))
                continue
            result.measured.append((spec, numbers))
            echo(
                f"{spec.display_name}: {numbers['latency_ms_median']:.2f} ms/image at batch 1 "
                f"(median of {rounds}), {numbers['throughput_img_s']:,.0f} img/s at batch {measure.BATCH}; "
                f"run {run.info.run_id}"
            )
        if env_run and result.measured:
            tracking.log_text(env_run, result.table, "bench.md")
    return result


def _measure_rounds(specs, rounds, echo, warn) -> tuple[dict, dict]:
    """Each spec's numbers per round, and the specs whose measurement failed (measured no more)."""
    measured, failed = {spec: [] for spec in specs}, {}
    for r, spec in measure.rounds_order(specs, rounds):
        if spec in failed:
            continue
        try:
            numbers = measure.measure_in_subprocess(spec)
        except BenchFailed as e:  # recorded as a FAILED run later; the others are still measured
            failed[spec] = e
            warn(f"{spec.display_name}: {e}")
            continue
        measured[spec].append(numbers)
        echo(
            f"round {r + 1}/{rounds} {spec.display_name}: {numbers['latency_ms_median']:.2f} ms/image at batch 1, "
            f"{numbers['throughput_img_s']:,.0f} img/s at batch {measure.BATCH}"
        )
    return measured, failed


def _record(run, spec: BenchSpec, rounds: int, rounds_numbers: list[dict], failure: BenchFailed | None) -> dict:
    """One architecture's bench run: its settings as params, its combined numbers as metrics."""
    tags = {
        tracking.TAG_BENCH: "1",
        tracking.TAG_RUN_NAME: run.info.run_name,
        tracking.TAG_MODEL: spec.model,
        tracking.TAG_DISPLAY: spec.display_name,
        tracking.TAG_DEVICE: spec.device,
        **provenance.code_tags(),
    }
    run_id = run.info.run_id
    with runs.closing(run_id, tags):
        tracking.log_params(
            run_id,
            {
                "model": spec.model,
                "depth": spec.depth,
                "image_size": spec.image_size,
                "num_classes": spec.num_classes,
                "se_reduction": spec.se_reduction,
                "device": spec.device,
                "precision": "fp32",
                "batch_size_latency": measure.LATENCY_BATCH,
                "batch_size_throughput": measure.BATCH,
                "batch_size_train": measure.BATCH,
                "batch_size_flops": measure.FLOP_BATCH,
                "min_time_s": spec.min_time,
                "rounds": rounds,
            },
        )
        if failure is not None:
            raise failure
        numbers = measure.combine(rounds_numbers)
        extra = ("torch_threads", "rounds")
        tracking.log_params(run_id, {"torch_threads": int(numbers["torch_threads"])})
        tracking.log_metrics(run_id, {k: v for k, v in numbers.items() if k not in extra})
    return numbers
