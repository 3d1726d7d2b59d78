"""A logged model, used by MLflow's own clients in a Python that never imports zar."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from zar.config import TrainConfig
from zar.learn.data import load_data

from helpers import TINY, all_runs

# Runs in a fresh Python where importing zar fails, as on a machine without it.
CLIENT = r"""
import importlib.abc, json, sys

class NoZar(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "zar" or name.startswith("zar."):
            raise ImportError("zar is not installed here")

sys.meta_path.insert(0, NoZar())
import mlflow, numpy as np, torch

images = np.load(sys.argv[1])
out = {}
for uri in sys.argv[2:]:
    served = mlflow.pyfunc.load_model(uri)
    table = served.predict(images)
    program = mlflow.pytorch.load_model(uri)
    with torch.inference_mode():
        probs = program(torch.from_numpy(images))
    out[uri] = {
        "pyfunc": table["label"].tolist(),
        "columns": list(table.columns),
        "pytorch": probs.argmax(1).tolist(),
        "sums": probs.sum(1).tolist(),
        "metadata": served.metadata.metadata,
        "signature": served.metadata.signature.to_dict(),
    }
out["zar_imported"] = sorted(m for m in sys.modules if m == "zar" or m.startswith("zar."))
print(json.dumps(out))
"""


def load_without_zar(uris: list[str], images, tmp_path) -> dict:
    """What a Python that cannot import zar gets from MLflow's loaders on each URI (CLIENT's answer)."""
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(tmp_path / "images.npy"), *uris],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("zar_imported") == []
    return out


def raw_validation_images(image_size: int) -> tuple[np.ndarray, list[str], list[str]]:
    """The run's validation images as a user has them (pixels in [0, 1] at image_size), their class names, all names."""
    data = load_data(TrainConfig(data="synthetic", depth=18, image_size=image_size))
    x = F.interpolate(data.val.images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.numpy().astype(np.float32), [data.classes[y] for y in data.val_labels], data.classes


def logged_models(run) -> dict[str, str]:
    client = MlflowClient()
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    return {m.name: m.model_uri for m in found}


def test_both_models_reproduce_the_runs_val_acc_in_a_python_without_zar(store, zar, tmp_path):
    result = zar("train", "--model", "se", *TINY, "--epochs", "2")
    assert result.exit_code == 0, result.output
    (run,) = all_runs()
    params, metrics = run.data.params, run.data.metrics
    images, truth, classes = raw_validation_images(int(params["image_size"]))
    # The normalisation is a param too: a person can read what the model does to a pixel.
    mean, std = float(params["normalisation_mean"]), float(params["normalisation_std"])
    assert 0 < mean < 1 and 0 < std < 1
    uris = logged_models(run)
    out = load_without_zar([uris["model"], uris["best"]], images, tmp_path)
    history = {m.step: m.value for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")}
    for name, epoch in (("model", 2), ("best", int(metrics["best_epoch"]))):
        got = out[uris[name]]
        assert sum(t == p for t, p in zip(truth, got["pyfunc"])) / len(truth) == history[epoch], name
        assert [classes[i] for i in got["pytorch"]] == got["pyfunc"], name
        assert np.allclose(got["sums"], 1.0, atol=1e-5)  # probabilities, not logits
        assert got["columns"] == ["label", *classes]
        assert got["metadata"]["classes"] == classes
        assert got["metadata"]["normalisation_mean"] == [mean] and got["metadata"]["normalisation_std"] == [std]
        signature = got["signature"]
        assert json.loads(signature["inputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 1, 16, 16]}
        assert [c["name"] for c in json.loads(signature["outputs"])] == ["label", *classes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_post(model_uri: str, images: np.ndarray, cwd: Path) -> dict:
    """``mlflow models serve --env-manager local`` on the model (with zar hidden); its answer to ``images``."""
    port = free_port()
    log = open(cwd / "serve.log", "w")
    proc = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},  # its uvicorn
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (cwd / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        return json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        log.close()


@pytest.mark.slow  # ~40 s: a model server starts
def test_mlflow_models_serve_answers_an_image_with_its_class_name(store, zar, tmp_path):
    assert zar("train", "--model", "resnet", *TINY, "--epochs", "3").exit_code == 0
    (run,) = all_runs()
    images, truth, classes = raw_validation_images(16)
    answer = serve_and_post(logged_models(run)["model"], images[:2], tmp_path)
    predictions = answer["predictions"]
    assert len(predictions) == 2
    for row in predictions:
        assert row["label"] in classes and set(row) == {"label", *classes}
        assert row["label"] == max(classes, key=lambda c: row[c])
    torch.testing.assert_close(sum(predictions[0][c] for c in classes), 1.0, atol=1e-5, rtol=0)
