"""Data-parallel training with torchrun: 2 CPU processes (gloo) on synthetic data, one MLflow run.

Rank 0 alone records; the validation metrics and confusion matrix cover the whole validation set,
so they equal a single-process evaluation of the logged model. A rank that dies fails the run,
Ctrl-C leaves it KILLED, and ``--resume`` under torchrun finishes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from sklearn.metrics import confusion_matrix
from test_train import assert_complete_run

from zar.config import TrainConfig
from zar.learn.data import load_data

from helpers import all_runs, default_sigint, epochs, zar_subprocess

pytestmark = pytest.mark.slow
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]


def torchrun(*args, **kwargs) -> subprocess.Popen:
    if not Path(TORCHRUN[0]).exists():
        TORCHRUN[0] = shutil.which("torchrun")
    return subprocess.Popen(
        [*TORCHRUN, "-m", "zar", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=default_sigint,
        **kwargs,
    )


def until(proc: subprocess.Popen, text: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError("".join(lines))


def test_two_processes_make_one_complete_run_whose_val_acc_is_the_logged_models(store):
    proc = torchrun("--model", "resnet", *epochs(2), "--batch-size", "16")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert out.count("epoch   2/2") == 1 and out.count("Run: ") == 1  # rank 0 alone prints
    (run,) = all_runs()
    assert_complete_run(run, "resnet", epochs=2, n_val=20)
    params = run.data.params
    assert (params["world_size"], params["batch_size"], params["global_batch_size"]) == ("2", "16", "32")

    # The logged model, evaluated in this one process on the whole validation set, scores what the run says.
    client = MlflowClient()
    (logged,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}' and name = 'model'"
    )
    model = mlflow.pytorch.load_model(logged.model_uri)
    cfg = TrainConfig(data="synthetic", depth=18, image_size=16, epochs=2, batch_size=16)
    data = load_data(cfg)
    assert data.fingerprint == run.data.tags["zar.split_fingerprint"]
    # The images as a user has them: [0, 1] pixels at image_size; the model normalises them itself.
    pixels = F.interpolate(data.val.images, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.inference_mode():  # the logged program was exported in eval mode
        y_true, y_pred = list(data.val_labels), model(pixels).argmax(1).tolist()
    assert len(y_true) == 20
    assert sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true) == run.data.metrics["val_acc"]
    logged_cm = json.loads(open(client.download_artifacts(run.info.run_id, "confusion_matrix.json")).read())
    assert logged_cm["matrix"] == confusion_matrix(y_true, y_pred, labels=range(4)).tolist()


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "zar" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process")


def test_a_rank_that_dies_fails_the_run(store):
    proc = torchrun("--model", "resnet", *epochs(4))
    lines = until(proc, "epoch   1/4")
    rank_process(proc, 1).kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, "".join(lines) + out
    (run,) = all_runs()
    assert run.info.status == "FAILED", (run.info.status, "".join(lines) + out)
    assert run.data.tags["zar.error"], run.data.tags


def test_ctrl_c_leaves_the_run_killed_and_resume_under_torchrun_finishes_it(store):
    proc = torchrun("--model", "resnet", *epochs(3), start_new_session=True)
    lines = until(proc, "epoch   1/3")
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches torchrun and every rank
    out, _ = proc.communicate(timeout=300)
    (run,) = all_runs()
    assert run.info.status == "KILLED", (run.info.status, run.data.tags.get("zar.error"), "".join(lines) + out)

    alone = zar_subprocess("train", "--resume", run.info.run_id)  # one process: a schedule made for two
    assert alone.returncode == 2, alone.stderr
    assert "trained by 2 process(es) and this resume has 1" in alone.stderr
    assert all_runs()[0].info.status == "KILLED"

    again = torchrun("--resume", run.info.run_id)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "resuming run" in out and out.count("epoch   3/3") == 1
    (run,) = all_runs()
    assert run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(steps) == [1, 2, 3]
