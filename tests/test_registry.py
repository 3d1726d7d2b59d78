"""--register: a study's best model, or a run's, in MLflow's Model Registry, loaded from it without zar."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from test_served_model import load_without_zar, raw_validation_images, serve_and_post

from helpers import TINY, all_runs, children, epochs


def test_study_registers_the_best_rows_best_run_with_tags_linking_back(in_study):
    client = MlflowClient()
    (version,) = client.search_model_versions("name = 'tiny-study'")
    kids = children(in_study.parent_id)
    by_model = {}
    for kid in kids:
        by_model.setdefault(kid.data.tags["zar.model"], []).append(kid)
    means = {m: sum(k.data.metrics["val_acc"] for k in ks) / len(ks) for m, ks in by_model.items()}
    best_model = max(means, key=means.get)
    best_run = max(by_model[best_model], key=lambda k: k.data.metrics["val_acc"])
    assert str(version.version) == "1" and version.run_id == best_run.info.run_id
    tags = version.tags
    assert tags["zar.study_run_id"] == in_study.parent_id
    assert tags["zar.model"] == best_model and tags["zar.seed"] == best_run.data.params["seed"]
    assert tags["zar.model_artifact"].startswith("model (last-epoch")
    assert float(tags["zar.row_val_acc_mean"]) == pytest.approx(means[best_model], abs=1e-4)
    assert tags["zar.table_row"] in in_study.output and tags["zar.verdict"] in ("baseline", "undecided")
    assert "Registered models:/tiny-study/1: the last-epoch model of run " + best_run.info.run_id in in_study.output
    assert "/#/models/tiny-study/versions/1" in in_study.output
    # The version is the run's logged model, not a copy: the model's page lists it.
    (logged,) = client.search_logged_models(
        [best_run.info.experiment_id], filter_string=f"source_run_id = '{best_run.info.run_id}' AND name = 'model'"
    )
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "tiny-study", "version": 1}]
    assert client.get_run(in_study.parent_id).data.tags["zar.registered_model"] == "models:/tiny-study/1"


@pytest.mark.slow  # 14-17 s: the fast suite had reached 5.6 min
def test_train_registers_new_versions_that_load_from_the_registry_without_zar(store, zar, tmp_path):
    for _ in range(2):
        result = zar("train", "--model", "se", *epochs(2), "--register", "digits-se")
        assert result.exit_code == 0, result.output
    first, second = sorted(all_runs(), key=lambda r: r.info.start_time)
    client = MlflowClient()
    versions = {str(v.version): v for v in client.search_model_versions("name = 'digits-se'")}
    assert {k: v.run_id for k, v in versions.items()} == {"1": first.info.run_id, "2": second.info.run_id}
    assert "Registered models:/digits-se/2: the last-epoch model of run " + second.info.run_id in result.output
    assert "val acc" in versions["1"].description and "zar.study_run_id" not in versions["1"].tags
    images, truth, classes = raw_validation_images(16)
    got = load_without_zar(["models:/digits-se/1"], images, tmp_path)["models:/digits-se/1"]
    accuracy = sum(t == p for t, p in zip(truth, got["pyfunc"])) / len(truth)
    assert accuracy == first.data.metrics["val_acc"]  # the last epoch's model, as the tags say
    assert got["metadata"]["classes"] == classes


@pytest.mark.parametrize("name", ["a/b", "x:1", " ", ".."])
def test_a_name_the_registry_refuses_is_said_before_anything_trains(store, zar, name):
    result = zar("train", *TINY, "--register", name)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: --register {name!r} is no registered model name: it must be non-empty, without '/' or ':'"
    ]
    assert all_runs() == []


@pytest.mark.slow  # ~40 s: a model server starts
def test_mlflow_models_serve_answers_from_the_registry(store, zar, tmp_path):
    assert zar("train", "--model", "resnet", *epochs(2), "--register", "served").exit_code == 0
    images, _, classes = raw_validation_images(16)
    (row,) = serve_and_post("models:/served/1", images[:1], tmp_path)["predictions"]
    assert row["label"] in classes and row["label"] == max(classes, key=lambda c: row[c])
