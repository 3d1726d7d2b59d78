"""zar sweep when things go wrong: interrupts, dead workers, another storage, changed data, rejected trials.

Each test runs the real path (real training on tiny data, a real MLflow store and Optuna storage in a
temporary folder, the real CLI, real signals) and names the defect it guards in its docstring.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image
from test_sweep import sweep_parent, write_space

import zar.sweep as sweep_module

from helpers import TINY, children, default_sigint, epochs, invoke, runs_of

TWO_EPOCHS = epochs(2)
LR = {"lr": {"log_uniform": [1.0e-4, 1.0e-2]}}


def trial_runs(parent_id: str, experiment="zar"):
    return [r for r in children(parent_id, experiment) if "zar.trial" in r.data.tags]


def optuna_study(folder: Path, parent, model: str) -> optuna.Study:
    name = json.loads(parent.data.params["optuna_studies"])[model]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")


def sweep_args(space: str, trials: int = 1, *rest: str) -> list[str]:
    return ["sweep", "--models", "resnet", "--space", space, "--trials", str(trials), *rest]


def start_and_signal(args: list[str], line_starts: str, sig: int) -> tuple[int, str]:
    """``zar ARGS`` in a process of its own, sent ``sig`` once it printed a line starting with ``line_starts``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "zar", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(line_starts):
            time.sleep(0.1)  # into the next epoch, well before it can end
            proc.send_signal(sig)
            break
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out


@contextlib.contextmanager
def at_most(seconds: int):
    """A sweep that waits forever fails the test instead of hanging it (SIGALRM, in the main thread)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def counts_cell(output: str, model: str = "ResNet-18") -> str:
    """The 'Trials: finished / pruned / failed' cell of the best-trial table's row of ``model``."""
    row = next(line for line in output.splitlines() if line.startswith(f"| {model}"))
    return row.split(" | ")[-2]


def error_line(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("Error: ")]
    return line


# --- 3: an interrupted trial continues by running the sweep again, never by 'zar train --resume' --------------


@pytest.mark.slow
def test_an_interrupted_trial_says_to_rerun_the_sweep_drops_its_checkpoint_and_refuses_train_resume(store, tmp_path):
    """Issue 20, item 3: the message said "continue it with 'zar train --resume <trial>'" and "study run";
    following it made a 1-trial sweep count 2 finished, its best one a trial Optuna recorded as FAIL; the
    replaced trial's checkpoint was never deleted."""
    args = sweep_args(write_space(tmp_path, LR), 1, *TWO_EPOCHS)
    code, output = start_and_signal(args, "[resnet trial 0] epoch   1/2", signal.SIGINT)
    assert code == 130, output
    message = error_line(output)
    assert "zar sweep" in message and "again" in message, message
    assert "zar train --resume" not in output and "study run" not in output, message
    parent = sweep_parent()
    assert parent.info.status == "KILLED" and f"sweep run {parent.info.run_id}" in message
    (killed,) = trial_runs(parent.info.run_id)
    assert killed.info.status == "KILLED"
    assert not Path(killed.data.tags["zar.checkpoint"]).exists()  # Optuna replaces the trial: nothing resumes it

    refused = invoke("train", "--resume", killed.info.run_id)
    assert refused.exit_code == 2, refused.output
    assert len(refused.output.strip().splitlines()) == 1 and "zar sweep" in refused.output, refused.output

    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert counts_cell(again.output) == "1 / 0 / 0"  # the interrupted trial does not count
    study = optuna_study(tmp_path, parent, "resnet")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    best = next(line for line in again.output.splitlines() if line.startswith("| ResNet-18"))
    assert best.split(" | ")[1] == "1"  # the best trial is the one Optuna completed


# --- 4: the same sweep on another Optuna storage ------------------------------------------------------------


def test_a_sweep_continued_on_another_optuna_storage_is_refused_naming_both(store, tmp_path, monkeypatch):
    """Issue 20, item 4: continuing a finished sweep with another --storage (or a relative one from another
    folder) trained a new 'trial 0' and counted 3 of 1."""
    args = sweep_args(write_space(tmp_path, LR), 1, *TINY)
    first = invoke(*args)  # the default storage: optuna.db beside mlflow.db
    assert first.exit_code == 0, first.output
    parent = sweep_parent()
    recorded = parent.data.tags["zar.optuna_storage"]
    assert recorded == f"sqlite:///{tmp_path / 'optuna.db'}"

    same = invoke(*args, "--storage", "sqlite:///optuna.db")  # relative, from the folder it names: the same file
    assert same.exit_code == 0 and f"Continuing sweep run {parent.info.run_id}" in same.output, same.output

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for storage, shown in (
        ("sqlite:///optuna.db", f"sqlite:///{tmp_path / 'elsewhere' / 'optuna.db'}"),
        (f"sqlite:///{tmp_path / 'other.db'}", f"sqlite:///{tmp_path / 'other.db'}"),
    ):
        refused = invoke(*args, "--storage", storage)
        assert refused.exit_code == 2, refused.output
        line = error_line(refused.output)
        assert len(refused.output.strip().splitlines()) == 1 and recorded in line and shown in line, line
    assert not (tmp_path / "elsewhere" / "optuna.db").exists() and not (tmp_path / "other.db").exists()
    parent = sweep_parent()
    assert parent.info.status == "FINISHED" and len(trial_runs(parent.info.run_id)) == 1


# --- 5: a grid's choice repeated once normalised --------------------------------------------------------------


def test_a_choice_repeated_once_normalised_is_one_line_naming_it_before_any_run(store, tmp_path):
    """Issue 20, item 5: 0.001 and 1e-3 (a string to YAML 1.1) passed validation, then the sweep failed with
    'Error: StopIteration: ', on every rerun too."""
    space = tmp_path / "space.yaml"
    space.write_text("lr: {choice: [0.001, 1e-3]}\n")
    result = invoke(*sweep_args(str(space), 2, "--method", "grid", *TINY))
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert len(result.output.strip().splitlines()) == 1 and "lr" in line and "0.001" in line, line
    assert not (tmp_path / "optuna.db").exists() and not runs_of_any()


def runs_of_any():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


# --- 8: trials the config rejects ---------------------------------------------------------------------------


def test_rejected_trials_count_as_failed_and_a_sweep_where_none_finished_fails(store, tmp_path):
    """Issue 20, item 8: a trial the config rejected (scheduler none with warmup) was in no column of the
    counts ('0 / 0 / 0'), and a sweep where no trial finished exited 0 with its run FINISHED."""
    params = tmp_path / "cosine.yaml"
    params.write_text("scheduler: cosine\n")  # the base every value of the space is checked on
    space = write_space(tmp_path, {"scheduler": {"choice": ["none", "cosine"]}, "warmup_epochs": {"choice": [1]}})
    both = ["--method", "grid", "--params", str(params), *TWO_EPOCHS]
    half = invoke(*sweep_args(space, 2, *both, "--experiment", "half"))
    assert half.exit_code == 0, half.output
    assert counts_cell(half.output) == "1 / 0 / 1"
    rejected = next(r for r in trial_runs(sweep_parent("half").info.run_id, "half") if r.info.status == "FAILED")
    assert "warmup_epochs" in rejected.data.tags["zar.error"] and rejected.data.params["scheduler"] == "none"

    none_space = write_space(tmp_path, {"scheduler": {"choice": ["none"]}, "warmup_epochs": {"choice": [1]}})
    none = invoke(*sweep_args(none_space, 1, *both, "--experiment", "none"))
    assert none.exit_code == 1, none.output
    assert counts_cell(none.output) == "0 / 0 / 1"
    line = error_line(none.output)
    parent = sweep_parent("none")
    assert "no trial" in line and "ResNet-18" in line and "warmup_epochs" in line, line
    assert parent.info.status == "FAILED" and "no trial" in parent.data.tags["zar.error"]


# --- suspected: a trial RUNNING with no process, left by an interrupt right after study.ask() ------------------


def test_a_trial_left_running_with_no_process_does_not_stall_the_sweep(store, tmp_path, monkeypatch):
    """Suspected: Ctrl-C between study.ask() and recording the trial's process left a RUNNING trial with no
    pid, and every later run of the sweep waited for it forever."""
    args = sweep_args(write_space(tmp_path, LR), 1, *TINY)
    assert invoke(*args).exit_code == 0
    study = optuna_study(tmp_path, sweep_parent(), "resnet")
    stuck = study.ask()  # what that interrupt leaves: RUNNING, no process, no heartbeat
    monkeypatch.setattr(sweep_module, "GRACE_S", 1)
    time.sleep(1.5)
    with at_most(60):
        again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert study.trials[stuck.number].state == TrialState.FAIL
    assert counts_cell(again.output) == "1 / 0 / 0"


# --- dead workers: kill -9 --------------------------------------------------------------------------------


def dead_trial(parent_id: str):
    (run,) = [r for r in trial_runs(parent_id) if r.data.tags["zar.trial"] == "0"]
    return run


@pytest.mark.slow
def test_after_kill_9_the_next_run_reruns_the_dead_trial_and_counts_it_replaced_not_failed(store, tmp_path):
    """Suspected: after kill -9 of a sweep mid-trial, close_orphans marked the trial FAILED while Optuna
    replaced it, so 'failed' counted a replaced trial."""
    args = sweep_args(write_space(tmp_path, LR), 1, *TWO_EPOCHS)
    code, output = start_and_signal(args, "[resnet trial 0] epoch   1/2", signal.SIGKILL)
    assert code == -signal.SIGKILL, output
    parent = sweep_parent()
    assert dead_trial(parent.info.run_id).info.status == "RUNNING"

    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert counts_cell(again.output) == "1 / 0 / 0"
    dead = dead_trial(parent.info.run_id)
    assert dead.info.status == "FAILED" and "process" in dead.data.tags["zar.error"]
    assert not Path(dead.data.tags["zar.checkpoint"]).exists()
    study = optuna_study(tmp_path, parent, "resnet")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
def test_a_dead_worker_on_another_machine_is_found_by_its_heartbeat_and_its_trial_rerun(store, tmp_path, monkeypatch):
    """Issue 20, item 3: a dead sweep worker must not stall the sweep. A worker on another machine cannot
    be asked whether its process lives: Optuna's heartbeat tells. Its trial is re-queued and its run FAILED."""
    args = sweep_args(write_space(tmp_path, LR), 1, *TWO_EPOCHS)
    code, output = start_and_signal(args, "[resnet trial 0] epoch   1/2", signal.SIGKILL)
    assert code == -signal.SIGKILL, output
    parent = sweep_parent()
    # What a worker on another machine leaves when it dies: its host on the trial and on the trial's run.
    study = optuna_study(tmp_path, parent, "resnet")
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), running.number
    )
    storage.set_trial_user_attr(trial_id, "zar.host", "elsewhere")
    MlflowClient().set_tag(dead_trial(parent.info.run_id).info.run_id, "zar.host", "elsewhere")

    monkeypatch.setattr(sweep_module, "GRACE_S", 2)
    time.sleep(2.5)
    with at_most(120):
        again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert counts_cell(again.output) == "1 / 0 / 0"
    dead = dead_trial(parent.info.run_id)
    assert dead.info.status == "FAILED" and "heartbeat" in dead.data.tags["zar.error"]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
def test_a_worker_killed_mid_trial_has_its_run_failed_and_its_trial_rerun_by_the_holder(store, tmp_path):
    """Suspected: a worker killed with kill -9 left its MLflow run RUNNING and its trial never re-run."""
    args = sweep_args(write_space(tmp_path, LR), 6, *epochs(3))
    command = [sys.executable, "-m", "zar", *args]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    held = [holder.stdout.readline()]
    while not held[-1].startswith("resnet trial 0 of 6"):  # the parent and its first trial exist
        held.append(holder.stdout.readline())
        assert held[-1], "".join(held)
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in worker.stdout:
        seen.append(line)
        taken = re.match(r"\[resnet trial (\d+)\] epoch   1/3", line)
        if taken:
            worker.kill()
            break
    worker.wait(timeout=30)
    assert taken and "Joining sweep run" in "".join(seen), "".join(seen)
    out, _ = holder.communicate(timeout=300)
    output = "".join(held) + out
    assert holder.returncode == 0, output
    finished, pruned, failed = (int(n) for n in counts_cell(output).split(" / "))  # no '(1 running)' either
    assert finished + pruned == 6 and failed == 0, output
    parent = sweep_parent()
    dead = next(r for r in trial_runs(parent.info.run_id) if r.data.tags["zar.trial"] == taken.group(1))
    assert dead.info.status == "FAILED" and "process" in dead.data.tags["zar.error"]
    assert not [r for r in trial_runs(parent.info.run_id) if r.info.status == "RUNNING"]
    study = optuna_study(tmp_path, parent, "resnet")
    assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 6


# --- suspected: what makes a sweep the same sweep -------------------------------------------------------------


@pytest.mark.slow  # ~15-20 s: keeps the fast suite near 5 minutes
def test_adding_seeds_later_continues_the_same_search(store, tmp_path):
    """Suspected: --seeds was part of the sweep's key, so adding it later started a whole new search."""
    args = sweep_args(write_space(tmp_path, LR), 1, *TINY)
    assert invoke(*args).exit_code == 0
    parent = sweep_parent()
    seeded = invoke(*args, "--seeds", "7")
    assert seeded.exit_code == 0, seeded.output
    assert f"Continuing sweep run {parent.info.run_id}" in seeded.output
    assert sweep_parent().info.run_id == parent.info.run_id and len(trial_runs(parent.info.run_id)) == 1
    reruns = [r for r in runs_of(filter_string="tags.`zar.rerun_of` LIKE '%'")]
    assert [r.data.params["seed"] for r in reruns] == ["7"]


def image_folder(root: Path, shade: int = 0) -> Path:
    for i, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(8):
            Image.new("RGB", (16, 16), (40 * i + 3 * j + shade, 90, 200 - 20 * i)).save(root / name / f"{j}.png")
    return root


@pytest.mark.slow  # ~15-20 s: keeps the fast suite near 5 minutes
def test_a_sweep_over_changed_data_is_a_new_search_not_mixed_with_the_old_trials(store, tmp_path):
    """Suspected: the sweep's key had no data fingerprint, so continuing after the data folder changed
    mixed trials on different data."""
    data = image_folder(tmp_path / "pets")
    args = sweep_args(write_space(tmp_path, LR), 1, *TINY, "--data", str(data))
    assert invoke(*args).exit_code == 0
    (before,) = runs_of(filter_string="tags.`zar.sweep` = '1'")
    image_folder(data, shade=1)  # every image a shade lighter: other data in the same folder
    after = invoke(*args)
    assert after.exit_code == 0, after.output
    assert "Continuing sweep run" not in after.output
    parents = runs_of(filter_string="tags.`zar.sweep` = '1'")
    assert len(parents) == 2 and all(len(trial_runs(p.info.run_id)) == 1 for p in parents)
    fingerprints = {r.data.tags["zar.data_fingerprint"] for p in parents for r in trial_runs(p.info.run_id)}
    assert len(fingerprints) == 2 and before.info.run_id in {p.info.run_id for p in parents}


def test_a_live_trial_keeps_its_heartbeat_fresh_and_goes_stale_once_it_stops(tmp_path, monkeypatch):
    """Issue 20, item 3: the heartbeat comes from a thread while the trial trains, so epochs longer than the
    grace period never get a live worker taken for dead; once the trial stops beating, Optuna fails it."""
    monkeypatch.setattr(sweep_module, "HEARTBEAT_S", 1)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(storage=storage)
    trial = sweep_module._next_trial(study, 1, storage=storage)
    with sweep_module._heartbeat(storage, study, trial):
        time.sleep(5)  # longer than the grace period
        optuna.storages.fail_stale_trials(study)
        assert study.trials[0].state == TrialState.RUNNING
    time.sleep(5)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.FAIL


def test_a_trial_taken_for_dead_while_it_trained_does_not_count_when_it_ends(store, tmp_path, monkeypatch):
    """A worker suspended longer than the grace period is taken for dead and its trial run again elsewhere;
    when it wakes and finishes, its run must not count (nor be the best) beside the trial that replaced it."""
    train = sweep_module.training.train

    def taken_for_dead_meanwhile(model, cfg, *args, tags, **kwargs):
        result = train(model, cfg, *args, tags=tags, **kwargs)
        if tags["zar.trial"] == "0":  # what another worker's fail_stale_trials did while this one slept
            optuna_study(tmp_path, sweep_parent(), "resnet").tell(0, state=TrialState.FAIL)
        return result

    monkeypatch.setattr(sweep_module.training, "train", taken_for_dead_meanwhile)
    result = invoke(*sweep_args(write_space(tmp_path, LR), 1, *TINY))
    assert result.exit_code == 0, result.output
    assert counts_cell(result.output) == "1 / 0 / 0"
    parent = sweep_parent()
    by_trial = {r.data.tags["zar.trial"]: r for r in trial_runs(parent.info.run_id)}
    assert "taken for dead" in by_trial["0"].data.tags["zar.replaced"]
    assert by_trial["1"].info.status == "FINISHED" and "zar.replaced" not in by_trial["1"].data.tags
    best = next(line for line in result.output.splitlines() if line.startswith("| ResNet-18"))
    assert best.split(" | ")[1] == "1"
