"""zar train end to end: real training on tiny data, read back from a real SQLite store."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import torchvision
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from zar.config import FIELD_TYPES
from zar.tracking import checkpoint_path, runs_url
from zar.tracking.views import STUDY_COLUMNS

from helpers import ROOT, TINY, all_runs, zar_subprocess

EPOCH_METRICS = ["train_loss", "train_acc", "train_eval_loss", "train_eval_acc", "val_loss", "val_acc", "epoch_time_s"]
END_METRICS = [
    "best_val_acc",
    "best_epoch",
    "train_acc_at_best",
    "train_eval_acc_at_best",
    "params_total",
    "params_trainable",
]
PARAMS = [
    "lr",
    "batch_size",
    "epochs",
    "optimizer",
    "weight_decay",
    "seed",
    "val_ratio",
    "image_size",
    "workers",
    "model",
    "depth",
    "dataset",
    "num_classes",
    "device",
    *FIELD_TYPES,
]
ARTIFACTS = [
    "confusion_matrix.png",
    "confusion_matrix.json",
    "acc_curve.png",
    "loss_curve.png",
    "classification_report.json",
    "config.yaml",
]


def only_run(experiment="zar"):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def assert_complete_run(run, model, epochs, n_val):
    client = MlflowClient()
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    for key in PARAMS:
        assert key in params, key
    assert params["model"] == model and params["epochs"] == str(epochs)
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
    for key in ("train_acc", "train_eval_acc", "val_acc"):
        assert all(0 <= m.value <= 1 for m in client.get_metric_history(run_id, key))
    for key in END_METRICS:
        assert key in metrics, key
    assert metrics["params_total"] == metrics["params_trainable"] > 0
    assert tags["zar.model"] == model and tags["zar.device"] == "cpu"
    assert len(tags["zar.split_fingerprint"]) == len(tags["zar.data_fingerprint"]) == 16
    # The code it ran: zar, torch and torchvision versions, and the commit of this checkout.
    assert tags["zar.version"] and tags["zar.torch_version"] == torch.__version__
    assert tags["zar.torchvision_version"] == torchvision.__version__
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["zar.git_dirty"] in ("true", "false")
    # System metrics, sampled while it trained.
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert model.replace("_", "") in run.info.run_name.replace("_", "")
    names = {a.path for a in client.list_artifacts(run_id)}
    assert set(ARTIFACTS) <= names, names
    cm = json.loads(open(client.download_artifacts(run_id, "confusion_matrix.json")).read())
    assert np.array(cm["matrix"]).sum() == n_val
    assert len(cm["matrix"]) == len(cm["labels"]) == int(params["num_classes"])
    report = json.loads(open(client.download_artifacts(run_id, "classification_report.json")).read())
    assert {"precision", "recall", "f1-score"} <= set(report[cm["labels"][0]])
    config = yaml.safe_load(open(client.download_artifacts(run_id, "config.yaml")).read())
    assert config["epochs"] == epochs
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"train", "validation"}
    # The final and the best epoch's models come back and predict; each carries its epoch's metrics.
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    by_name = {m.name: m for m in models}
    assert sorted(by_name) == ["best", "model"]
    size = int(params["image_size"])
    x = torch.rand(3, 1, size, size)  # grayscale pixels in [0, 1], as a user has them: the model normalises
    for name, epoch in (("model", epochs), ("best", int(metrics["best_epoch"]))):
        linked = {m.key: m for m in by_name[name].metrics if not m.key.startswith("system/")}
        assert {m.step for m in linked.values()} == {epoch}, name
        history = {m.step: m.value for m in client.get_metric_history(run_id, "val_acc")}
        assert linked["val_acc"].value == history[epoch] and "train_eval_acc" in linked, name
        loaded = mlflow.pytorch.load_model(by_name[name].model_uri)
        probs = loaded(x)
        assert probs.shape == (3, int(params["num_classes"]))
        torch.testing.assert_close(probs.sum(1), torch.ones(3))  # class probabilities, not logits
    assert metrics["best_val_acc"] == max(m.value for m in client.get_metric_history(run_id, "val_acc"))


def test_train_logs_everything_the_contract_names(store, zar):
    result = zar("train", "--model", "mish", *TINY, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "epoch   2/2" in result.output and "Mish-ResNet-18" in result.output
    run = only_run()
    assert run.data.tags["zar.display_name"] == "Mish-ResNet-18"
    assert_complete_run(run, "mish", epochs=2, n_val=20)  # 20% of 4 classes x 24 images, rounded up
    assert run.data.params["dataset"] == "synthetic"
    link = f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert link in result.output
    # The experiment's runs-table link opens the view zar saved: the study's columns shown.
    view = MlflowClient().get_experiment(run.info.experiment_id).tags["mlflow.sharedViewState.zar"]
    assert json.loads(json.loads(view)["state"])["selectedColumns"] == list(STUDY_COLUMNS)
    assert runs_url(run.info.experiment_id).endswith("?workflowType=machine_learning&viewStateShareKey=zar")


@pytest.mark.slow  # ~15 s; the fast suite stays near 5 min
def test_split_is_the_same_for_every_architecture(store, zar):
    for model in ("plain", "se"):
        assert zar("train", "--model", model, *TINY, "--seed", "7").exit_code == 0
    fingerprints = {r.data.tags["zar.split_fingerprint"] for r in all_runs()}
    assert len(fingerprints) == 1
    assert zar("train", "--model", "se", *TINY, "--split-seed", "3").exit_code == 0
    assert len({r.data.tags["zar.split_fingerprint"] for r in all_runs()}) == 2


def write_image_folder(root, classes=("cat", "dog", "owl"), per_class=6, size=20):
    rng = np.random.default_rng(0)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + np.uint8(60 * k)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_image_folder_trains_and_logs_class_names(store, zar, tmp_path):
    folder = write_image_folder(tmp_path / "animals")
    result = zar("train", "--model", "resnet", *TINY, "--data", str(folder), "--batch-size", "4")
    assert result.exit_code == 0, result.output
    run = only_run()
    assert run.data.params["dataset"] == "animals" and run.data.params["num_classes"] == "3"
    cm = json.loads(open(MlflowClient().download_artifacts(run.info.run_id, "confusion_matrix.json")).read())
    assert cm["labels"] == ["cat", "dog", "owl"]
    assert np.array(cm["matrix"]).sum() == 4  # 20% of 18 images, rounded up


def test_digits_is_the_default_dataset(store):
    from zar.config import TrainConfig
    from zar.learn.data import load_data

    data = load_data(TrainConfig())
    assert data.name == "digits" and data.classes == [str(d) for d in range(10)]
    assert len(data.train) + len(data.val) == 1797 and len(data.val) == 360
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


def bad_folders(tmp_path):
    one = write_image_folder(tmp_path / "one", classes=("a",))
    few = write_image_folder(tmp_path / "few", classes=("a", "b"), per_class=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    file = tmp_path / "file.txt"
    file.write_text("x")
    truncated = write_image_folder(tmp_path / "trunc", classes=("a", "b"))
    bad = truncated / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])
    return {
        "missing": (str(tmp_path / "nope"), "does not exist"),
        "file": (str(file), "is a file"),
        "empty": (str(empty), "has no images"),
        "one class": (str(one), "at least 2 class sub-folders"),
        "too few": (str(few), "cannot split 2 images"),
        "truncated": (str(truncated), f"unreadable image {bad}"),
    }


@pytest.mark.parametrize("case", ["missing", "file", "empty", "one class", "too few", "truncated"])
def test_bad_data_is_one_line_exit_2_and_no_run(store, zar, tmp_path, case):
    path, message = bad_folders(tmp_path)[case]
    result = zar("train", *TINY, "--data", path)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert all_runs() == []


def test_skip_bad_images_logs_their_list(store, zar, tmp_path):
    folder = write_image_folder(tmp_path / "imgs", classes=("a", "b"))
    (folder / "a" / "2.png").write_bytes(b"not an image")
    result = zar("train", *TINY, "--data", str(folder), "--skip-bad-images")
    assert result.exit_code == 0, result.output
    run = only_run()
    text = open(MlflowClient().download_artifacts(run.info.run_id, "skipped_images.txt")).read()
    assert text.split() == [os.path.join("a", "2.png")]


BAD_OPTIONS = {
    "unknown model": (["--model", "resnext"], "unknown model 'resnext'; valid: plain, resnet, se, mish, se_mish"),
    "zero epochs": (["--epochs", "0"], "config key 'epochs' must be >= 1, got 0"),
    "out of range": (["--val-ratio", "1.5"], "config key 'val_ratio' must be between 0 and 1"),
    "not a number": (["--epochs", "x"], "'x' is not a valid integer"),
    "bad choice": (["--optimizer", "lion"], "'lion' is not one of 'adamw', 'adam', 'sgd'"),
    "unknown option": (["--bogus", "1"], "No such option '--bogus'. (see 'zar train --help')"),
    "no gpu": (["--model", "nope"], "unknown model")
    if torch.cuda.is_available()
    else (["--device", "cuda"], "no CUDA GPU"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_one_line_exit_2_and_no_run(store, zar, case):
    args, message = BAD_OPTIONS[case]
    result = zar("train", *TINY, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert all_runs() == []


def test_bad_params_file_names_file_and_line(store, zar, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nepochs: [1, 2\n")
    result = zar("train", *TINY, "--params", str(bad))
    assert result.exit_code == 2
    assert f"malformed YAML in {bad} line" in result.output
    assert all_runs() == []


def test_deleted_experiment_is_a_clear_error(store, zar):
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("gone"))
    result = zar("train", *TINY, "--experiment", "gone")
    assert result.exit_code == 2
    assert "experiment 'gone' is deleted" in result.output
    assert all_runs() == []


def mlflow_run(*args, cwd, uri):
    # MLproject commands call `python`: the one of this environment, as after `. .venv/bin/activate`.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "zar", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


TINY_P = ["-P", "data=synthetic", "-P", "epochs=1", "-P", "depth=18", "-P", "image_size=16"]


@pytest.mark.slow  # ~20 s: a whole subprocess run; make test-slow (and CI) runs it
def test_mlflow_run_train_entry_point_makes_one_complete_run(store, tmp_path):
    proc = mlflow_run("-e", "train", "-P", "model=mish", *TINY_P, "-P", "lr=1e-3", cwd=tmp_path, uri=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run()
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert run.data.params["lr"] == "1e-3"  # as MLflow logged it; zar's 0.001 did not clash
    assert_complete_run(run, "mish", epochs=1, n_val=20)


@pytest.mark.slow
def test_mlflow_run_honours_the_params_file(store, tmp_path):
    """Only what must be is declared in MLproject, so no declared default overrides the file."""
    params = tmp_path / "tiny.yaml"
    params.write_text("epochs: 1\ndata: synthetic\ndepth: 18\nimage_size: 16\n")
    proc = mlflow_run("-e", "train", "-P", f"params={params}", cwd=tmp_path, uri=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run()
    assert run.data.params["epochs"] == "1" and run.data.params["image_size"] == "16"
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_mlflow_run_per_variant_entry_point(store, tmp_path):
    proc = mlflow_run("-e", "se_mish", *TINY_P, cwd=tmp_path, uri=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run()
    assert run.data.tags["zar.display_name"] == "SE-Mish-ResNet-18"
    assert_complete_run(run, "se_mish", epochs=1, n_val=20)


def test_mlflow_run_bad_input_ends_that_run_failed_with_reason(store, tmp_path):
    proc = mlflow_run("-e", "train", "-P", "model=resnext", cwd=tmp_path, uri=store)
    assert proc.returncode != 0
    assert "unknown model 'resnext'" in proc.stderr
    run = only_run()
    assert run.info.status == "FAILED"
    assert "unknown model 'resnext'" in run.data.tags["zar.error"]


def test_mlflow_style_underscore_options_and_bool_values(store, zar):
    """`mlflow run -P skip_bad_images=true -P image_size=16` arrives as `--skip_bad_images true --image_size 16`."""
    result = zar("train", *TINY, "--skip_bad_images", "true", "--image_size", "12")
    assert result.exit_code == 0, result.output
    params = only_run().data.params
    assert params["skip_bad_images"] == "True" and params["image_size"] == "12"


def test_unexpected_errors_are_one_line_too(store, tmp_path):
    """Not a user mistake, still no traceback: a checkpoint whose weights do not fit the model."""
    client = MlflowClient()
    run = client.create_run(client.create_experiment("zar"))
    client.set_terminated(run.info.run_id, "KILLED")
    ckpt = checkpoint_path(client.get_run(run.info.run_id))
    ckpt.parent.mkdir(parents=True)
    torch.save(
        {"model": {"fc.weight": torch.zeros(1)}, "optimizer": {}, "epoch": 1, "config": {}, "model_name": "resnet"},
        ckpt,
    )
    proc = zar_subprocess("train", "--resume", run.info.run_id, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: RuntimeError") and proc.stderr.count("\n") == 1, proc.stderr
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_images_without_class_folders_are_named_as_such(store, zar, tmp_path):
    folder = write_image_folder(tmp_path / "flat", classes=("a",))
    for png in (folder / "a").iterdir():
        png.rename(folder / png.name)
    (folder / "a").rmdir()
    result = zar("train", *TINY, "--data", str(folder))
    assert result.exit_code == 2 and "holds images but no class sub-folders" in result.output


def test_model_logging_is_warmed_up_only_without_loader_workers(store, zar, monkeypatch):
    """A thread importing while DataLoader workers fork could leave a worker holding an import lock."""
    from zar import tracking

    calls = []
    monkeypatch.setattr(tracking, "warm_up_model_logging", lambda: calls.append(1))
    assert zar("train", *TINY).exit_code == 0 and calls == [1]
    result = zar("train", *TINY, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert calls == [1]


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_refused_before_any_run(store, zar, seed):
    result = zar("train", *TINY, "--seed", seed)
    assert result.exit_code == 2 and "config key 'seed' must be between 0 and 4294967295" in result.output
    assert all_runs() == []
