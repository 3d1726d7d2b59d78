"""One training run, start to end: data, model, engine, and what MLflow records of it.

``train`` starts a run (or adopts the one ``mlflow run`` created), ``resume`` continues
one from its last checkpoint. Both prepare the same way (``prepare``: architecture, device,
data) and train the same way (``_fit``); zar.runs ends the run FINISHED, FAILED or KILLED,
never RUNNING, and a mistake found before training creates no run at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix
from sklearn.model_selection import train_test_split
from torch.utils.data import Subset
from torch.utils.serialization import config as serialization_config

from . import distributed, plots, tracking
from .checks import BUILT_IN_DATA, known_model
from .config import TrainConfig, from_dict, to_yaml
from .data import DataBundle, load_data
from .engine import Diverged, EpochResult, Trainer, resolve_device, resolve_precision
from .errors import Pruned, TrainingFailed, ZarError, clip, describe
from .models import build_model, count_params
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


@dataclass
class Job:
    """One run's training: what trains on what, where it is recorded, and the loop that trains it."""

    model_name: str
    display: str
    cfg: TrainConfig
    device: torch.device
    data: DataBundle
    echo: Callable[[str], None]
    on_epoch: Callable[[EpochResult], None] | None = None  # after each epoch is logged (a sweep's pruner)
    run: object = None  # the MLflow run, once started
    ckpt: Path = field(default_factory=Path)
    trainer: Trainer | None = None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, torch.device]:
    """The device to train on, and ``cfg`` with the precision that will run in place of 'auto'."""
    try:
        device = distributed.rank_device(resolve_device(cfg.device))
    except ValueError as e:
        raise ZarError(str(e)) from None
    # Runs record the precision that ran, never 'auto': they are compared by it.
    return cfg.replace(precision=resolve_precision(cfg.precision, device, cfg.image_size)), device


def prepare(model_name: str, cfg: TrainConfig, echo: Callable[[str], None], data: DataBundle | None = None) -> Job:
    """Architecture, device, precision and data: everything a mistake can be found in before a run exists."""
    variant = known_model(model_name)
    cfg, device = resolve(cfg)
    data = data or load_data(cfg)
    return Job(model_name, variant.display_name(cfg.depth, cfg.se_reduction), cfg, device, data, echo)


def _build_trainer(job: Job, progress: bool) -> Trainer:
    """The model (seeded: the same weights for the same seed) and the loop that trains it."""
    torch.manual_seed(job.cfg.seed)
    data = job.data
    model = build_model(job.model_name, job.cfg.depth, len(data.classes), job.cfg.se_reduction)
    size = min(len(data.val), TRAIN_EVAL_MAX)
    train_eval = Subset(data.train, train_eval_indices(data.train_labels, size, job.cfg.split_seed))
    return Trainer(
        model,
        data.train,
        data.val,
        job.cfg,
        job.device,
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
) -> TrainingResult:
    """Train ``model_name`` under ``cfg`` in a new MLflow run (nested if a study run is active).

    Mistakes (unknown model, bad data) raise ZarError before any run exists. ``data``, when
    given, must be what ``load_data(cfg)`` returns (a study loads it once for all its runs).
    ``parent_run_id`` makes the run a child of that study run, which another process holds.
    ``tags`` are set on the run besides zar's own (a sweep's trial number); ``on_epoch`` is called
    with each epoch's result once it is logged, and may stop the run by raising ``Pruned``.
    """
    distributed.init()
    if not distributed.is_main():
        return _follow(lambda: prepare(model_name, cfg, _silent, data))
    job = prepare(model_name, cfg, echo, data)
    job.on_epoch = on_epoch
    cfg, data = job.cfg, job.data
    tracking.check_reachable()
    run_name = (tags or {}).get(tracking.TAG_RUN_NAME, f"{model_name}-{cfg.depth}-seed{cfg.seed}")
    job.run = runs.start(experiment, run_name, parent_run_id, system_metrics=True)
    job.ckpt = tracking.checkpoint_path(job.run)
    with runs.closing(
        job.run_id,
        {
            tracking.TAG_RUN_NAME: run_name,
            tracking.TAG_MODEL: model_name,
            tracking.TAG_DISPLAY: job.display,
            tracking.TAG_FINGERPRINT: data.fingerprint,
            tracking.TAG_DATA_FINGERPRINT: data.data_fingerprint,
            tracking.TAG_DEVICE: str(job.device),
            tracking.TAG_CHECKPOINT: str(job.ckpt),
            **provenance.code_tags(),
            **(tags or {}),
        },
    ):
        world = distributed.world_size()
        tracking.log_params(
            job.run_id,
            {
                **cfg.to_dict(),
                "model": model_name,
                "dataset": data.name,
                "num_classes": len(data.classes),
                "world_size": world,  # processes training together (torchrun); batch_size is per process
                "global_batch_size": cfg.batch_size * world,
            },
        )
        check_writable(job)
        log_datasets(data)
        with _rank_failures(job):
            job.trainer = _build_trainer(job, progress)
            tracking.log_metrics(job.run_id, count_params(job.trainer.model))
            echo(
                f"{job.display}: run {job.run_id} in experiment {job.run.info.experiment_id}, {len(data.train)} "
                f"train / {len(data.val)} val images of {len(data.classes)} classes, on {job.device}"
            )
            return _fit_here(job)


def resume(run_id: str, progress: bool = True, echo: Callable[[str], None] = print_line) -> TrainingResult:
    """Continue a stopped run from its last completed epoch, in the same MLflow run.

    Refused, before anything changes, when the code that started the run differs (zar's version
    or git commit) or its checkpoint is missing or unreadable. The run is claimed (reopened, with
    this process's tags) before the data loads, so a second resume meanwhile finds it taken; data
    that changed since the run started fails the resume (and the run) before training.
    """
    if not re.fullmatch(r"[\w-]+", run_id):
        raise ZarError(f"bad run id {clip(repr(run_id))}: a run id is letters, digits, '-' and '_'")
    distributed.init()
    if not distributed.is_main():  # rank 0 reads the run and its checkpoint, and hands them on
        return _follow(lambda: _resumed_job(*distributed.broadcast(None)), resumed=True)
    tracking.check_reachable()
    run = tracking.get_run(run_id)
    tags = run.data.tags
    _check_resumable(run)
    changed = provenance.resume_mismatch(tags)
    if changed:
        raise ZarError(f"run {run_id} was trained by other code ({changed}); start a new run instead")
    trained_by, now = run.data.params.get("world_size", "1"), str(distributed.world_size())
    if trained_by != now:  # the lr schedule and the global batch were made for that many processes
        raise ZarError(
            f"run {run_id} was trained by {trained_by} process(es) and this resume has {now}; "
            f"resume it with {trained_by} (torchrun --nproc_per_node={trained_by})"
            if trained_by != "1"
            else f"run {run_id} was trained by 1 process and this resume has {now}; resume it with plain zar train"
        )
    # Always the run's own location, never the checkpoint tag: a tag on a shared server must not
    # point zar at a file to read or delete.
    ckpt = tracking.checkpoint_path(run)
    state = load_checkpoint(ckpt, run_id)
    model_name, cfg = known_model(state["model_name"]).name, from_dict(state["config"], source=str(ckpt))
    distributed.broadcast((model_name, cfg.to_dict(), state))

    reopened = runs.reopen(run_id, system_metrics=True)
    with runs.closing(run_id):
        job = prepare(model_name, cfg, echo)
        job.run, job.ckpt = reopened, ckpt
        for key, now, then in (
            ("validation set", job.data.fingerprint, tags.get(tracking.TAG_FINGERPRINT)),
            ("data", job.data.data_fingerprint, tags.get(tracking.TAG_DATA_FINGERPRINT)),
        ):
            if then is not None and now != then:
                raise ZarError(
                    f"the {key} of run {run_id} changed since it started (fingerprint {then}, now {now}); "
                    "start a new run instead"
                )
        tracking.set_tags(run_id, {tracking.TAG_DEVICE: str(job.device)})
        if tracking.TAG_ERROR in tags:  # the error that stopped it no longer describes the run
            tracking.delete_tag(run_id, tracking.TAG_ERROR)
        with _rank_failures(job):
            job.trainer = _build_trainer(job, progress)
            job.trainer.load_state_dict(state)
            # The process may have died between checkpointing an epoch and logging it.
            logged = {step for step, _ in tracking.metric_history(run_id, "val_acc")}
            for result in job.trainer.history:
                if result.epoch not in logged:
                    tracking.log_metrics(run_id, result.metrics(), step=result.epoch)
            echo(f"{job.display}: resuming run {run_id} after epoch {job.trainer.epoch} of {job.cfg.epochs}")
            return _fit_here(job)


def _silent(line: str) -> None:
    """What a rank other than 0 prints: nothing, so torchrun's output is rank 0's."""


def _resumed_job(model_name: str, cfg: dict, state: dict) -> tuple[Job, dict]:
    return prepare(model_name, from_dict(cfg), _silent), state


def _follow(make_job: Callable, resumed: bool = False) -> None:
    """A rank other than 0 under torchrun: the same model, loop and collectives as rank 0, and no
    MLflow, checkpoint or output. Its failure is left for rank 0 to record (distributed.record_failure)."""
    try:
        job, state = make_job() if resumed else (make_job(), None)
        job.trainer = _build_trainer(job, progress=False)
        if state is not None:
            job.trainer.load_state_dict(state)
        for _ in job.trainer.epochs():
            pass
        job.trainer.evaluate()  # rank 0 evaluates once more if no epoch was left to train
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        distributed.record_failure(describe(e))
        raise
    return None


def load_checkpoint(path: Path, run_id: str) -> dict:
    """The checkpoint at ``path``; missing, empty or truncated is a one-line error naming it."""
    if not path.exists():
        raise ZarError(
            f"run {run_id} has no checkpoint at {path} (it stopped before its first epoch ended); "
            "start a new run instead"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("model", "optimizer", "epoch", "config", "model_name") if k not in state]
    except Exception as e:  # EOFError, a bad zip, an unpickling error: all mean a broken file
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no data'}"
        raise ZarError(f"checkpoint {path} is empty or truncated ({clip(reason)}); start a new run instead") from None
    if missing:
        raise ZarError(f"checkpoint {path} is not a zar checkpoint (no {missing[0]!r}); start a new run instead")
    return state


def _check_resumable(run) -> None:
    """A run can be resumed once it stopped: not FINISHED, and not still trained by a live process."""
    run_id, tags, status = run.info.run_id, run.data.tags, run.info.status
    if status == FINISHED:
        raise ZarError(f"run {run_id} is already FINISHED; there is nothing to resume")
    alive = runs.process_alive(tags)
    if status == RUNNING and alive:
        raise ZarError(f"run {run_id} is still being trained by process {tags.get(tracking.TAG_PID)}")
    if status == RUNNING and alive is None:
        raise ZarError(
            f"run {run_id} is RUNNING on host {tags.get(tracking.TAG_HOST, '?')}; resume it there "
            "once its process is gone"
        )


@contextlib.contextmanager
def _rank_failures(job: Job):
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
    raise TrainingFailed(f"{why}; run {job.run_id} marked FAILED", reason=why) from None


def _fit_here(job: Job) -> TrainingResult:
    """The remaining epochs, each checkpointed then logged; then the results. Divergence fails the run."""
    trainer, cfg, echo = job.trainer, job.cfg, job.echo
    if cfg.workers == 0:  # a thread importing while DataLoader workers fork could leave them a held lock
        tracking.warm_up_model_logging()
    try:
        for r in trainer.epochs():
            save_checkpoint(job.ckpt, {**trainer.state_dict(), "config": cfg.to_dict(), "model_name": job.model_name})
            tracking.log_metrics(job.run_id, r.metrics(), step=r.epoch)
            echo(
                f"epoch {r.epoch:>3}/{cfg.epochs}  train_loss {r.train_loss:.4f}  "
                f"train_acc {100 * r.train_acc:6.2f}% (eval mode {100 * r.train_eval_acc:6.2f}%)  "
                f"val_loss {r.val_loss:.4f}  val_acc {100 * r.val_acc:6.2f}%  ({r.epoch_time_s:.1f}s)"
                + (f"  lr {r.lr:.3g}" if cfg.scheduler != "none" else "")
            )
            if job.on_epoch is not None:
                job.on_epoch(r)
    except Pruned:  # never resumed: its checkpoint would only take space
        _remove_checkpoint(job.ckpt)
        raise
    except Diverged as e:
        kept = (
            f"the checkpoint of epoch {e.epoch - 1} is kept"
            if e.epoch > 1
            else "no epoch had finished, so there is no checkpoint"
        )
        raise TrainingFailed(
            f"training diverged: {e}; run {job.run_id} marked FAILED, {kept}",
            reason=f"diverged: {e}",
            tags={tracking.TAG_DIVERGED: f"epoch {e.epoch}, step {e.step}"},
        ) from None
    summary = trainer.summary()
    if trainer.stopped_early:
        echo(
            f"{job.display}: stopped early after epoch {trainer.epoch} of {cfg.epochs}: val_acc has not risen "
            f"above its best (epoch {trainer.best_epoch}) for {cfg.early_stop_patience} epochs"
        )
    tracking.log_metrics(job.run_id, summary)
    log_results(job)
    _remove_checkpoint(job.ckpt)  # the logged model supersedes it
    echo(f"{job.display}: best val_acc {100 * summary['best_val_acc']:.2f}% at epoch {summary['best_epoch']}")
    return TrainingResult(
        job.run_id, job.run.info.experiment_id, job.model_name, job.display, cfg.seed, list(trainer.history), summary
    )


def _remove_checkpoint(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
        path.parent.rmdir()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write, fsync, rename, fsync the folder: a crash or power loss leaves the previous checkpoint whole.

    No CRC32 over the 255 MB of a ResNet-34 checkpoint: it doubled the write time, and a torn
    write cannot happen once the file is synced before it replaces the last one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with serialization_config.patch({"save.compute_crc32": False}), open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def check_writable(job: Job) -> None:
    """Fail now, not after the first epoch: the checkpoint folder takes a file, the artifact store
    takes the run's config (logged first for that reason)."""
    folder = job.ckpt.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ZarError(f"cannot write checkpoints to {folder}: {e.strerror or e}") from None
    try:
        tracking.log_text(job.run_id, to_yaml(job.cfg), "config.yaml")
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ZarError(
            f"cannot write to the run's artifact store {job.run.info.artifact_uri}: {clip(reason)}"
        ) from None


def log_datasets(data: DataBundle) -> None:
    """The train and validation splits as MLflow datasets of sample ids and class names."""
    from_code = data.name in BUILT_IN_DATA and not Path(data.source).exists()
    tracking.log_datasets(
        data.source,
        from_code,
        [
            ("train", f"{data.name}-train", data.train_ids, [data.classes[y] for y in data.train_labels]),
            ("validation", f"{data.name}-validation", data.val_ids, [data.classes[y] for y in data.val_labels]),
        ],
    )


def log_results(job: Job) -> None:
    """What a person opens after training: confusion matrix, report, curves, and the models."""
    trainer, data, display = job.trainer, job.data, job.display
    final = trainer.evaluate()
    labels = list(range(len(data.classes)))
    cm = confusion_matrix(final.y_true, final.y_pred, labels=labels)
    report = classification_report(
        final.y_true, final.y_pred, labels=labels, target_names=data.classes, output_dict=True, zero_division=0
    )
    history = [{"epoch": r.epoch, **r.metrics()} for r in trainer.history]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "confusion_matrix.json").write_text(json.dumps({"labels": data.classes, "matrix": cm.tolist()}))
        (out / "classification_report.json").write_text(json.dumps(report, indent=2))
        if data.skipped:
            (out / "skipped_images.txt").write_text("\n".join(data.skipped) + "\n")
        plots.confusion_matrix(
            cm, data.classes, f"{display}: validation confusion matrix", out / "confusion_matrix.png"
        )
        plots.curve(history, "acc", f"{display}: accuracy", out / "acc_curve.png")
        plots.curve(history, "loss", f"{display}: loss", out / "loss_curve.png")
        tracking.log_artifacts(job.run_id, tmp)

    log_models(job)


def log_models(job: Job) -> None:
    """The final model ('model') and the best epoch's ('best'), each with the metrics measured on it.

    The best epoch is chosen on the validation set, so 'best' is what an optimistic
    ``zar compare --select best`` row stands for; the final model is what the default row is.
    """
    trainer, data = job.trainer, job.data
    example = torch.stack([data.val[i][0] for i in range(min(2, len(data.val)))])
    if len(example) < 2:  # torch.export fixes a batch size of one; two keeps it free
        example = example.repeat(2, 1, 1, 1)
    example = example.numpy().astype(np.float32)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    model = trainer.model.eval().to("cpu")
    last, best = trainer.history[-1], trainer.history[trainer.best_epoch - 1]
    for name, state, result in (("model", None, last), ("best", trainer.best_state, best)):
        if state is not None:
            model.load_state_dict(state)
        # MLflow links the run's metrics of that step (epoch) to the model: its page shows them.
        tracking.log_model(model, name, result.epoch, example, requirements)
