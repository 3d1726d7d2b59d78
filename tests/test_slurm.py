"""zar study --launcher slurm against a real single-node Slurm (tests/slurmcluster.py), not a mock.

The cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd on loopback) starts once for the module.
Each study runs as a process of its own, as a user starts it; its children are Slurm jobs.
"""

import re
import signal
import subprocess
import sys

import pytest
import slurmcluster
from mlflow.tracking import MlflowClient

from helpers import all_runs, children, default_sigint, epochs, invoke, runs_of, zar_subprocess

STUDY = ["study", "--models", "resnet,se", "--seeds", "1,2"]


@pytest.fixture(scope="module")
def slurm():
    with slurmcluster.cluster() as cluster:
        yield cluster


@pytest.fixture
def on_slurm(slurm, store, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    return slurm


def table(output: str) -> list[str]:
    """The Markdown table's rows, as printed."""
    return [line for line in output.splitlines() if line.startswith("| ")]


def job_ids(output: str) -> dict[str, str]:
    return dict(re.findall(r"^\[(.+?)\] submitted as Slurm job (\d+)$", output, flags=re.M))


def parent_run():
    (parent,) = [r for r in runs_of() if r.data.tags.get("zar.study") == "1"]
    return parent


def queued(slurm) -> str:
    return slurm.run("squeue", "-h", "-o", "%i %T").strip()


# --- bad input, before anything is submitted -------------------------------------------------------


def test_slurm_settings_are_checked_before_anything_runs(store, zar):
    unknown = zar(*STUDY, *epochs(1), "--launcher", "slurm", "--slurm", "partiton=gpu")
    assert unknown.exit_code == 2 and "--slurm partiton: unknown setting; valid: partition, time" in unknown.output
    assert "Traceback" not in unknown.output
    bad = zar(*STUDY, *epochs(1), "--launcher", "slurm", "--slurm", "time=an hour")
    assert bad.exit_code == 2 and "--slurm time=an hour: expected int (time limit of each job, in minutes" in bad.output
    stray = zar(*STUDY, *epochs(1), "--slurm", "partition=gpu")
    assert stray.exit_code == 2 and "--slurm go with --launcher slurm" in stray.output
    assert all_runs() == []  # nothing started


def test_slurm_options_read_a_yaml_file_and_the_command_line_wins(tmp_path):
    from zar.slurm import parse_options

    path = tmp_path / "slurm.yaml"
    path.write_text("partition: cpu\ntime: 30\ncpus_per_task: 2\nsbatch:\n  qos: low\n  --constraint: avx512\n")
    options = parse_options(("time=90",), str(path), 4, False)
    params = options.executor_parameters("zar resnet seed 1")
    assert params["slurm_partition"] == "cpu" and params["timeout_min"] == 90 and params["cpus_per_task"] == 2
    assert params["slurm_additional_parameters"] == {"qos": "low", "constraint": "avx512"}
    assert options.max_jobs == 4 and options.cpus == 2


# --- a real Slurm -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_study_through_slurm_gives_the_local_launchers_table(on_slurm, tmp_path):
    through = zar_subprocess(*STUDY, *epochs(2), "--launcher", "slurm", "--slurm", f"logs={tmp_path / 'logs'}")
    assert through.returncode == 0, through.stdout + through.stderr
    ids = job_ids(through.stdout)
    assert sorted(ids) == ["resnet seed 1", "resnet seed 2", "se seed 1", "se seed 2"]
    accounted = on_slurm.run("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids.values()))
    assert sorted(accounted.split()) == sorted(f"{i}|COMPLETED" for i in ids.values())
    parent = parent_run()
    kids = children(parent.info.run_id)
    assert sorted(r.data.tags["zar.slurm_job"] for r in kids) == sorted(ids.values())
    assert all(r.info.status == "FINISHED" for r in kids)

    local = invoke(*STUDY, *epochs(2), "--jobs", "2", "--experiment", "local")
    assert local.exit_code == 0, local.output
    assert table(through.stdout) and table(through.stdout) == table(local.output)


def start_study(*extra):
    return subprocess.Popen(
        [sys.executable, "-m", "zar", *STUDY, *epochs(30), "--launcher", "slurm", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,
    )


def read_until(proc, pattern: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return
    raise AssertionError(f"the study ended before {pattern!r}:\n{''.join(lines)}")


@pytest.mark.slow
def test_scancel_of_one_child_ends_its_run_and_the_rerun_completes_it(on_slurm):
    proc, lines = start_study(), []
    read_until(proc, r"^\[resnet seed 1\] epoch   2/30", lines)
    victim = job_ids("".join(lines))["resnet seed 1"]
    on_slurm.run("scancel", victim)
    out, _ = proc.communicate(timeout=300)
    output = "".join(lines) + out
    assert proc.returncode == 1, output
    assert "resnet seed 1 failed" in output and "1 of 4 runs failed" in output
    (cancelled,) = [r for r in children(parent_run().info.run_id) if r.data.tags.get("zar.slurm_job") == victim]
    assert cancelled.info.status in ("KILLED", "FAILED")
    assert cancelled.data.tags["zar.slurm_state"] == "CANCELLED"

    again = zar_subprocess(*STUDY, *epochs(30), "--launcher", "slurm")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 of 4 runs finished before, 1 to resume from their checkpoints" in again.stdout
    kids = children(parent_run().info.run_id)
    assert len(kids) == 4 and all(r.info.status == "FINISHED" for r in kids)
    assert MlflowClient().get_run(cancelled.info.run_id).info.status == "FINISHED"  # the same run, resumed


@pytest.mark.slow
def test_ctrl_c_of_the_study_cancels_its_jobs(on_slurm):
    proc, lines = start_study(), []
    read_until(proc, r"epoch   1/30", lines)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    output = "".join(lines) + out
    assert proc.returncode == 130, output
    assert "its Slurm jobs were cancelled" in output and "Traceback" not in output
    assert queued(on_slurm) == ""
    ids = job_ids(output).values()
    states = on_slurm.run("sacct", "-n", "-X", "-P", "-o", "State", "-j", ",".join(ids)).splitlines()
    assert states and all(s.startswith("CANCELLED") for s in states), states
    parent = parent_run()
    assert parent.info.status == "KILLED"
    assert all(r.info.status in ("KILLED", "FAILED") for r in children(parent.info.run_id))


@pytest.mark.slow
def test_keep_jobs_leaves_them_running_and_the_same_command_attaches(on_slurm):
    proc, lines = start_study("--keep-jobs", "--jobs", "2"), []
    read_until(proc, r"epoch   1/30", lines)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    output = "".join(lines) + out
    assert proc.returncode == 130 and "go on; the same command again attaches to them" in output, output
    first = job_ids(output)
    assert len(first) == 2  # --jobs 2: two in flight at once
    assert queued(on_slurm) != ""

    again = zar_subprocess(*STUDY, *epochs(30), "--launcher", "slurm", "--jobs", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 still in Slurm's queue or running" in again.stdout
    for label, job in first.items():
        assert f"[{label}] attached to Slurm job {job}" in again.stdout
    assert not set(job_ids(again.stdout)) & set(first)  # not submitted twice
    kids = children(parent_run().info.run_id)
    assert len(kids) == 4 and all(r.info.status == "FINISHED" for r in kids)


@pytest.mark.slow
def test_a_sweep_through_slurm_runs_its_trials_in_worker_jobs_and_its_seeds_as_jobs(on_slurm, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {log_uniform: [1.0e-4, 1.0e-2]}\n")
    args = ["sweep", "--models", "resnet", "--space", str(space), "--trials", "3", "--seeds", "1,2", *epochs(2)]
    swept = zar_subprocess(*args, "--launcher", "slurm", "--jobs", "2")
    output = swept.stdout + swept.stderr
    assert swept.returncode == 0, output
    assert output.count("Joining sweep run") == 2  # two worker jobs joined the sweep this process holds
    ids = job_ids(output)
    assert {"sweep worker 1", "sweep worker 2"} <= set(ids), ids
    assert len([k for k in ids if re.fullmatch(r"resnet best \(trial \d+\) seed [12]", k)]) == 2, ids
    (parent,) = [r for r in runs_of() if r.data.tags.get("zar.sweep") == "1"]
    kids = children(parent.info.run_id)
    trials = [r for r in kids if "zar.trial" in r.data.tags]
    reruns = [r for r in kids if "zar.rerun_of" in r.data.tags]
    assert len(trials) == 3 and len(reruns) == 2
    assert all(r.data.tags.get("zar.slurm_job") in ids.values() for r in kids)  # every run trained in a job
    assert all(r.info.status == "FINISHED" for r in reruns)
    assert sorted(r.data.params["seed"] for r in reruns) == ["1", "2"]
    assert parent.info.status == "FINISHED"
    assert len([line for line in table(swept.stdout) if line.startswith("| ResNet-18")]) == 2  # best trial; seeds


@pytest.mark.slow
def test_a_requeued_job_resumes_its_run_from_the_checkpoint(on_slurm):
    """Preemption or a node failure requeues a job: Slurm stops it (SIGTERM: the run ends KILLED with its
    checkpoint) and runs it again under the same id, where `zar train` resumes that run."""
    proc, lines = start_study(), []
    read_until(proc, r"^\[resnet seed 1\] epoch   3/30", lines)
    victim = job_ids("".join(lines))["resnet seed 1"]
    on_slurm.run("scontrol", "requeue", victim)
    on_slurm.run("scontrol", "update", f"JobId={victim}", "StartTime=now")  # Slurm holds a requeued job 2 min
    out, _ = proc.communicate(timeout=300)
    output = "".join(lines) + out
    assert proc.returncode == 0, output
    assert "[resnet seed 1] ResNet-18: resuming run" in output
    (run,) = [r for r in children(parent_run().info.run_id) if r.data.tags.get("zar.slurm_job") == victim]
    assert run.info.status == "FINISHED" and run.data.tags["zar.slurm_state"] == "REQUEUED"
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(steps) == list(range(1, 31))  # every epoch once
    assert len(children(parent_run().info.run_id)) == 4
