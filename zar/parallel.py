"""A study's children side by side: ``jobs`` worker processes (zar.worker), each training children in turn.

Processes rather than threads: each child owns its torch threads and its MLflow run, exactly as
``zar train --parent-run`` would on another terminal. On two cores, two one-thread processes
trained ResNet-34 at 32 px 1.46x faster than one two-thread process (AMD EPYC,
docs/benchmarks.md; 1.23x on a Xeon, as issue 8 measured). A worker per slot rather than a
process per child: imports and data are paid once per slot. Each child closes its own run; a
worker that dies without closing it (SIGKILL, out of memory) has its run marked FAILED here, so
that no child is ever left RUNNING, and the slot starts a new worker for its next child.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from . import tracking
from .ablation import Child
from .config import to_yaml
from .errors import Interrupted
from .tracking import runs

GRACE_S = 30.0  # how long interrupted children get to close their runs before they are killed
DONE = "\x1ezar-worker-done "  # zar.worker starts the line that ends a child's output so; no output line does
THREADS_FILE = "ZAR_THREADS_FILE"  # a child's share of the cores, rewritten as others end (zar.training reads it)


def child_threads(jobs: int) -> int:
    """The CPU threads each of ``jobs`` children trains on while all of them train."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def child_env(slot: int, jobs: int, threads: int | None = None) -> dict[str, str]:
    """Threads split evenly over the children; one GPU each, round robin, where there are several."""
    env = {k: v for k, v in os.environ.items() if k not in (runs.ENV_RUN_ID, THREADS_FILE)}  # never the parent's
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // jobs)))
    gpus = _gpu_count()
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


class ThreadShare:
    """The cores split over the children training now, so that none idles while a child still trains.

    Five children on two slots run as 2, 2, 1: the last one would train alone on one thread while
    the other core idled. Each child gets ``cpus // min(jobs, running + still queued)`` threads
    when it starts, and a file holding its share, rewritten whenever a child ends; the child reads
    it between epochs and changes torch's thread count. Off when the user set OMP_NUM_THREADS
    (their choice stands) or when children train on GPUs.
    """

    def __init__(self, folder: Path, jobs: int, queued: int):
        self.folder, self.jobs, self.queued = folder, jobs, queued
        self.cpus = os.cpu_count() or 1
        self.live: set[int] = set()
        self.lock = threading.Lock()
        self.enabled = "OMP_NUM_THREADS" not in os.environ and _gpu_count() == 0

    def file(self, i: int) -> Path:
        return self.folder / f"threads{i}"

    def started(self, i: int) -> int:
        """Child ``i`` starts: its share of the cores (written to its file)."""
        with self.lock:
            self.queued -= 1
            self.live.add(i)
            return self._share()[i]

    def ended(self, i: int) -> None:
        with self.lock:
            self.live.discard(i)
            self._share()

    def _share(self) -> dict[int, int]:
        threads = max(1, self.cpus // max(1, min(self.jobs, len(self.live) + self.queued)))
        shares = {i: threads for i in self.live}
        if self.enabled:
            for i, n in shares.items():
                tmp = self.file(i).with_suffix(".tmp")
                tmp.write_text(str(n))
                os.replace(tmp, self.file(i))  # a child never reads half a number
        return shares


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class Children:
    """The live child processes, so that an interrupt reaches every one of them."""

    def __init__(self):
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def start(self, key, cmd, env) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            self.procs[key] = proc
            return proc

    def stop(self) -> None:
        """SIGTERM to each child (it ends its run KILLED), then SIGKILL to any that outlives the grace time.

        SIGTERM, not SIGINT: a study started in the background of a shell runs with SIGINT ignored,
        and so do its children.
        """
        with self.lock:
            self.stopping = True
            live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def train_children(
    children: list[Child],
    parent_run_id: str,
    experiment: str,
    jobs: int,
    echo: Callable[[str], None],
) -> list[str]:
    """Train each child under run ``parent_run_id`` on ``jobs`` workers; returns the failures.

    A child gets its whole config (the study's, its seed and its varied values) as a params file:
    the worker reads nothing else.
    """
    live = Children()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        todo: queue.Queue = queue.Queue()
        for i, child in enumerate(children):
            params = Path(tmp) / f"child{i}.yaml"
            params.write_text(to_yaml(child.cfg))
            todo.put((child, params))
        slots = min(jobs, len(children))
        pool = ThreadPoolExecutor(max_workers=max(1, slots))
        share = ThreadShare(Path(tmp), jobs, len(children))
        try:
            pending = {
                pool.submit(_slot, live, share, slot, jobs, todo, parent_run_id, experiment, echo)
                for slot in range(slots)
            }
            while pending:  # a timed wait, so that Ctrl-C reaches this thread at once
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    failures.extend(future.result())
        except KeyboardInterrupt as e:
            live.stop()
            raise Interrupted(f"interrupted by {str(e) or 'SIGINT'}: its running children were stopped") from None
        except BaseException:
            live.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            runs.close_orphans(parent_run_id, tracking.KILLED if live.stopping else tracking.FAILED)
    return failures


def _slot(live: Children, share: ThreadShare, slot: int, jobs: int, todo, parent_run_id, experiment, echo):
    """One worker's children, in turn, until none is left; a worker that dies is replaced for the next."""
    failures: list[str] = []
    proc = None
    try:
        while True:
            try:
                child, params = todo.get_nowait()
            except queue.Empty:
                return failures
            threads = share.started(slot)
            try:
                if proc is None or proc.poll() is not None:
                    env = child_env(slot, jobs, threads)
                    if share.enabled:
                        env[THREADS_FILE] = str(share.file(slot))
                    proc = live.start(slot, [sys.executable, "-m", "zar", "worker"], env)
                    if proc is None:
                        return failures  # the study is stopping: this child never started
                task = {"model": child.model, "params": str(params), "experiment": experiment, "parent": parent_run_id}
                if child.resume:  # an interrupted attempt's run, with its own settings, under its parent already
                    task = {"resume": child.resume}
                try:
                    proc.stdin.write(json.dumps(task) + "\n")
                    proc.stdin.flush()
                except OSError:
                    pass  # the worker died: _follow reports it
                failure = _follow(live, proc, child, echo)
                if failure:
                    failures.append(failure)
            finally:
                share.ended(slot)
    finally:
        if proc is not None and proc.poll() is None:
            proc.stdin.close()  # no more children: the worker ends
            proc.wait()


def _follow(live: Children, proc: subprocess.Popen, child: Child, echo) -> str | None:
    """The child's output, prefixed with its label, until the worker says it ended; its failure, if it failed."""
    prefix, last_error = f"[{child.label}] ", None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith(DONE):
            error = json.loads(line[len(DONE) :])["error"]
            if error is None or live.stopping:
                return None
            echo(f"{child.label} failed: {error}")
            return f"{child.label}: {error}"
        if line.startswith("Error: "):
            last_error = line[len("Error: ") :]
        echo(prefix + line)
    code = proc.wait()  # the worker ended without finishing the child
    if live.stopping:
        return None
    message = last_error or f"process ended with {_describe_exit(code)}"
    echo(f"{child.label} failed: {message}")
    return f"{child.label}: {message}"


def _describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
