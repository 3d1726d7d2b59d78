"""A run's life, start to end: the one place a run is started, adopted, tagged and closed.

``start`` opens a new run, a nested one (a study's child, in this process or another) or adopts
the run ``mlflow run`` made (``MLFLOW_RUN_ID``: ``env_run_id``, ``in_env_run``); ``reopen``
continues a stopped one; ``find_or_start_parent`` finds a study's or sweep's parent by its key,
or starts it. ``closing`` then guarantees the end: FINISHED on success, FAILED with the reason as the ``zar.error`` tag,
KILLED on SIGINT, SIGTERM or SIGHUP (or when a sweep's pruner stops it), so that no run is ever
left RUNNING by a process that lived to close it. Runs whose process died without closing them are found here too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from typing import NamedTuple

import psutil

from ..errors import Interrupted, Pruned, TrainingFailed, describe
from . import client, views
from .client import FAILED, FINISHED, KILLED, RUNNING
from .store import ENV_RUN_ID

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def env_run_id() -> str | None:
    """The run ``mlflow run`` made for this process and zar has not adopted yet, if any."""
    return os.environ.get(ENV_RUN_ID) or None


def start(
    experiment: str,
    run_name: str,
    parent_run_id: str | None = None,
    system_metrics: bool = False,
    tags: dict[str, str] | None = None,
):
    """A new run named ``run_name``: nested when a study run is active in this process, a child of
    ``parent_run_id`` (held by another process) when given, else the run ``mlflow run`` made, else
    a new run in ``experiment``. Children live in their parent's experiment. ``tags`` come with
    the run itself, as the process tags do."""
    active = client.active_run()
    nested = active is not None or parent_run_id is not None
    adopted = None if nested else env_run_id()
    if parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    elif nested:
        experiment_id = active.info.experiment_id
    elif adopted:  # 'mlflow run' made the run, in its experiment
        experiment_id = None
    else:
        experiment_id = client.get_experiment_id(experiment)
    # The process tags come with the run itself: a run whose process dies before ``closing``
    # takes charge of it is still found by ``zar runs --stale``.
    run = client.start_run(
        experiment_id,
        run_name,
        nested,
        run_id=adopted,
        parent_run_id=parent_run_id,
        tags={**(tags or {}), **process_tags()},
        system_metrics=system_metrics,
    )
    # MLflow clears the variable only when it reads it itself; left set, a nested child would
    # reopen the adopted run, and a late error would be blamed on an unadopted run.
    if adopted:
        del os.environ[ENV_RUN_ID]
    # The runs-table link opens with zar's columns (a study's parent saves them for its children).
    if not nested:
        views.share_study_view(run.info.experiment_id)
    return run


@contextlib.contextmanager
def in_env_run(run_name: str, tags: dict[str, str]) -> Iterator[str | None]:
    """Under ``mlflow run -e compare`` (report, bench), the run MLflow made, adopted, tagged with
    ``tags`` and closed around the block, which keeps the command's output in it; the block gets
    None when there is no such run."""
    if not env_run_id():
        yield None
        return
    run = start(client.DEFAULT_EXPERIMENT, run_name)
    with closing(run.info.run_id, tags):
        yield run.info.run_id


class ParentRun(NamedTuple):
    run: object  # the MLflow run
    holder: str | None  # the live process that holds it, when not this one ("process 12 on host")
    was: str | None  # the status it had when this process reopened it; None for a new run


def find_or_start_parent(
    experiment: str, run_name: str, key_tag: str, key: str, tags: dict[str, str], reuse_finished: bool = True
) -> ParentRun:
    """The parent run of a study or sweep whose settings hash to ``key``, and who holds it.

    This process holds it when it is new (under ``mlflow run``, the run it made) or was stopped
    (reopened here); a live process holds it otherwise, here or on another machine, and the caller
    may join it. Two processes that start the same parent at once both take the earlier run; the
    later one's is discarded. ``tags`` come with a new run, from its creation. ``reuse_finished=False``:
    a FINISHED parent is done with (a study run again is a new study), only an unfinished one is continued.
    """
    if env_run_id():
        return ParentRun(start(experiment, run_name), None, None)
    found = _parents(experiment, key_tag, key, reuse_finished)
    if not found:
        run = start(experiment, run_name, tags={key_tag: key, **tags})
        first = _parents(experiment, key_tag, key, reuse_finished)[0]
        if first.info.run_id == run.info.run_id:
            return ParentRun(run, None, None)
        discard(run.info.run_id)
        found = [first]
    run = found[0]
    held_by = run.data.tags
    if run.info.status == RUNNING and process_alive(held_by) is not False:
        return ParentRun(run, holder(held_by), None)
    return ParentRun(reopen(run.info.run_id), None, run.info.status)


def _parents(experiment: str, key_tag: str, key: str, reuse_finished: bool = True) -> list:
    """The top-level runs tagged ``key_tag = key`` (one, but for a moment when two start at once), earliest first."""
    experiment_id = client.get_experiment_id(experiment)
    found = [
        r
        for r in client.search_runs(experiment_id, f"tags.`{key_tag}` = '{key}'")
        if client.TAG_PARENT not in r.data.tags and (reuse_finished or r.info.status != FINISHED)
    ]
    return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def discard(run_id: str) -> None:
    """A run this process has just made and must not keep (another process's run came first): ended and deleted."""
    client.end_run(run_id, KILLED)
    client.delete_run(run_id)


def reopen(run_id: str, system_metrics: bool = False):
    """The stopped run ``run_id``, open again (RUNNING, with this process's tags) to continue it."""
    nested = client.active_run() is not None
    return client.start_run(None, "", nested=nested, run_id=run_id, tags=process_tags(), system_metrics=system_metrics)


@contextlib.contextmanager
def closing(run_id: str, tags: dict[str, str] | None = None, continue_hint: str | None = None) -> Iterator[None]:
    """Tag the run with ``tags`` and this process, then end it FINISHED, FAILED or KILLED.

    ``continue_hint``: how this run is continued once interrupted, as the message says it
    (a training run's is ``zar train --resume RUN_ID``; a study's or a sweep's is its own command).

    SIGTERM and SIGHUP become KeyboardInterrupt, as Ctrl-C is, while the run is open. Once the
    run is ending, those signals are ignored: a second one must not cut the cleanup short and
    leave the run RUNNING.
    """
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        client.set_tags(run_id, {**(tags or {}), **process_tags()})
        yield
    except KeyboardInterrupt as e:
        _ignore_stop_signals()
        client.end_run(run_id, KILLED, f"interrupted by {str(e) or 'SIGINT'}")
        hint = continue_hint or f"continue it with 'zar train --resume {run_id}'"
        raise Interrupted(f"interrupted: run {run_id} marked KILLED; {hint}") from None
    except Interrupted as e:  # a child was interrupted: its parent (a study, a sweep) stops too
        _ignore_stop_signals()
        client.end_run(run_id, KILLED, str(e))
        raise Interrupted(
            f"{e}; run {run_id} marked KILLED" + (f"; {continue_hint}" if continue_hint else "")
        ) from None
    except Pruned as e:  # a sweep's pruner stopped it: not a failure, and not to be resumed
        _ignore_stop_signals()
        client.set_tags(run_id, {client.TAG_PRUNED: f"epoch {e.epoch}"})
        client.end_run(run_id, KILLED, str(e))
        raise
    except TrainingFailed as e:
        _ignore_stop_signals()
        if e.tags:
            client.set_tags(run_id, e.tags)
        client.end_run(run_id, FAILED, e.reason)
        raise
    except BaseException as e:
        # A signal now (torchrun stops every rank once one failed) must not cut the closing short:
        # MLflow's exit handler would then end the run FINISHED.
        _ignore_stop_signals()
        client.end_run(run_id, FAILED, describe(e))
        raise
    else:
        _ignore_stop_signals()
        client.end_run(run_id, FINISHED)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _ignore_stop_signals() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def end(run_id: str, status: str, reason: str | None = None) -> None:
    """Close a run from outside its life (a dead process's run): ``reason`` becomes its ``zar.error``."""
    client.end_run(run_id, status, reason)


def fail_env_run(reason: str) -> None:
    """Under ``mlflow run`` the run exists before zar starts: an error before zar adopted it still closes it."""
    run_id = env_run_id()
    if run_id:
        try:
            client.end_run(run_id, FAILED, reason)
        except Exception:  # the original error is what the user needs to see
            pass


# --- which process holds a run ------------------------------------------------------------------


def process_tags() -> dict[str, str]:
    """Who is running this run: lets ``zar runs --stale`` tell a dead process from a live one."""
    proc = psutil.Process()
    tags = {
        client.TAG_PID: str(proc.pid),
        client.TAG_HOST: socket.gethostname(),
        client.TAG_PROC_START: f"{proc.create_time():.2f}",
    }
    if os.environ.get("SLURM_JOB_ID"):  # zar study --launcher slurm finds its children's runs by it
        tags[client.TAG_SLURM_JOB] = os.environ["SLURM_JOB_ID"]
    return tags


def holder(tags: dict[str, str]) -> str:
    """The process a run's tags say holds it, as messages name it: 'process 12 on host'."""
    return f"process {tags.get(client.TAG_PID, '?')} on {tags.get(client.TAG_HOST, '?')}"


def process_alive(tags: dict[str, str]) -> bool | None:
    """True/False for a run started on this host; None when it was started elsewhere."""
    if tags.get(client.TAG_HOST) != socket.gethostname() or client.TAG_PID not in tags:
        return None
    try:
        proc = psutil.Process(int(tags[client.TAG_PID]))
        same = f"{proc.create_time():.2f}" == tags.get(client.TAG_PROC_START)
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def is_stale(run) -> bool:
    """RUNNING, but its process on this machine is gone."""
    return run.info.status == RUNNING and process_alive(run.data.tags) is False


def close_orphans(parent_run_id: str, status: str, elsewhere_alive: bool = False) -> None:
    """A child killed outright, or stopped before it took charge of its run, leaves that run RUNNING: close it.

    ``elsewhere_alive``: a child started on another machine is taken to be alive (a sweep's workers
    there), not closed."""
    for run in client.children(parent_run_id, status=RUNNING):
        alive = process_alive(run.data.tags)
        if alive is None and elsewhere_alive and client.TAG_HOST in run.data.tags:
            continue
        if alive is not True:
            end(run.info.run_id, status, "its process ended without closing the run")
