"""Interruptions, resume, divergence and store faults, with real processes and signals."""

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from helpers import TINY, default_sigint, epochs, zar_subprocess
from helpers import all_runs as runs

METRICS = ["train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s"]
FOUR_EPOCHS = epochs(4)
SIGNALLED = 8  # epochs of the runs the signal tests stop: enough that one is always left to interrupt


def history(run_id, key):
    return [(m.step, m.value) for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def logged(epoch: int, timeout: float = 60) -> None:
    """Wait until the only run's val_acc has step ``epoch``: zar logs an epoch once its checkpoint is synced."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = runs()
        if found and any(s == epoch for s, _ in history(found[0].info.run_id, "val_acc")):
            return
        time.sleep(0.05)
    raise TimeoutError(f"epoch {epoch} not logged after {timeout} s")


def start_and_signal(sig, after_epoch=2, extra=(), budget="1", keep_epoch=None):
    """Start `zar train` for SIGNALLED epochs; send `sig` once epoch after_epoch is logged.
    ``budget``: ZAR_CHECKPOINT_BUDGET, the share of the run's time checkpoints may take (1: every epoch).
    ``keep_epoch``: once that epoch is logged, its checkpoint is copied and put back after the signal,
    as a run killed outright between two checkpoints leaves it: older than what MLflow shows."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "zar", "train", *epochs(SIGNALLED), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,  # as a terminal's foreground job gets it, even when pytest runs in the background
        env={**os.environ, "ZAR_CHECKPOINT_BUDGET": budget},
    )
    lines, kept = [], None
    for line in proc.stdout:
        lines.append(line)
        if keep_epoch and line.startswith(f"epoch {keep_epoch:>3}/{SIGNALLED}"):
            logged(keep_epoch)  # with a budget of 1, its checkpoint was written before it was logged
            ckpt = Path(runs()[0].data.tags["zar.checkpoint"])
            kept = (ckpt, ckpt.read_bytes())
        if line.startswith(f"epoch {after_epoch:>3}/{SIGNALLED}"):
            logged(after_epoch)
            proc.send_signal(sig)
            break
    out, _ = proc.communicate(timeout=120)
    if kept:
        kept[0].write_bytes(kept[1])
    return proc.returncode, "".join(lines) + out


def checkpointed(run) -> tuple[int, list[int]]:
    """The epoch a stopped run's checkpoint holds, and the epochs MLflow shows: every one from 1, the
    checkpoint's among them (a run killed outright may show more: resume trains those again)."""
    epoch = torch.load(run.data.tags["zar.checkpoint"], weights_only=True)["epoch"]
    shown = [s for s, _ in history(run.info.run_id, "val_acc")]
    assert shown == list(range(1, len(shown) + 1)) and epoch <= len(shown), (shown, epoch)
    return epoch, shown


@pytest.mark.slow
@pytest.mark.parametrize("behind", [False, True])  # the checkpoint of the last epoch MLflow shows, or of epoch 3
def test_sigkill_then_resume_equals_an_uninterrupted_run(store, behind):
    code, output = start_and_signal(signal.SIGKILL, after_epoch=6, keep_epoch=3 if behind else None)
    assert code == -signal.SIGKILL, output
    (killed,) = runs()
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves behind in MLflow
    ckpt = Path(killed.data.tags["zar.checkpoint"])
    done_epochs, shown = checkpointed(killed)
    assert len(shown) >= 6 and done_epochs == (3 if behind else len(shown))

    # zar runs --stale finds it (the process is gone) ...
    stale = zar_subprocess("runs", "--stale")
    assert killed.info.run_id in stale.stdout and "process gone" in stale.stdout
    # ... and resume continues that same run to the end.
    resumed = zar_subprocess("train", "--resume", killed.info.run_id, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stdout and f"after epoch {done_epochs} of {SIGNALLED}" in resumed.stdout

    reference = zar_subprocess("train", *epochs(SIGNALLED))
    assert reference.returncode == 0, reference.stderr
    done = {r.info.run_id: r for r in runs()}
    assert len(done) == 2 and all(r.info.status == "FINISHED" for r in done.values())
    ref_id = next(i for i in done if i != killed.info.run_id)
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        got, want = history(killed.info.run_id, key), history(ref_id, key)
        assert [s for s, _ in got] == list(range(1, SIGNALLED + 1)), key  # no gap, no duplicate step
        assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for (_, a), (_, b) in zip(got, want)), key
    for key in ("best_val_acc", "best_epoch", "params_total"):
        assert done[killed.info.run_id].data.metrics[key] == pytest.approx(done[ref_id].data.metrics[key])
    assert not ckpt.exists()  # a finished run keeps its model, not its checkpoint
    predicted = [
        np.load(mlflow.artifacts.download_artifacts(run_id=i, artifact_path="val_predictions.npz"))["last_p_true"]
        for i in (killed.info.run_id, ref_id)
    ]
    assert np.array_equal(*predicted)  # the resumed run's model is the uninterrupted run's, to the bit


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_end_the_run_killed_with_its_checkpoint(store, sig):
    code, output = start_and_signal(sig, after_epoch=1, budget="0.02")  # the default: the stop writes it
    assert code == 130, output
    assert "marked KILLED" in output and "zar train --resume" in output
    assert "Traceback" not in output
    (run,) = runs()
    assert run.info.status == "KILLED"
    assert run.data.tags["zar.error"] == f"interrupted by {signal.Signals(sig).name}"
    done_epochs, shown = checkpointed(run)
    assert done_epochs == len(shown) and 1 <= done_epochs < SIGNALLED  # the last epoch, whatever the budget


@pytest.mark.slow  # 14-17 s: the fast suite had reached 5.6 min
def test_stale_runs_can_be_closed_and_resume_refuses_finished_runs(store, zar):
    code, _ = start_and_signal(signal.SIGKILL, after_epoch=1)
    (run,) = runs()
    listed = zar("runs", "--stale", "--mark-failed")
    assert listed.exit_code == 0 and run.info.run_id in listed.output and "Marked 1 run(s) FAILED" in listed.output
    run = MlflowClient().get_run(run.info.run_id)
    assert run.info.status == "FAILED" and "process gone" in run.data.tags["zar.error"]
    assert "No stale runs." in zar("runs", "--stale").output
    # A FAILED run resumes too; a FINISHED one has nothing left to do.
    resumed = zar("train", "--resume", run.info.run_id, "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    run = MlflowClient().get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "zar.error" not in run.data.tags
    again = zar("train", "--resume", run.info.run_id)
    assert again.exit_code == 2 and "already FINISHED" in again.output
    unknown = zar("train", "--resume", "0" * 32)
    assert unknown.exit_code == 2 and "no MLflow run with id" in unknown.output
    mixed = zar("train", "--resume", run.info.run_id, "--epochs", "9", "--model", "se")
    assert mixed.exit_code == 2 and "drop --epochs, --model" in mixed.output


def test_divergence_fails_the_run_at_once_with_epoch_and_step(store, zar):
    result = zar("train", *FOUR_EPOCHS, "--optimizer", "sgd", "--lr", "1e12")
    assert result.exit_code == 1
    assert "training diverged: loss became nan at epoch 1" in result.output
    (run,) = runs()
    assert run.info.status == "FAILED"
    assert run.data.tags["zar.diverged_at"].startswith("epoch 1, step ")
    assert "diverged" in run.data.tags["zar.error"]


def test_divergence_after_a_good_epoch_keeps_its_checkpoint(store, zar, monkeypatch):
    """Poison the data from the second epoch on: epoch 1 is good, epoch 2 diverges."""
    from zar import training
    from zar.learn.data import load_data

    class Poisoned(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner, self.reads = inner, 0

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            self.reads += 1
            x, y = self.inner[i]
            return (x * float("nan") if self.reads > len(self.inner) else x), y

    def poisoned_load_data(cfg):
        bundle = load_data(cfg)
        bundle.train = Poisoned(bundle.train)
        return bundle

    monkeypatch.setattr(training, "load_data", poisoned_load_data)
    result = zar("train", *FOUR_EPOCHS)
    assert result.exit_code == 1 and "epoch 2, step 1" in result.output
    assert "the checkpoint of epoch 1 is kept" in result.output
    (run,) = runs()
    assert run.info.status == "FAILED" and run.data.tags["zar.diverged_at"] == "epoch 2, step 1"
    assert torch.load(run.data.tags["zar.checkpoint"], weights_only=True)["epoch"] == 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["train", *TINY], ["compare"], ["runs"], ["study", *TINY]])
def test_unreachable_tracking_server_fails_fast_and_clearly(tmp_path, command):
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    proc = zar_subprocess(*command, env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path, timeout=60)
    assert time.monotonic() - start < 15
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"Error: cannot reach the MLflow tracking server at {uri}")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "epoch" not in proc.stdout  # nothing trained


@pytest.mark.slow
def test_four_processes_share_one_new_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # not created yet: the racy case
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "zar", "train", *TINY, "--epochs", "2", "--seed", str(i)],
            cwd=tmp_path,
            env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outputs]
    mlflow.set_tracking_uri(uri)
    try:
        found = runs()
        assert len(found) == 4 and all(r.info.status == "FINISHED" for r in found)
        for r in found:
            for key in METRICS:
                assert [s for s, _ in history(r.info.run_id, key)] == [1, 2], key
    finally:
        mlflow.set_tracking_uri(None)


bad_values = {
    "lr": st.sampled_from([0, -1.0, "fast", float("inf")]),
    "epochs": st.sampled_from([0, -3, 2.5, "ten", True]),
    "val_ratio": st.sampled_from([0, 1, 1.5, -0.1]),
    "batch_size": st.sampled_from([0, "32x", None]),
    "optimizer": st.sampled_from(["lion", 3]),
    "depth": st.sampled_from([50, 0]),
}
good_values = {
    "lr": st.floats(1e-5, 1.0),
    "epochs": st.integers(1, 3),
    "seed": st.integers(0, 100),
    "weight_decay": st.floats(0, 0.1),
    "optimizer": st.sampled_from(["adamw", "sgd"]),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bad=st.sampled_from(sorted(bad_values)).flatmap(lambda k: st.tuples(st.just(k), bad_values[k])),
    good=st.fixed_dictionaries({}, optional=good_values),
    unknown=st.booleans(),
)
def test_any_bad_params_file_is_one_line_exit_2_and_no_run(store, zar, tmp_path, bad, good, unknown):
    key, value = bad
    config = {**good, key: value}
    if unknown:
        config["learning_rate"] = 0.1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(config))
    result = zar("train", "--params", str(path), "--data", "synthetic", "--no-progress")  # no key overridden
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "learning_rate" in result.output or f"'{key}'" in result.output
    assert runs() == []


def test_a_new_run_carries_its_process_tags_from_the_start(store):
    """A process that dies between creating its run and taking charge of it leaves a run --stale finds."""
    from zar import tracking
    from zar.tracking import runs as run_life

    run = run_life.start("zar", "bare")
    try:
        tags = MlflowClient().get_run(run.info.run_id).data.tags
        assert tags["zar.pid"] == str(os.getpid()) and tags["zar.host"] == socket.gethostname()
        assert run_life.process_alive(tags) is True
    finally:
        tracking.end_run(run.info.run_id, "FINISHED")


# --- resume refuses what would mix data, code or files -------------------------------------------


def stopped_run(zar, *extra):
    """A run of TINY stopped after its first epoch (KILLED, checkpoint kept), as Ctrl-C leaves one."""
    code, output = start_and_signal(signal.SIGINT, after_epoch=1, extra=extra)
    assert code == 130, output
    (run,) = runs()
    return run


@pytest.mark.slow  # ~15 s; the fast suite stays near 5 min
def test_resume_refuses_other_code_and_changed_data(store, zar, tmp_path):
    run = stopped_run(zar)
    run_id = run.info.run_id
    client = MlflowClient()
    client.set_tag(run_id, "zar.version", "0.0.1")
    refused = zar("train", "--resume", run_id)
    assert refused.exit_code == 2 and "zar.version was 0.0.1, now" in refused.output
    client.set_tag(run_id, "zar.version", run.data.tags["zar.version"])
    client.set_tag(run_id, "mlflow.source.git.commit", "0" * 40)
    refused = zar("train", "--resume", run_id)
    assert refused.exit_code == 2 and f"mlflow.source.git.commit was {'0' * 40}" in refused.output
    client.set_tag(run_id, "mlflow.source.git.commit", run.data.tags["mlflow.source.git.commit"])
    assert client.get_run(run_id).info.status == "KILLED"  # refused before anything changed
    client.set_tag(run_id, "zar.data_fingerprint", "f" * 16)
    refused = zar("train", "--resume", run_id)
    assert refused.exit_code == 2 and "the data of run" in refused.output and "f" * 16 in refused.output
    after = client.get_run(run_id)
    assert after.info.status == "FAILED" and "changed since it started" in after.data.tags["zar.error"]


@pytest.mark.slow  # ~15 s; the fast suite stays near 5 min
def test_resume_reads_only_the_runs_own_checkpoint(store, zar, tmp_path):
    """A checkpoint tag pointing elsewhere (a shared server's tags are anyone's) is neither read nor deleted."""
    run = stopped_run(zar)
    run_id = run.info.run_id
    own = Path(run.data.tags["zar.checkpoint"])
    decoy = tmp_path / "precious.pt"
    decoy.write_bytes(own.read_bytes())
    MlflowClient().set_tag(run_id, "zar.checkpoint", str(decoy))
    own.unlink()
    refused = zar("train", "--resume", run_id)
    assert refused.exit_code == 2 and f"no checkpoint at {own}" in refused.output
    decoy_copy = decoy.read_bytes()
    own.write_bytes(decoy_copy)
    assert zar("train", "--resume", run_id, "--no-progress").exit_code == 0
    assert decoy.read_bytes() == decoy_copy and not own.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short"])
def test_an_empty_or_truncated_checkpoint_is_named_in_one_line(store, zar, content):
    from zar.tracking import checkpoint_path

    client = MlflowClient()
    run = client.create_run(client.create_experiment("zar"))
    client.set_terminated(run.info.run_id, "KILLED")
    ckpt = checkpoint_path(client.get_run(run.info.run_id))
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(content)
    result = zar("train", "--resume", run.info.run_id)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and f"checkpoint {ckpt} is empty or truncated" in result.output
    assert client.get_run(run.info.run_id).info.status == "KILLED"  # refused before anything changed


@pytest.mark.slow  # 14-17 s: the fast suite had reached 5.6 min
def test_resume_claims_the_run_before_loading_data(store, zar, monkeypatch):
    """While the data loads, the run is already RUNNING under this process: a second resume is refused."""
    from zar import training

    run = stopped_run(zar)
    seen = {}
    real_load = training.load_data

    def load_data(cfg):
        claimed = MlflowClient().get_run(run.info.run_id)
        seen["status"], seen["pid"] = claimed.info.status, claimed.data.tags["zar.pid"]
        seen["second"] = zar("train", "--resume", run.info.run_id)
        return real_load(cfg)

    monkeypatch.setattr(training, "load_data", load_data)
    assert zar("train", "--resume", run.info.run_id, "--no-progress").exit_code == 0
    assert seen["status"] == "RUNNING" and seen["pid"] == str(os.getpid())
    assert seen["second"].exit_code == 2 and "still being trained by process" in seen["second"].output


# --- faults found before training, not after an epoch ----------------------------------------------


def test_an_unwritable_checkpoint_folder_fails_before_the_first_epoch(store, zar, tmp_path, monkeypatch):
    from zar import tracking

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should go")
    monkeypatch.setattr(tracking, "checkpoint_path", lambda run: blocker / "checkpoints" / "last.pt")
    result = zar("train", *TINY)
    assert result.exit_code == 2 and f"cannot write checkpoints to {blocker / 'checkpoints'}" in result.output
    assert "epoch" not in result.output
    (run,) = runs()
    assert run.info.status == "FAILED"


def test_an_unwritable_artifact_store_fails_before_the_first_epoch(store, zar):
    """/proc takes no new folders, not even from root."""
    MlflowClient().create_experiment("zar", artifact_location="/proc/zar-artifacts")
    result = zar("train", *TINY)
    assert result.exit_code == 2, result.output
    assert "cannot write" in result.output and "/proc/zar-artifacts" in result.output
    assert "epoch" not in result.output
    (run,) = runs()
    assert run.info.status == "FAILED"


# --- stores: read-only commands, paging, credentials -------------------------------------------------


@pytest.mark.parametrize("command", [["compare"], ["runs"]])
def test_reading_commands_never_create_a_store(tmp_path, command):
    env = {"MLFLOW_TRACKING_URI": ""}
    proc = zar_subprocess(*command, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "no runs here" in proc.stderr, proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_runs_are_listed_page_by_page(store, zar):
    from zar import tracking

    client = MlflowClient()
    experiment_id = client.create_experiment("zar")
    made = [client.create_run(experiment_id).info.run_id for _ in range(5)]
    assert sorted(r.info.run_id for r in tracking.latest_runs(experiment_id, page_size=2)) == sorted(made)


def test_credentials_in_the_tracking_uri_go_as_basic_auth_and_never_show(tmp_path):
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from zar import tracking
    from zar.tracking.store import probe_server

    seen = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://alice:s3cret@127.0.0.1:{server.server_port}"
    try:
        probe_server(uri)
    finally:
        server.shutdown()
    assert seen == [("/health", "Basic " + base64.b64encode(b"alice:s3cret").decode())]
    mlflow.set_tracking_uri(uri)
    try:
        link = tracking.runs_url("1", "abc")
    finally:
        mlflow.set_tracking_uri(None)
    assert link.startswith(f"http://127.0.0.1:{server.server_port}/#/") and "s3cret" not in link
    dead = f"http://alice:s3cret@127.0.0.1:{closed_port()}"
    proc = zar_subprocess("runs", env={"MLFLOW_TRACKING_URI": dead}, cwd=tmp_path)
    assert proc.returncode == 2 and "alice:***@" in proc.stderr and "s3cret" not in proc.stderr


def test_a_checkpoint_is_synced_then_renamed_then_its_folder_synced(tmp_path, monkeypatch):
    """The order that leaves the previous checkpoint whole if power fails at any point."""
    from zar import recording

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "checkpoints" / "last.pt"
    recording.save_checkpoint(path, {"epoch": 1})
    assert events == [("fsync", "file"), ("replace", "last.pt"), ("fsync", "folder")]
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


def test_a_stop_signal_during_a_checkpoint_write_is_handled_once_the_checkpoint_is_whole(tmp_path):
    """A SIGTERM inside torch.save used to surface as torch's RuntimeError: the run ended FAILED, not KILLED."""
    from zar import recording

    class SignalsWhilePickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            return (int, (7,))

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    checkpoints = recording.Checkpoints()
    checkpoints.state, checkpoints.epoch = {"epoch": 3, "x": SignalsWhilePickled()}, 3
    path = tmp_path / "checkpoints" / "last.pt"
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            checkpoints.write(path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert checkpoints.written == 3
    with torch.serialization.safe_globals([int]):  # what the test's object pickles as
        assert torch.load(path, weights_only=True) == {"epoch": 3, "x": 7}


def test_a_budget_of_1_writes_every_epoch_however_large_the_state():
    """ZAR_CHECKPOINT_BUDGET=1 means every epoch: a first write estimated at more than the run's time
    so far skipped epoch 1, and a kill -9 then left nothing to resume (seen in CI)."""
    from zar import recording

    checkpoints = recording.Checkpoints(budget=1.0)
    checkpoints.keep({"w": torch.zeros(50_000_000)}, 1)  # 200 MB: estimated at 1 s of writing
    assert checkpoints.due()
    default = recording.Checkpoints(budget=0.02)
    default.keep({"w": torch.zeros(50_000_000)}, 1)
    assert not default.due()  # the default still weighs the write against the run's time
