"""A study continues after any interruption (issue 20, item 2): the same command again, or
``zar study --resume PARENT``, keeps what finished, resumes what stopped, starts what never ran, and
ends with one parent, one run per model and seed, and the table of an uninterrupted study.

The chaos test kills children with SIGKILL at random moments (seeded: ``ZAR_CHAOS_SEED`` replays a
failure) and runs the same command after each kill, until the study completes.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest
from mlflow.tracking import MlflowClient

from zar import recording
from zar.config import TrainConfig
from zar.study import StudySpec

from helpers import TINY, children, epochs, invoke, runs_of

MODELS = ["plain", "resnet"]


def parent_runs(experiment="zar"):
    return [r for r in runs_of(experiment) if "zar.study" in r.data.tags]


def table_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("| ")]


def assert_complete(parent_id: str, models: list[str], seeds: list[int], n_epochs: int, experiment="zar"):
    """One FINISHED parent; exactly one FINISHED run per model and seed, each epoch logged once."""
    client = MlflowClient()
    assert client.get_run(parent_id).info.status == "FINISHED"
    kids = children(parent_id, experiment)
    keys = Counter((k.data.tags["zar.model"], int(k.data.params["seed"])) for k in kids)
    assert keys == Counter({(m, s): 1 for m in models for s in seeds}), keys
    for kid in kids:
        assert kid.info.status == "FINISHED", (kid.data.tags["zar.model"], kid.info.status, kid.data.tags)
        steps = sorted(m.step for m in client.get_metric_history(kid.info.run_id, "val_acc"))
        assert steps == list(range(1, n_epochs + 1)), steps


@pytest.mark.slow  # ~15-20 s: keeps the fast suite near 5 minutes
def test_the_same_command_again_resumes_the_failed_child_and_keeps_the_finished_one(store, monkeypatch):
    """plain's results could not be saved (its epochs trained, its checkpoint kept): the study failed.
    The same command resumes plain from its checkpoint, trains nothing twice, keeps resnet's run."""
    log_results = recording.log_results

    def failing_for_plain(prepared, *rest):
        if prepared.model_name == "plain":
            raise OSError(28, "No space left on device")
        return log_results(prepared, *rest)

    args = ["study", "--models", ",".join(MODELS), "--seeds", "1", *epochs(2)]
    with monkeypatch.context() as mp:
        mp.setattr(recording, "log_results", failing_for_plain)
        first = invoke(*args)
    assert first.exit_code == 1 and "zar study --resume" in first.output
    (parent,) = parent_runs()
    resnet_before = {k.data.tags["zar.model"]: k for k in children(parent.info.run_id)}["resnet"].info.run_id

    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert f"Continuing study run {parent.info.run_id}: 1 of 2 runs finished before, 1 to resume" in again.output
    assert "epoch   1/2" not in again.output  # plain resumed after its last epoch: nothing retrained
    assert [p.info.run_id for p in parent_runs()] == [parent.info.run_id]
    assert_complete(parent.info.run_id, MODELS, [1], 2)
    kids = {k.data.tags["zar.model"]: k for k in children(parent.info.run_id)}
    assert kids["resnet"].info.run_id == resnet_before  # kept, not trained again

    done = invoke(*args)  # a finished study run again is a new study
    assert done.exit_code == 0 and "Continuing" not in done.output
    assert len(parent_runs()) == 2
    refused = invoke("study", "--resume", parent.info.run_id)
    assert refused.exit_code == 2 and "already FINISHED" in refused.stderr


def test_resume_takes_the_studys_own_settings_and_refuses_others(store):
    result = invoke("study", "--resume", "abc123", "--seeds", "1,2", "--lr", "0.1")
    assert result.exit_code == 2 and "drop --seeds, --lr" in result.stderr
    result = invoke("train", *TINY)
    assert result.exit_code == 0
    (run,) = runs_of()
    refused = invoke("study", "--resume", run.info.run_id)
    assert refused.exit_code == 2 and "is not a zar study that can continue" in refused.stderr


def test_a_study_whose_data_or_code_changed_is_not_continued_and_says_what_changed():
    spec = StudySpec(MODELS, [1], TrainConfig(), {}, None, ["aaa"], {"zar.version": "0.1.0"})
    assert spec.changed(spec) is None
    moved = StudySpec(MODELS, [1], TrainConfig(), {}, None, ["bbb"], {"zar.version": "0.1.0"})
    assert moved.changed(spec) == "its data fingerprint was ['aaa'], now ['bbb']"
    assert moved.key != spec.key  # so the same command on changed data is a new study, not a mixed one
    newer = StudySpec(MODELS, [1], TrainConfig(), {}, None, ["aaa"], {"zar.version": "0.2.0"})
    assert "its code was {'zar.version': '0.1.0'}" in newer.changed(spec)
    faster = StudySpec(MODELS, [1], TrainConfig(workers=2, device="cpu"), {}, None, ["aaa"], spec.code)
    assert faster.key == spec.key  # where and how fast it trains is no part of what it is


# --- chaos ---------------------------------------------------------------------------------------------

CHAOS_SEEDS = [1, 2, 3]
CHAOS_EPOCHS = 3
KILLS = 4


def study_command(experiment: str) -> list[str]:
    return [
        sys.executable, "-m", "zar", "study", "--models", ",".join(MODELS), "--seeds", ",".join(map(str, CHAOS_SEEDS)),
        "--jobs", "2", *epochs(CHAOS_EPOCHS), "--experiment", experiment,
    ]  # fmt: skip


def kill_a_child_at_random(proc: subprocess.Popen, rng: random.Random) -> bool:
    """Once the study trains, wait a random time, then SIGKILL one of its training processes; False when
    the study ended first. Random in time and in which child, replayed by the seed."""
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < 300:
        if _training_children(proc):
            break
        time.sleep(0.2)
    deadline = time.monotonic() + rng.uniform(0.0, 10.0)
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    kids = _training_children(proc) if proc.poll() is None else []
    if not kids:
        return False
    rng.choice(kids).kill()
    return True


def _training_children(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(proc.pid).children() if "worker" in c.cmdline()]  # zar worker: a slot
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_a_study_whose_children_are_killed_at_random_completes_with_the_uninterrupted_table(store):
    seed = int(os.environ.get("ZAR_CHAOS_SEED", "20"))
    rng = random.Random(seed)
    reference = subprocess.run(study_command("calm"), capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stdout + reference.stderr

    kills, attempts, output = 0, 0, ""
    while True:
        attempts += 1
        assert attempts <= KILLS + 3, f"chaos seed {seed}: the study did not complete\n{output}"
        proc = subprocess.Popen(study_command("chaos"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if kills < KILLS and kill_a_child_at_random(proc, rng):
            kills += 1
        output, _ = proc.communicate(timeout=900)
        if proc.returncode == 0:
            break
        assert proc.returncode == 1 and "runs failed" in output, f"chaos seed {seed}:\n{output}"
    assert kills >= 2, f"chaos seed {seed}: only {kills} kills landed"

    (parent,) = parent_runs("chaos")
    assert_complete(parent.info.run_id, MODELS, CHAOS_SEEDS, CHAOS_EPOCHS, "chaos")
    # The same numbers as the study nobody interrupted: every resume continued exactly.
    assert table_lines(output) == table_lines(reference.stdout), f"chaos seed {seed}"
    assert re.search(r"Continuing study run \w+", output) or attempts == 1
    assert not [c for c in psutil.Process().children(recursive=True) if "zar" in " ".join(c.cmdline())]
    print(f"chaos seed {seed}: {kills} children killed, completed on attempt {attempts}")
