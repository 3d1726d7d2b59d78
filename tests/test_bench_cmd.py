"""zar bench: FLOPs that can be checked by hand, one finished MLflow run per architecture with every
metric, never a row of zar compare's accuracy table, and joined to it by ``--with-bench``.

(tests/test_bench.py runs the scripts in benchmarks/; this is the ``zar bench`` command.)
"""

import json
import os
import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import zar.learn.measure
from zar.analysis.render import BENCH_COLUMNS
from zar.learn.measure import METRICS, BenchFailed, BenchSpec, combine, flops_per_image, rounds_order
from zar.learn.models import build_model

from helpers import TINY, all_runs, invoke, leave_store, runs_of, use_store

FAST = ["--depth", "18", "--image-size", "16", "--min-time", "0.02", "--rounds", "2"]

# --- FLOPs by hand -----------------------------------------------------------------------------------

# ResNet-18 at 16 px, as multiply-adds per image (out channels x out pixels x in channels x kernel area):
STEM = 64 * 8 * 8 * 3 * 7 * 7  # 7x7 stride 2: 16 -> 8 px; max pool: 8 -> 4 px
LAYER1 = 4 * (64 * 4 * 4 * 64 * 9)  # 2 blocks x 2 convs, 4x4 px
LAYER2 = 128 * 2 * 2 * 64 * 9 + 3 * (128 * 2 * 2 * 128 * 9) + 128 * 2 * 2 * 64  # + the 1x1 projection, 2x2 px
LAYER3 = 256 * 1 * 1 * 128 * 9 + 3 * (256 * 256 * 9) + 256 * 128  # 1x1 px
LAYER4 = 512 * 256 * 9 + 3 * (512 * 512 * 9) + 512 * 256  # stride 2 on 1x1 px (padding 1) stays 1x1
FC = 512 * 10
RESNET18_MACS = STEM + LAYER1 + LAYER2 + LAYER3 + LAYER4 + FC  # 15,549,440
# SE (r=16) adds, per block, two 1x1 convolutions on the pooled 1x1 map: C -> C/16 -> C.
SE_MACS = sum(2 * (2 * c * (c // 16)) for c in (64, 128, 256, 512))  # 87,040


def test_one_convolution_counts_two_flops_per_multiply_add():
    conv = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
    assert flops_per_image(conv, 16) == 2 * STEM == 1_204_224


def test_resnet18_and_se_resnet18_flops_are_the_hand_count():
    assert RESNET18_MACS == 15_549_440
    assert flops_per_image(build_model("resnet", 18, 10), 16) == 2 * RESNET18_MACS
    assert flops_per_image(build_model("se", 18, 10), 16) == 2 * (RESNET18_MACS + SE_MACS)
    assert flops_per_image(build_model("plain", 18, 10), 16) == 2 * (
        RESNET18_MACS - 128 * 4 * 64 - 256 * 128 - 512 * 256
    )


# --- zar bench end to end: a store with two bench runs and one training run ----------------------------


@pytest.fixture(scope="module")
def benched(tmp_path_factory, empty_store):
    folder = tmp_path_factory.mktemp("benched")
    shutil.copy(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, folder, uri)
        try:
            bench = invoke("bench", "--models", "resnet,se", *FAST)
            assert bench.exit_code == 0, bench.output
            trained = invoke("train", "--model", "resnet", *TINY)
            assert trained.exit_code == 0, trained.output
        finally:
            leave_store()
    return folder, uri, bench.output


@pytest.fixture
def in_benched(benched, monkeypatch):
    folder, uri, output = benched
    use_store(monkeypatch, folder, uri)
    yield output
    leave_store()


def bench_runs():
    return {r.data.tags["zar.model"]: r for r in runs_of(filter_string="tags.`zar.bench` = '1'")}


def test_bench_logs_a_finished_run_per_architecture_with_every_metric(in_benched):
    found = bench_runs()
    assert sorted(found) == ["resnet", "se"]
    for model, run in found.items():
        assert run.info.status == "FINISHED"
        assert set(METRICS) <= set(run.data.metrics), set(METRICS) - set(run.data.metrics)
        assert all(v > 0 for k, v in run.data.metrics.items() if k != "peak_rss_increase_mb")
        params = run.data.params
        assert (params["model"], params["depth"], params["image_size"], params["device"]) == (model, "18", "16", "cpu")
        assert params["batch_size_latency"] == "1" and params["batch_size_throughput"] == "32"
        assert params["torch_threads"] == os.environ["OMP_NUM_THREADS"]  # conftest's, inherited by the bench process
        assert run.data.tags["zar.display_name"] == {"resnet": "ResNet-18", "se": "SE-ResNet-18"}[model]
        m = run.data.metrics
        assert m["latency_ms_p90"] >= m["latency_ms_median"]
        assert m["latency_ms_median_min"] <= m["latency_ms_median"] <= m["latency_ms_median_max"]
        assert params["rounds"] == "2"
    resnet, se = found["resnet"].data.metrics, found["se"].data.metrics
    assert resnet["flops_per_image"] == 2 * RESNET18_MACS
    assert se["flops_per_image"] == 2 * (RESNET18_MACS + SE_MACS) > resnet["flops_per_image"]
    assert se["params_total"] > resnet["params_total"]


def test_bench_prints_its_table(in_benched):
    lines = in_benched.splitlines()
    header = next(line for line in lines if line.startswith("| Model |"))
    assert "MFLOPs/image, forward (conv+linear, 2 per MAC)" in header and "Peak RSS (MiB, process)" in header
    assert "Latency, batch 1, p90 (ms)" in header and "Train step, batch 32, median (ms)" in header
    rows = [line.split(" | ") for line in lines if line.startswith("| ResNet-18") or line.startswith("| SE-ResNet-18")]
    assert [r[0] for r in rows] == ["| ResNet-18", "| SE-ResNet-18"]
    assert [r[2] for r in rows] == ["31.1", "31.3"]  # MFLOPs, as counted by hand above


def test_bench_runs_are_never_rows_of_compare_and_runs_lists_them(in_benched):
    plain = invoke("compare", "--format", "json")
    assert plain.exit_code == 0, plain.output
    assert [(r["name"], r["runs"]) for r in json.loads(plain.stdout)] == [("ResNet-18", 1)]
    assert plain.stderr == "1 runs used, none left out.\n"  # not even counted as left out
    listed = invoke("runs")
    assert listed.exit_code == 0, listed.output
    assert "| ResNet-18 (bench) | FINISHED | - |" in listed.stdout and "| SE-ResNet-18 (bench) |" in listed.stdout


def test_compare_with_bench_joins_the_latest_matching_bench_run(in_benched):
    result = invoke("compare", "--with-bench")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith(" | ".join(BENCH_COLUMNS) + " |")
    (row,) = [line.split(" | ") for line in lines if line.startswith("| ResNet-18")]
    resnet = bench_runs()["resnet"].data.metrics
    low, high = resnet["latency_ms_median_min"], resnet["latency_ms_median_max"]
    latency = f"{resnet['latency_ms_median']:.2f}" + (
        f" ({low:.2f}-{high:.2f})" if f"{low:.2f}" != f"{high:.2f}" else ""
    )
    assert row[-3:] == [latency, "31.1", f"{resnet['peak_rss_mb']:,.0f} |"]
    table = json.loads(invoke("compare", "--with-bench", "--format", "json").stdout)
    assert table[0]["bench"]["run_id"] == bench_runs()["resnet"].info.run_id

    # A training run at a size no bench run measured: n/a, and a note naming the settings.
    client = MlflowClient()
    trained = runs_of(filter_string="tags.`zar.model` = 'resnet' and params.epochs = '1'")
    other = [r for r in trained if "zar.bench" not in r.data.tags][0]
    run_id = client.create_run(other.info.experiment_id).info.run_id
    for key, value in {**other.data.params, "image_size": "24"}.items():
        client.log_param(run_id, key, value)
    for key in ("zar.model", "zar.display_name", "zar.device", "zar.split_fingerprint", "zar.data_fingerprint"):
        client.set_tag(run_id, key, other.data.tags[key])
    client.log_metric(run_id, "val_acc", 0.5)
    client.set_terminated(run_id, "FINISHED")
    try:
        result = invoke("compare", "--with-bench")
    finally:
        client.delete_run(run_id)  # the module's store as the other tests expect it
    assert result.exit_code == 0, result.output
    (row,) = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ResNet-18 (image_size=24")]
    assert row[-3:] == ["n/a", "n/a", "n/a |"]
    assert "n/a (bench): no bench run for ResNet-18 (image_size=24) (resnet, depth 18, image_size 24, device cpu)" in (
        result.stdout
    )


def test_rounds_interleave_the_architectures_and_the_table_takes_each_ones_median():
    a, b, c = (BenchSpec(m) for m in ("plain", "resnet", "se"))
    assert rounds_order([a, b, c], 2) == [(0, a), (0, b), (0, c), (1, b), (1, c), (1, a)]
    rounds = [{"latency_ms_median": v, "peak_rss_mb": 100.0 + v} for v in (12.0, 9.0, 10.0)]
    assert combine(rounds) == {
        "latency_ms_median": 10.0,
        "peak_rss_mb": 110.0,
        "latency_ms_median_min": 9.0,
        "latency_ms_median_max": 12.0,
        "rounds": 3.0,
    }


def test_a_failed_measurement_fails_its_run_and_the_others_still_run(store, monkeypatch):
    calls = []

    def fake(spec):
        calls.append(spec.model)
        if spec.model == "se":
            raise BenchFailed("bench of se failed: RuntimeError: out of memory")
        return {k: 1.0 for k in METRICS} | {"torch_threads": 1.0}

    monkeypatch.setattr(zar.learn.measure, "measure_in_subprocess", fake)
    result = invoke("bench", "--models", "se,resnet", *FAST)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "Error: 1 of 2 benches failed: bench of se failed: RuntimeError: out of memory"
    )
    found = bench_runs()
    assert found["se"].info.status == "FAILED" and "out of memory" in found["se"].data.tags["zar.error"]
    assert found["resnet"].info.status == "FINISHED"
    assert calls == ["se", "resnet", "resnet"]  # two rounds; a failed architecture is not measured again


def test_bench_mistakes_are_refused_before_any_run(store):
    for args, message in (
        (["--models", "resnet,nope"], "unknown model 'nope'"),
        (["--models", "se,se"], "--models names se more than once"),
        (["--image-size", "4"], "4 is not in the range 8<=x<=1024"),
    ):
        result = invoke("bench", *args)
        assert result.exit_code == 2 and message in result.stderr, result.output
    if not torch.cuda.is_available():
        result = invoke("bench", "--device", "cuda", *FAST)
        assert result.exit_code == 2 and "no CUDA GPU is available" in result.stderr, result.output
    assert all_runs() == []
