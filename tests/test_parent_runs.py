"""What a study's parent run records: the values it used, and accuracies in the children's unit."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from helpers import children


def test_a_study_of_several_seeds_records_its_seeds_and_no_lone_seed(in_study):
    params = MlflowClient().get_run(in_study.parent_id).data.params
    assert params["seeds"] == "1,2"
    assert "seed" not in params  # the config's default (42) trained nothing here
    assert params["models"] == "plain,resnet" and params["epochs"] == "1"  # what the children share stays


def test_the_parents_accuracies_are_fractions_like_its_childrens(in_study):
    metrics = MlflowClient().get_run(in_study.parent_id).data.metrics
    kids = children(in_study.parent_id)
    for model in ("plain", "resnet"):
        val = [k.data.metrics["val_acc"] for k in kids if k.data.tags["zar.model"] == model]
        train = [k.data.metrics["train_eval_acc"] for k in kids if k.data.tags["zar.model"] == model]
        assert metrics[f"val_acc_mean.{model}"] == pytest.approx(np.mean(val))
        assert metrics[f"val_acc_std.{model}"] == pytest.approx(np.std(val, ddof=1))
        assert metrics[f"train_eval_acc_mean.{model}"] == pytest.approx(np.mean(train))
    # The difference from the baseline (ResNet) is a difference of fractions too.
    diff = metrics["val_acc_mean.plain"] - metrics["val_acc_mean.resnet"]
    assert metrics["val_acc_vs_baseline.plain"] == pytest.approx(diff)
    accuracies = {k: v for k, v in metrics.items() if k.split(".")[0].endswith(("acc_mean", "acc_std"))}
    assert accuracies and all(0 <= v <= 1 for v in accuracies.values()), accuracies


def test_the_parent_records_each_verdict_and_its_interval_as_the_table_prints_them(in_study):
    import json

    from helpers import invoke

    run = MlflowClient().get_run(in_study.parent_id)
    (plain,) = [r for r in json.loads(invoke("compare", "--parent", in_study.parent_id, "--format", "json").stdout)
                if r["model"] == "plain"]  # fmt: skip
    assert run.data.tags["zar.verdict.plain"] == plain["verdict"] and plain["verdict"]
    assert run.data.tags["zar.verdict_method.plain"] == plain["method"]
    assert "zar.verdict.resnet" not in run.data.tags  # the baseline is not judged against itself
    metrics = run.data.metrics
    assert metrics["val_acc_vs_baseline_ci_low.plain"] == pytest.approx(plain["ci_low"] / 100)  # a fraction
    assert metrics["val_acc_vs_baseline_ci_high.plain"] == pytest.approx(plain["ci_high"] / 100)
