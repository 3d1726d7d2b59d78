"""The speed choices keep results honest: precision is recorded as it ran, and compared only like with like."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from zar.config import load_config
from zar.learn import autoprecision, engine
from zar.learn.data import load_data
from zar.learn.engine import (
    EVAL_BATCH_SIZE,
    Trainer,
    evaluate,
    make_optimizer,
    resolve_precision,
)
from zar.learn.models import build_model

from helpers import TINY

CPU = torch.device("cpu")


def tiny_trainer(**overrides) -> Trainer:
    cfg = load_config(overrides={"data": "synthetic", "depth": 18, "image_size": 16, "epochs": 1, **overrides})
    data = load_data(cfg)
    torch.manual_seed(0)
    return Trainer(build_model("resnet", 18, len(data.classes)), data.train, data.val, cfg, CPU, progress=False)


def params_of_all_runs():
    client = MlflowClient()
    return [r.data.params for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_every_optimizer_is_the_fused_kernel(optimizer):
    model = build_model("resnet", 18, 4)
    assert make_optimizer(model, load_config(overrides={"optimizer": optimizer})).defaults["fused"] is True


def test_evaluation_in_big_batches_predicts_as_the_training_batch_size_would():
    trainer = tiny_trainer()
    next(trainer.epochs())
    assert trainer.val_loader.batch_size == EVAL_BATCH_SIZE
    small = torch.utils.data.DataLoader(trainer.val_loader.dataset, batch_size=32)
    big, reference = trainer.evaluate(), evaluate(trainer.model, small, trainer.precision)
    assert big.y_pred == reference.y_pred and big.y_true == reference.y_true
    assert big.loss == pytest.approx(reference.loss, rel=1e-5)
    assert trainer.evaluate() is big  # the last epoch's evaluation is reused, not computed again


def test_auto_precision_without_native_bf16_is_fp32_unmeasured(monkeypatch):
    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    monkeypatch.setattr(autoprecision, "measure", lambda *a: pytest.fail("measured where bf16 is emulated"))
    assert resolve_precision("auto", CPU, 224) == "fp32"
    assert resolve_precision("bf16", CPU, 16) == "bf16" and resolve_precision("fp32", CPU, 224) == "fp32"


@pytest.mark.parametrize(("ratio", "chosen"), [(0.7, "bf16"), (0.9, "bf16"), (0.95, "fp32"), (1.3, "fp32")])
def test_auto_precision_follows_this_machines_measurement_taken_once(monkeypatch, ratio, chosen):
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    calls = []

    def measure(size, batch, threads):
        calls.append((size, batch, threads))
        return {"fp32_s": 1.0, "bf16_s": ratio, "bf16_vs_fp32": ratio}

    monkeypatch.setattr(autoprecision, "measure", measure)
    size = 1000 + int(ratio * 100)  # a size no other test measured: the cache is the session's
    assert resolve_precision("auto", CPU, size, 32, threads=1) == chosen
    assert resolve_precision("auto", CPU, size, 32, threads=1) == chosen and calls == [(size, 32, 1)]  # cached
    resolve_precision("auto", CPU, size, 32, threads=2)  # another thread count is measured apart
    assert calls == [(size, 32, 1), (size, 32, 2)]
    cached = json.loads(autoprecision.cache_path().read_text())
    key = next(k for k in cached if k.endswith(f"{size} px | batch 32 | 1 threads"))
    assert key.startswith(autoprecision.cpu_model())


def test_the_measurement_times_both_precisions_and_restores_the_threads():
    threads = torch.get_num_threads()
    m = autoprecision.measure(8, 4, 1)
    assert m["fp32_s"] > 0 and m["bf16_s"] > 0
    assert m["bf16_vs_fp32"] == pytest.approx(m["bf16_s"] / m["fp32_s"], rel=0.01)
    assert torch.get_num_threads() == threads  # restored


def test_bf16_trains_in_autocast_with_channels_last():
    trainer = tiny_trainer(precision="bf16")
    result = next(trainer.epochs())
    assert trainer.precision.dtype == torch.bfloat16
    assert trainer.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= result.val_acc <= 1 and result.train_loss == result.train_loss  # finite, not NaN


def test_a_run_records_the_precision_that_ran_never_auto(store, zar):
    result = zar("train", *TINY, "--precision", "auto")
    assert result.exit_code == 0, result.output
    (params,) = params_of_all_runs()
    assert params["precision"] == resolve_precision("auto", CPU, 16, 32) != "auto"


def test_compare_does_not_pool_runs_of_different_precision(store, zar):
    for precision in ("fp32", "bf16"):
        result = zar("train", *TINY, "--precision", precision)
        assert result.exit_code == 0, result.output
    assert sorted(p["precision"] for p in params_of_all_runs()) == ["bf16", "fp32"]
    strict = zar("compare", "--strict")
    assert strict.exit_code == 2 and "precision: bf16, fp32" in strict.output
    loose = zar("compare")
    assert loose.exit_code == 0 and "runs differ in more than model and seed: precision: bf16, fp32" in loose.stderr


def test_unknown_precision_is_a_one_line_error(zar):
    result = zar("train", "--precision", "fp16")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error:") and "precision" in result.output
