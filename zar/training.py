"""One training run, start to end: prepare, start (or reopen) its run, train, record.

``train`` starts a run (or adopts the one ``mlflow run`` created), ``resume`` continues one
from its last checkpoint. Both prepare the same way (``prepare``: architecture, device, data,
into one immutable ``Prepared``), record through one ``Recorder`` (zar.recording) and train
the same way (``_fit``); zar.tracking.runs ends the run FINISHED, FAILED or KILLED, never
RUNNING, and a mistake found before training creates no run at all.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Subset

from . import tracking
from .checks import known_model
from .config import TrainConfig, from_dict
from .errors import Pruned, TrainingFailed, UserError, clip, describe
from .learn import distributed
from .learn.data import DataBundle, load_data
from .learn.engine import Diverged, EpochResult, Trainer, resolve_device, resolve_precision
from .learn.models import build_model
from .parallel import THREADS_FILE
from .recording import Prepared, Recorder
from .tracking import FINISHED, RUNNING, provenance, runs

# The training images evaluated like the validation set after each epoch: as many as it has, at most this.
TRAIN_EVAL_MAX = 5000


def print_line(line: str) -> None:
    print(line, flush=True)


@dataclass
class TrainingResult:
    run_id: str
    experiment_id: str
    model: str
    display_name: str
    seed: int
    history: list[EpochResult]
    summary: dict[str, float]


def resolve(cfg: TrainConfig, threads: int | None = None) -> tuple[TrainConfig, torch.device]:
    """The device to train on, and ``cfg`` with the precision that will run in place of 'auto'
    (measured at ``threads`` CPU threads, those the run will train on; default torch's now)."""
    try:
        device = distributed.rank_device(resolve_device(cfg.device))
    except ValueError as e:
        raise UserError(str(e)) from None
    # Runs record the precision that ran, never 'auto': they are compared by it.
    if cfg.precision == "auto" and distributed.active():
        # Every rank must train in one precision (DDP checks that parameters match in layout):
        # rank 0 measures and decides, the others take its choice.
        mine = (
            resolve_precision("auto", device, cfg.image_size, cfg.batch_size, threads)
            if distributed.is_main()
            else None
        )
        precision = distributed.broadcast(mine)
    else:
        precision = resolve_precision(cfg.precision, device, cfg.image_size, cfg.batch_size, threads)
    return cfg.replace(precision=precision), device


def prepare(model_name: str, cfg: TrainConfig, data: DataBundle | None = None) -> Prepared:
    """Architecture, device, precision and data: everything a mistake can be found in before a run exists."""
    variant = known_model(model_name)
    cfg, device = resolve(cfg)
    data = data or load_data(cfg)
    return Prepared(model_name, variant.display_name(cfg.depth, cfg.se_reduction), cfg, device, data)


def build_trainer(prepared: Prepared, progress: bool) -> Trainer:
    """The model (seeded: the same weights for the same seed) and the loop that trains it."""
    cfg, data = prepared.cfg, prepared.data
    torch.manual_seed(cfg.seed)
    model = build_model(prepared.model_name, cfg.depth, len(data.classes), cfg.se_reduction)
    size = min(len(data.val), TRAIN_EVAL_MAX)
    train_eval = Subset(data.train, train_eval_indices(data.train_labels, size, cfg.split_seed))
    return Trainer(
        model,
        data.train,
        data.val,
        cfg,
        prepared.device,
        progress,
        train_eval_set=train_eval,
        num_classes=len(data.classes),
    )


def train_eval_indices(labels: list[int], size: int, seed: int) -> list[int]:
    """A fixed, stratified choice of ``size`` training images: the same for every architecture and seed."""
    n = len(labels)
    if size >= n:
        return list(range(n))
    try:
        chosen, _ = train_test_split(np.arange(n), train_size=size, stratify=labels, random_state=seed)
    except ValueError:  # fewer images than classes: stratifying is impossible, a plain sample is not
        chosen = np.random.default_rng(seed).choice(n, size, replace=False)
    return sorted(int(i) for i in chosen)


def train(
    model_name: str,
    cfg: TrainConfig,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    progress: bool = True,
    echo: Callable[[str], None] = print_line,
    data: DataBundle | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    continue_hint: str | None = None,
) -> TrainingResult:
    """Train ``model_name`` under ``cfg`` in a new MLflow run (nested if a study run is active).

    Mistakes (unknown model, bad data) raise UserError before any run exists. ``data``, when
    given, must be what ``load_data(cfg)`` returns (a study loads it once for all its runs).
    ``parent_run_id`` makes the run a child of that study run, which another process holds.
    ``tags`` are set on the run besides zar's own (a sweep's trial number); ``on_epoch`` is called
    with each epoch's result once it is logged, and may stop the run by raising ``Pruned``.
    ``continue_hint``: how an interrupted run is continued, when not by ``zar train --resume`` (a
    study's child: by its study).
    """
    distributed.init()
    if not distributed.is_main():
        return _follow(lambda: (prepare(model_name, cfg, data), None))
    prepared = prepare(model_name, cfg, data)
    cfg, data = prepared.cfg, prepared.data
    tracking.check_reachable()
    run_name = (tags or {}).get(tracking.TAG_RUN_NAME, f"{model_name}-{cfg.depth}-seed{cfg.seed}")
    run = runs.start(experiment, run_name, parent_run_id, system_metrics=True)
    recorder = Recorder.of(run)
    with runs.closing(
        recorder.run_id,
        {
            tracking.TAG_RUN_NAME: run_name,
            tracking.TAG_MODEL: model_name,
            tracking.TAG_DISPLAY: prepared.display,
            tracking.TAG_FINGERPRINT: data.fingerprint,
            tracking.TAG_DATA_FINGERPRINT: data.data_fingerprint,
            tracking.TAG_DEVICE: str(prepared.device),
            tracking.TAG_CHECKPOINT: str(recorder.ckpt),
            **provenance.code_tags(),
            **(tags or {}),
        },
        continue_hint,
    ):
        recorder.setup(prepared)
        with _rank_failures(recorder.run_id):
            trainer = build_trainer(prepared, progress)
            recorder.model_size(trainer.model)
            echo(
                f"{prepared.display}: run {recorder.run_id} in experiment {recorder.experiment_id}, "
                f"{len(data.train)} train / {len(data.val)} val images of {len(data.classes)} classes, "
                f"on {prepared.device}"
            )
            return _fit(prepared, recorder, trainer, echo, on_epoch)


def resume(
    run_id: str,
    progress: bool = True,
    echo: Callable[[str], None] = print_line,
    data: DataBundle | None = None,
    continue_hint: str | None = None,
) -> TrainingResult:
    """Continue a stopped run from its last completed epoch, in the same MLflow run.

    Refused, before anything changes, when the code that started the run differs (zar's version
    or git commit) or its checkpoint is missing or unreadable. The run is claimed (reopened, with
    this process's tags) before the data loads, so a second resume meanwhile finds it taken; data
    that changed since the run started fails the resume (and the run) before training. ``data``, when
    given, must be what ``load_data`` returns for the run's config (a study continuing its children).
    """
    if not re.fullmatch(r"[\w-]+", run_id):
        raise UserError(f"bad run id {clip(repr(run_id))}: a run id is letters, digits, '-' and '_'")
    distributed.init()
    if not distributed.is_main():  # rank 0 reads the run and its checkpoint, and hands them on
        return _follow(lambda: _prepared_from(*distributed.broadcast(None)))
    tracking.check_reachable()
    run = tracking.get_run(run_id)
    _check_resumable(run)
    recorder = Recorder.of(run)
    state = load_checkpoint(recorder.ckpt, run_id)
    model_name, cfg = known_model(state["model_name"]).name, from_dict(state["config"], source=str(recorder.ckpt))
    distributed.broadcast((model_name, cfg.to_dict(), state))

    runs.reopen(run_id, system_metrics=True)
    with runs.closing(run_id, continue_hint=continue_hint):
        prepared = prepare(model_name, cfg, data)
        _check_same_data(run, prepared)
        tracking.set_tags(run_id, {tracking.TAG_DEVICE: str(prepared.device)})
        if tracking.TAG_ERROR in run.data.tags:  # the error that stopped it no longer describes the run
            tracking.delete_tag(run_id, tracking.TAG_ERROR)
        with _rank_failures(run_id):
            trainer = build_trainer(prepared, progress)
            trainer.load_state_dict(state)
            recorder.backfill(trainer)
            echo(f"{prepared.display}: resuming run {run_id} after epoch {trainer.epoch} of {prepared.cfg.epochs}")
            return _fit(prepared, recorder, trainer, echo)


def _prepared_from(model_name: str, cfg: dict, state: dict) -> tuple[Prepared, dict]:
    return prepare(model_name, from_dict(cfg)), state


def _follow(make: Callable[[], tuple[Prepared, dict | None]]) -> None:
    """A rank other than 0 under torchrun: the same model, loop and collectives as rank 0, and no
    MLflow, checkpoint or output. Its failure is left for rank 0 to record (distributed.record_failure)."""
    try:
        prepared, state = make()
        trainer = build_trainer(prepared, progress=False)
        if state is not None:
            trainer.load_state_dict(state)
        for _ in trainer.epochs():
            pass
        trainer.evaluate()  # rank 0 evaluates once more if no epoch was left to train
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        distributed.record_failure(describe(e))
        raise
    return None


def load_checkpoint(path, run_id: str) -> dict:
    """The checkpoint at ``path``; missing, empty or truncated is a one-line error naming it."""
    if not path.exists():
        raise UserError(
            f"run {run_id} has no checkpoint at {path} (it stopped before its first epoch ended); "
            "start a new run instead"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("model", "optimizer", "epoch", "config", "model_name") if k not in state]
    except Exception as e:  # EOFError, a bad zip, an unpickling error: all mean a broken file
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no data'}"
        raise UserError(f"checkpoint {path} is empty or truncated ({clip(reason)}); start a new run instead") from None
    if missing:
        raise UserError(f"checkpoint {path} is not a zar checkpoint (no {missing[0]!r}); start a new run instead")
    return state


def _check_resumable(run) -> None:
    """A run can be resumed once it stopped: not FINISHED, not still trained by a live process, by
    the same code (zar's version and git commit) and the same number of processes. A sweep's trial
    never is: its Optuna study has already counted it out, and a new trial takes its place."""
    run_id, tags, status = run.info.run_id, run.data.tags, run.info.status
    if tracking.TAG_TRIAL in tags:
        raise UserError(
            f"run {run_id} is trial {tags[tracking.TAG_TRIAL]} of a zar sweep, which is not resumed on its own: "
            "run the same 'zar sweep' command again to continue the sweep (a new trial takes this one's place)"
        )
    if status == FINISHED:
        raise UserError(f"run {run_id} is already FINISHED; there is nothing to resume")
    alive = runs.process_alive(tags)
    if status == RUNNING and alive:
        raise UserError(f"run {run_id} is still being trained by process {tags.get(tracking.TAG_PID)}")
    if status == RUNNING and alive is None:
        raise UserError(
            f"run {run_id} is RUNNING on host {tags.get(tracking.TAG_HOST, '?')}; resume it there "
            "once its process is gone"
        )
    changed = provenance.resume_mismatch(tags)
    if changed:
        raise UserError(f"run {run_id} was trained by other code ({changed}); start a new run instead")
    trained_by, now = run.data.params.get("world_size", "1"), str(distributed.world_size())
    if trained_by != now:  # the lr schedule and the global batch were made for that many processes
        raise UserError(
            f"run {run_id} was trained by {trained_by} process(es) and this resume has {now}; "
            f"resume it with {trained_by} (torchrun --nproc_per_node={trained_by})"
            if trained_by != "1"
            else f"run {run_id} was trained by 1 process and this resume has {now}; resume it with plain zar train"
        )


def _check_same_data(run, prepared: Prepared) -> None:
    """Data that changed since the run started would mix two datasets in one run."""
    tags = run.data.tags
    for key, now, then in (
        ("validation set", prepared.data.fingerprint, tags.get(tracking.TAG_FINGERPRINT)),
        ("data", prepared.data.data_fingerprint, tags.get(tracking.TAG_DATA_FINGERPRINT)),
    ):
        if then is not None and now != then:
            raise UserError(
                f"the {key} of run {run.info.run_id} changed since it started (fingerprint {then}, now {now}); "
                "start a new run instead"
            )


@contextlib.contextmanager
def _rank_failures(run_id: str):
    """Under torchrun, a rank that failed fails the run rather than leaving it to look interrupted:
    from the first collective (building the model) to the last, its collectives break, or torchrun
    stops this rank with SIGTERM. Ctrl-C, which reaches every rank, still interrupts."""
    if not distributed.active():
        yield
        return
    try:
        yield
        return
    except KeyboardInterrupt as e:
        if str(e) != "SIGTERM":
            raise
        why = distributed.failure() or (
            "stopped by torchrun (SIGTERM): another rank failed or the job was stopped; see torchrun's output"
        )
    except RuntimeError:  # a collective broke: a rank that said why, or the error itself, fails the run
        why = distributed.failure()
        if why is None:
            raise
    raise TrainingFailed(f"{why}; run {run_id} marked FAILED", reason=why) from None


def follow_thread_share() -> tuple[int, int] | None:
    """Between epochs, a study's child takes the share of the cores its parent gives it now
    (zar.parallel.ThreadShare): more when the children beside it have ended. (before, after) if it changed."""
    path = os.environ.get(THREADS_FILE)
    if not path:
        return None
    try:
        threads = int(open(path).read())
    except (OSError, ValueError):
        return None
    before = torch.get_num_threads()
    if threads < 1 or threads == before:
        return None
    torch.set_num_threads(threads)
    return before, threads


def _fit(
    prepared: Prepared,
    recorder: Recorder,
    trainer: Trainer,
    echo: Callable[[str], None],
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> TrainingResult:
    """The remaining epochs, each checkpointed then logged; then the results. Divergence fails the run."""
    cfg = prepared.cfg
    if cfg.workers == 0:  # a thread importing while DataLoader workers fork could leave them a held lock
        tracking.warm_up_model_logging()
    try:
        try:
            for r in trainer.epochs():
                recorder.epoch(prepared, trainer, r)
                echo(_epoch_line(r, cfg))
                if on_epoch is not None:
                    on_epoch(r)
                threads = follow_thread_share()
                if threads:
                    echo(f"threads: {threads[0]} -> {threads[1]} (this child's share of the study's cores now)")
        except (Exception, KeyboardInterrupt) as e:  # stopping: the last finished epoch goes to disk
            if not isinstance(e, Pruned):
                with contextlib.suppress(Exception):
                    recorder.save()
            raise
    except Pruned:  # never resumed: its checkpoint would only take space
        recorder.drop_checkpoint()
        raise
    except Diverged as e:
        kept = (
            f"the checkpoint of epoch {e.epoch - 1} is kept"
            if e.epoch > 1
            else "no epoch had finished, so there is no checkpoint"
        )
        raise TrainingFailed(
            f"training diverged: {e}; run {recorder.run_id} marked FAILED, {kept}",
            reason=f"diverged: {e}",
            tags={tracking.TAG_DIVERGED: f"epoch {e.epoch}, step {e.step}"},
        ) from None
    if trainer.stopped_early:
        echo(
            f"{prepared.display}: stopped early after epoch {trainer.epoch} of {cfg.epochs}: val_acc has not risen "
            f"above its best (epoch {trainer.best_epoch}) for {cfg.early_stop_patience} epochs"
        )
    summary = recorder.finish(prepared, trainer)
    echo(f"{prepared.display}: best val_acc {100 * summary['best_val_acc']:.2f}% at epoch {summary['best_epoch']}")
    return TrainingResult(
        recorder.run_id,
        recorder.experiment_id,
        prepared.model_name,
        prepared.display,
        cfg.seed,
        list(trainer.history),
        summary,
    )


def _epoch_line(r: EpochResult, cfg: TrainConfig) -> str:
    return (
        f"epoch {r.epoch:>3}/{cfg.epochs}  train_loss {r.train_loss:.4f}  "
        f"train_acc {100 * r.train_acc:6.2f}% (eval mode {100 * r.train_eval_acc:6.2f}%)  "
        f"val_loss {r.val_loss:.4f}  val_acc {100 * r.val_acc:6.2f}%  ({r.epoch_time_s:.1f}s)"
        + (f"  lr {r.lr:.3g}" if cfg.scheduler != "none" else "")
    )
