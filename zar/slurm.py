"""A study's children as Slurm jobs, submitted with submitit (``zar study --launcher slurm``).

Each child is the command a ``--jobs`` child runs (``zar train --parent-run ...``), as a job of
its own: the study submits up to ``max_jobs`` at a time, shows their output as it comes, and
builds the table as today once they end. Their runs go to the same tracking server, so the store
must be one every node reaches (an ``http://`` server; a SQLite file only on shared storage).

The parent run keeps each child's job id (tag ``zar.slurm_jobs``): the same command again attaches
to jobs still queued or running rather than submitting them twice. Stopping the study cancels its
jobs unless told to keep them. A job that Slurm ends (time limit, preemption, node failure,
``scancel``) leaves its run FAILED or KILLED, never RUNNING, with Slurm's state in ``zar.slurm_state``;
a job that Slurm requeues runs ``zar train`` again, which resumes its earlier attempt's run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import tracking
from .ablation import Child
from .config import to_yaml
from .errors import Interrupted, UserError
from .parallel import GRACE_S, THREADS_FILE
from .tracking import runs

UNKNOWN_GRACE_S = 60.0  # how long a submitted job may be missing from sacct (accounting lags) before it counts as gone
TAG_JOBS = "zar.slurm_jobs"  # on a study's parent: {child key: Slurm job id}
TAG_STATE = "zar.slurm_state"  # on a child's run whose job did not complete: Slurm's state, e.g. TIMEOUT
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "CONFIGURING",
         "COMPLETING", "STAGE_OUT", "SIGNALING", "PREEMPTED"}  # fmt: skip

# --slurm KEY=VALUE: the sbatch settings a cluster needs, as submitit names them; sbatch.FLAG=VALUE for any other.
SETTINGS: dict[str, tuple[type, str, str]] = {
    "partition": (str, "slurm_partition", "partition to submit to"),
    "time": (int, "timeout_min", "time limit of each job, in minutes [default 60]"),
    "cpus_per_task": (int, "cpus_per_task", "CPU cores of each job; its torch threads [default 1]"),
    "gpus_per_task": (int, "slurm_gpus_per_task", "GPUs of each job"),
    "mem_gb": (float, "mem_gb", "memory of each job, in GB"),
    "account": (str, "slurm_account", "account to charge"),
    "qos": (str, "slurm_qos", "quality of service"),
    "logs": (str, "", "folder for the jobs' scripts and logs, on storage every node reaches [default slurm-logs]"),
}


@dataclass(frozen=True)
class SlurmOptions:
    """How a study's children are submitted: sbatch settings, a cap on jobs in flight, and what Ctrl-C does."""

    settings: dict = field(default_factory=dict)  # SETTINGS' keys, typed
    sbatch: dict = field(default_factory=dict)  # any other sbatch flag, without its dashes
    max_jobs: int | None = None  # jobs queued or running at once; None: every child at once
    keep_jobs: bool = False  # on Ctrl-C, leave the jobs running (the same command reattaches)

    @property
    def logs(self) -> Path:
        return Path(self.settings.get("logs") or "slurm-logs").absolute()

    @property
    def cpus(self) -> int:
        return int(self.settings.get("cpus_per_task") or 1)

    def executor_parameters(self, name: str) -> dict:
        params = {"name": name, "stderr_to_stdout": True, "timeout_min": 60, "cpus_per_task": 1}
        params.update({SETTINGS[k][1]: v for k, v in self.settings.items() if SETTINGS[k][1]})
        if self.sbatch:
            params["slurm_additional_parameters"] = dict(self.sbatch)
        return params


def parse_options(
    pairs: tuple[str, ...], config_file: str | None, max_jobs: int | None, keep_jobs: bool
) -> SlurmOptions:
    """``--slurm KEY=VALUE`` pairs over a YAML file of the same keys (``sbatch:`` a mapping of other flags)."""
    given: dict = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"--slurm-config {config_file}: {getattr(e, 'strerror', None) or e}") from None
        if not isinstance(loaded, dict):
            got = type(loaded).__name__
            raise UserError(f"--slurm-config {config_file}: expected a mapping of settings, got {got}")
        for key, value in loaded.items():
            if key == "sbatch" and isinstance(value, dict):
                given.update({f"sbatch.{k}": v for k, v in value.items()})
            else:
                given[str(key)] = value
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm {pair!r}: expected KEY=VALUE, e.g. --slurm partition=gpu")
        given[key.strip()] = value.strip()
    settings, sbatch = {}, {}
    for key, value in given.items():
        if key.startswith("sbatch.") and len(key) > len("sbatch."):
            sbatch[key[len("sbatch.") :].lstrip("-")] = str(value)
            continue
        if key not in SETTINGS:
            valid = ", ".join(SETTINGS)
            raise UserError(f"--slurm {key}: unknown setting; valid: {valid}, or sbatch.FLAG=VALUE for any sbatch flag")
        kind = SETTINGS[key][0]
        try:
            settings[key] = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"--slurm {key}={value}: expected {kind.__name__} ({SETTINGS[key][2]})") from None
        if kind in (int, float) and settings[key] <= 0:
            raise UserError(f"--slurm {key}={value}: must be positive ({SETTINGS[key][2]})")
    return SlurmOptions(settings, sbatch, max_jobs, keep_jobs)


def describe_settings() -> str:
    return "; ".join(f"{k}: {help_}" for k, (_, _, help_) in SETTINGS.items())


# --- the jobs -----------------------------------------------------------------------------------


def requeued_run(parent_run_id: str) -> str | None:
    """In a Slurm job that was requeued (preemption, node failure, ``scontrol requeue``): the run its
    earlier attempt left under ``parent_run_id``, to resume from its checkpoint; None otherwise.

    An attempt's run without a checkpoint is discarded, as a study discards one: the child starts over."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    if not job or restarts in ("", "0"):
        return None
    for run in tracking.children(parent_run_id):
        if run.data.tags.get(tracking.TAG_SLURM_JOB) != job or run.info.status == tracking.FINISHED:
            continue
        if run.info.status == tracking.RUNNING:  # its process went with the job's last attempt
            tracking.end_run(run.info.run_id, tracking.KILLED, f"its Slurm job {job} was requeued")
        tracking.set_tags(run.info.run_id, {TAG_STATE: "REQUEUED"})
        if tracking.checkpoint_path(run).exists():
            return run.info.run_id
        runs.discard(run.info.run_id)
    return None


def child_key(child: Child) -> str:
    return "/".join(child.key)


def recorded_jobs(parent_run_id: str) -> dict[str, str]:
    """The job id of each child the parent submitted, by child key."""
    raw = tracking.get_run(parent_run_id).data.tags.get(TAG_JOBS)
    try:
        return {str(k): str(v) for k, v in json.loads(raw).items()} if raw else {}
    except (ValueError, AttributeError):
        return {}


def states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job, from sacct (submitit's watcher): e.g. RUNNING, COMPLETED, TIMEOUT."""
    import submitit

    watcher = submitit.SlurmJob.watcher
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher.update()
    return {job_id: watcher.get_state(job_id, mode="cache").split()[0] for job_id in job_ids}


def alive_jobs(parent_run_id: str) -> dict[str, str]:
    """The children whose recorded job is still queued or running: child key -> job id."""
    recorded = recorded_jobs(parent_run_id)
    if not recorded:
        return {}
    found = states(sorted(set(recorded.values())))
    return {key: job for key, job in recorded.items() if found.get(job, "UNKNOWN") in ALIVE}


@dataclass(frozen=True)
class Task:
    """One Slurm job to run: a zar command, and how the parent's ``zar.slurm_jobs`` names it."""

    label: str  # how messages name it: "se seed 2", "sweep worker 1"
    key: str
    command: list[str]
    job: str | None = None  # the job an earlier attempt submitted for it, still queued or running
    by_job: bool = False  # ends well when its job completes (a sweep worker), not when its run finishes


@dataclass
class _Live:
    task: Task
    job: object  # submitit.SlurmJob
    log_offset: int = 0
    last_error: str | None = None
    since: float = field(default_factory=time.monotonic)
    result_mtime: float | None = None

    def new_result(self) -> bool:
        """Whether the job left a result file since last asked (once per attempt: a requeued job runs again)."""
        try:
            mtime = Path(self.job.paths.result_pickle).stat().st_mtime
        except OSError:
            return False
        new, self.result_mtime = mtime != self.result_mtime, mtime
        return new

    def gone(self, state: str) -> bool:
        """Slurm says the job ended; a job sacct does not know yet (just submitted) is not, for a minute."""
        return state not in ALIVE and (state != "UNKNOWN" or time.monotonic() - self.since > UNKNOWN_GRACE_S)


def jobs_folder(options: SlurmOptions, parent_run_id: str) -> Path:
    folder = options.logs / parent_run_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def train_children(
    children: list[Child],
    parent_run_id: str,
    experiment: str,
    options: SlurmOptions,
    echo: Callable[[str], None],
) -> list[str]:
    """Each child a Slurm job (or the job already running it: ``child.job``); returns the failures."""
    folder = jobs_folder(options, parent_run_id)
    tasks = [
        Task(c.label, child_key(c), [] if c.job else _command(c, folder, parent_run_id, experiment, options), c.job)
        for c in children
    ]
    return run_jobs(tasks, parent_run_id, options, echo)


def run_jobs(tasks: list[Task], parent_run_id: str, options: SlurmOptions, echo: Callable[[str], None]) -> list[str]:
    """Each task a Slurm job, up to ``options.max_jobs`` at once, its output echoed as it comes; the failures."""
    import submitit

    folder = jobs_folder(options, parent_run_id)
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    queue = list(tasks)
    live: list[_Live] = []
    failures: list[str] = []
    jobs = recorded_jobs(parent_run_id)
    cap = options.max_jobs or len(tasks) or 1
    checked = time.monotonic()
    try:
        while queue or live:
            while queue and len(live) < cap:
                task = queue.pop(0)
                if task.job:
                    job = submitit.SlurmJob(folder=folder / "%j", job_id=task.job)
                    echo(f"[{task.label}] attached to Slurm job {task.job}, submitted by an earlier attempt")
                else:
                    executor.update_parameters(**options.executor_parameters(f"zar {task.label}"))
                    job = executor.submit(submitit.helpers.CommandFunction(task.command, cwd=os.getcwd()))
                    jobs[task.key] = str(job.job_id)
                    tracking.set_tags(parent_run_id, {TAG_JOBS: json.dumps(jobs, sort_keys=True)})
                    echo(f"[{task.label}] submitted as Slurm job {job.job_id}")
                live.append(_Live(task, job))
            time.sleep(1.0)
            # Ended is what sacct says (every 5 s, or at once when a job left its result file): a job
            # that Slurm requeues leaves one too, then runs again under the same id.
            ended = set()
            if time.monotonic() - checked > 5 or any(e.new_result() for e in live):
                checked = time.monotonic()
                now = states([str(e.job.job_id) for e in live])
                ended = {id(e) for e in live if e.gone(now.get(str(e.job.job_id), "UNKNOWN"))}
            for entry in list(live):
                _echo_new_lines(entry, echo)
                if id(entry) in ended:
                    live.remove(entry)
                    failure = _ended(entry, parent_run_id, echo)
                    if failure:
                        failures.append(failure)
    except KeyboardInterrupt as e:
        why = str(e) or "SIGINT"
        if options.keep_jobs:
            ids = ", ".join(str(x.job.job_id) for x in live)
            raise Interrupted(
                f"interrupted by {why}: its Slurm jobs ({ids or 'none'}) go on; the same command again attaches to them"
            ) from None
        _cancel(live, parent_run_id)
        raise Interrupted(f"interrupted by {why}: its Slurm jobs were cancelled") from None
    return failures


def zar_command(*args: str, threads: int) -> list[str]:
    """``python -m zar ARGS`` as a job runs it, with ``threads`` torch threads.

    Through ``env``: the job inherits the submitting shell's environment (sbatch's default), less
    the parent's run id; nothing of it (a password in a URI) is written into the job's files."""
    env = ["env", "-u", runs.ENV_RUN_ID, "-u", THREADS_FILE, f"OMP_NUM_THREADS={threads}"]
    return [*env, sys.executable, "-m", "zar", *args]


def _command(child: Child, folder: Path, parent_run_id: str, experiment: str, options: SlurmOptions) -> list[str]:
    """The child's ``zar train``, as a --jobs child runs it."""
    if child.resume:
        return zar_command("train", "--no-progress", "--resume", child.resume, threads=options.cpus)
    params = folder / f"{child_key(child).replace('/', '-')}.yaml"
    params.write_text(to_yaml(child.cfg))
    args = ["train", "--no-progress", "--model", child.model, "--params", str(params)]
    return zar_command(*args, "--experiment", experiment, "--parent-run", parent_run_id, threads=options.cpus)


def _echo_new_lines(entry: _Live, echo) -> None:
    path = Path(entry.job.paths.stdout)
    try:
        if path.stat().st_size < entry.log_offset:  # a requeued job starts its log again
            entry.log_offset = 0
        with open(path, errors="replace") as f:
            f.seek(entry.log_offset)
            text = f.read()
    except OSError:
        return
    done = text.rfind("\n") + 1  # whole lines only; the rest waits for its end
    entry.log_offset += len(text[:done].encode())
    for line in text[:done].splitlines():
        if line.startswith("submitit ") or line.startswith("The following command is sent"):
            continue  # submitit's own bookkeeping
        if line.startswith("Error: "):
            entry.last_error = line[len("Error: ") :]
        echo(f"[{entry.task.label}] {line}")


def _ended(entry: _Live, parent_run_id: str, echo) -> str | None:
    """A job that ended: None if it did its part, else the failure; its runs are never left RUNNING."""
    job_id, task = str(entry.job.job_id), entry.task
    found = _runs_of(parent_run_id, job_id)
    if not task.by_job and found and all(r.info.status == tracking.FINISHED for r in found):
        return None
    state = _final_state(job_id)
    if task.by_job and state == "COMPLETED":
        return None
    for run in found:
        if run.info.status != tracking.FINISHED:
            tracking.set_tags(run.info.run_id, {TAG_STATE: state})
        if run.info.status == tracking.RUNNING:
            tracking.end_run(run.info.run_id, tracking.FAILED, f"its Slurm job {job_id} ended {state}")
    message = entry.last_error or f"Slurm job {job_id} ended {state}"
    echo(f"{task.label} failed: {message}")
    return f"{task.label}: {message}"


def _final_state(job_id: str, timeout: float = 30.0) -> str:
    """Slurm's state once the job has left the queue (COMPLETING turns into its end state)."""
    deadline = time.monotonic() + timeout
    state = states([job_id]).get(job_id, "UNKNOWN")
    while state in ALIVE and time.monotonic() < deadline:
        time.sleep(1.0)
        state = states([job_id]).get(job_id, "UNKNOWN")
    return state


def _runs_of(parent_run_id: str, job_id: str) -> list:
    return [r for r in tracking.children(parent_run_id) if r.data.tags.get(tracking.TAG_SLURM_JOB) == job_id]


def _cancel(live: list[_Live], parent_run_id: str) -> None:
    """scancel each job (Slurm sends SIGTERM: each child ends its run KILLED), then wait for them to end."""
    for entry in live:
        entry.job.cancel(check=False)
    deadline = time.monotonic() + GRACE_S
    ids = [str(entry.job.job_id) for entry in live]
    while ids and time.monotonic() < deadline:
        ids = [j for j, s in states(ids).items() if s in ALIVE]
        time.sleep(0.5)
    for entry in live:
        for run in _runs_of(parent_run_id, str(entry.job.job_id)):
            tracking.set_tags(run.info.run_id, {TAG_STATE: "CANCELLED"})
    runs.close_orphans(parent_run_id, tracking.KILLED)
