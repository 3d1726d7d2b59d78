"""One training run, start to end: data, model, engine, and what MLflow records of it.

``train`` starts a run (or adopts the one ``mlflow run`` created), ``resume`` continues
one from its last checkpoint. Either way the run ends FINISHED, FAILED or KILLED,
never RUNNING, and a mistake found before training creates no run at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from sklearn.metrics import classification_report, confusion_matrix
from torch.utils.serialization import config as serialization_config

from . import plots, tracking
from .config import TrainConfig, from_dict, to_yaml
from .data import DataBundle, load_data
from .engine import Diverged, EpochResult, Trainer, resolve_device, resolve_precision
from .errors import ZarError
from .models import build_model, count_params, get_variant
from .tracking import FAILED, FINISHED, KILLED, RUNNING


class TrainingFailed(click.ClickException):
    exit_code = 1


class Interrupted(click.ClickException):
    exit_code = 130


@dataclass
class TrainingResult:
    run_id: str
    experiment_id: str
    model: str
    display_name: str
    seed: int
    history: list[EpochResult]
    summary: dict[str, float]


def _user_error(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise ZarError(str(e)) from None


def train(model_name: str, cfg: TrainConfig, experiment: str = tracking.DEFAULT_EXPERIMENT,
          progress: bool = True, echo: Callable[[str], None] = click.echo,
          data: DataBundle | None = None, parent_run_id: str | None = None) -> TrainingResult:
    """Train ``model_name`` under ``cfg`` in a new MLflow run (nested if a study run is active).

    Mistakes (unknown model, bad data) raise ZarError before any run exists. ``data``, when
    given, must be what ``load_data(cfg)`` returns (a study loads it once for all its runs).
    ``parent_run_id`` makes the run a child of that study run, which another process holds.
    """
    variant = _user_error(get_variant, model_name)
    device = _user_error(resolve_device, cfg.device)
    # The run records the precision that ran, never 'auto': runs are compared by it.
    cfg = cfg.replace(precision=resolve_precision(cfg.precision, device, cfg.image_size))
    data = data or load_data(cfg)
    tracking.check_reachable()
    nested = mlflow.active_run() is not None or parent_run_id is not None
    if parent_run_id:  # a child of a study run in another process, in its experiment
        experiment_id = tracking.client().get_run(parent_run_id).info.experiment_id
    elif nested:  # a study's child lives in its parent's experiment
        experiment_id = mlflow.active_run().info.experiment_id
    elif os.environ.get("MLFLOW_RUN_ID"):  # 'mlflow run' made the run, in its experiment
        experiment_id = None
    else:
        experiment_id = tracking.get_experiment_id(experiment)

    display = variant.display_name(cfg.depth, cfg.se_reduction)
    run_name = f"{model_name}-{cfg.depth}-seed{cfg.seed}"
    run = tracking.start_run(experiment_id, run_name, nested, parent_run_id=parent_run_id)
    run_id = run.info.run_id
    ckpt = tracking.checkpoint_path(run)
    with _closing_run(run_id):
        tracking.set_tags(run_id, {
            "mlflow.runName": run_name,
            tracking.TAG_MODEL: model_name,
            tracking.TAG_DISPLAY: display,
            tracking.TAG_FINGERPRINT: data.fingerprint,
            tracking.TAG_DEVICE: str(device),
            tracking.TAG_CHECKPOINT: str(ckpt),
            **tracking.process_tags(),
        })
        tracking.log_params(run_id, {
            **cfg.to_dict(), "model": model_name, "dataset": data.name,
            "num_classes": len(data.classes),
        })
        _log_datasets(data)
        torch.manual_seed(cfg.seed)
        model = build_model(model_name, cfg.depth, len(data.classes), cfg.se_reduction)
        tracking.log_metrics(run_id, count_params(model))
        trainer = Trainer(model, data.train, data.val, cfg, device, progress)
        echo(f"{display}: run {run_id} in experiment {run.info.experiment_id}, "
             f"{len(data.train)} train / {len(data.val)} val images of {len(data.classes)} classes, on {device}")
        return _fit(run, trainer, model_name, display, cfg, data, echo, ckpt)


def resume(run_id: str, progress: bool = True, echo: Callable[[str], None] = click.echo) -> TrainingResult:
    """Continue a stopped run from its last completed epoch, in the same MLflow run."""
    tracking.check_reachable()
    try:
        run = tracking.client().get_run(run_id)
    except MlflowException:
        raise ZarError(f"no MLflow run with id '{run_id}' at {tracking.tracking_uri()}") from None
    tags, status = run.data.tags, run.info.status
    if status == FINISHED:
        raise ZarError(f"run {run_id} is already FINISHED; there is nothing to resume")
    alive = tracking.process_alive(tags)
    if status == RUNNING and alive:
        raise ZarError(f"run {run_id} is still being trained by process {tags.get(tracking.TAG_PID)}")
    if status == RUNNING and alive is None:
        raise ZarError(f"run {run_id} is RUNNING on host {tags.get(tracking.TAG_HOST, '?')}; resume it there "
                       "once its process is gone")
    ckpt = Path(tags.get(tracking.TAG_CHECKPOINT) or tracking.checkpoint_path(run))
    if not ckpt.exists():
        raise ZarError(f"run {run_id} has no checkpoint at {ckpt} (it stopped before its first epoch ended); "
                       "start a new run instead")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = from_dict(state["config"], source=str(ckpt))
    model_name = state["model_name"]
    variant = _user_error(get_variant, model_name)
    device = _user_error(resolve_device, cfg.device)
    data = load_data(cfg)
    if data.fingerprint != tags.get(tracking.TAG_FINGERPRINT):
        raise ZarError(f"the data of run {run_id} changed since it started (validation set "
                       f"{data.fingerprint} != {tags.get(tracking.TAG_FINGERPRINT)}); start a new run instead")

    run = tracking.start_run(None, "", nested=mlflow.active_run() is not None, run_id=run_id)
    with _closing_run(run_id):
        tracking.set_tags(run_id, {**tracking.process_tags(), tracking.TAG_DEVICE: str(device)})
        client = tracking.client()
        if tracking.TAG_ERROR in tags:  # the error that stopped it no longer describes the run
            client.delete_tag(run_id, tracking.TAG_ERROR)
        model = build_model(model_name, cfg.depth, len(data.classes), cfg.se_reduction)
        trainer = Trainer(model, data.train, data.val, cfg, device, progress)
        trainer.load_state_dict(state)
        # The process may have died between checkpointing an epoch and logging it.
        logged = {m.step for m in client.get_metric_history(run_id, "val_acc")}
        for result in trainer.history:
            if result.epoch not in logged:
                tracking.log_metrics(run_id, result.metrics(), step=result.epoch)
        display = variant.display_name(cfg.depth, cfg.se_reduction)
        echo(f"{display}: resuming run {run_id} after epoch {trainer.epoch} of {cfg.epochs}")
        return _fit(run, trainer, model_name, display, cfg, data, echo, ckpt)


def _fit(run, trainer: Trainer, model_name: str, display: str, cfg: TrainConfig, data: DataBundle,
         echo, ckpt: Path) -> TrainingResult:
    run_id = run.info.run_id
    for r in trainer.epochs():
        save_checkpoint(ckpt, {**trainer.state_dict(), "config": cfg.to_dict(), "model_name": model_name})
        tracking.log_metrics(run_id, r.metrics(), step=r.epoch)
        echo(f"epoch {r.epoch:>3}/{cfg.epochs}  train_loss {r.train_loss:.4f}  train_acc {100 * r.train_acc:6.2f}%  "
             f"val_loss {r.val_loss:.4f}  val_acc {100 * r.val_acc:6.2f}%  ({r.epoch_time_s:.1f}s)")
    summary = trainer.summary()
    tracking.log_metrics(run_id, summary)
    _log_results(trainer, data, cfg, display)
    with contextlib.suppress(OSError):  # the logged model supersedes the checkpoint
        ckpt.unlink()
        ckpt.parent.rmdir()
    echo(f"{display}: best val_acc {100 * summary['best_val_acc']:.2f}% at epoch {summary['best_epoch']}")
    return TrainingResult(run_id, run.info.experiment_id, model_name, display, cfg.seed, list(trainer.history), summary)


@contextlib.contextmanager
def _closing_run(run_id: str):
    """The run ends FINISHED on success, KILLED on Ctrl-C, SIGTERM or SIGHUP, FAILED on anything else."""
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in stops}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        yield
    except Diverged as e:
        tracking.set_tags(run_id, {"zar.diverged_at": f"epoch {e.epoch}, step {e.step}"})
        tracking.end_run(run_id, FAILED, f"diverged: {e}")
        kept = (f"the checkpoint of epoch {e.epoch - 1} is kept" if e.epoch > 1
                else "no epoch had finished, so there is no checkpoint")
        raise TrainingFailed(f"training diverged: {e}; run {run_id} marked FAILED, {kept}") from None
    except KeyboardInterrupt as e:
        _ignore(stops)  # a second Ctrl-C must not cut the cleanup short and leave the run RUNNING
        tracking.end_run(run_id, KILLED, f"interrupted by {str(e) or 'SIGINT'}")
        raise Interrupted(f"interrupted: run {run_id} marked KILLED; continue it with "
                          f"'zar train --resume {run_id}'") from None
    except Interrupted as e:  # a study's child was interrupted: the study stops too
        _ignore(stops)
        tracking.end_run(run_id, KILLED, e.format_message())
        raise Interrupted(f"{e.format_message()}; study run {run_id} marked KILLED") from None
    except BaseException as e:
        reason = e.format_message() if isinstance(e, click.ClickException) else f"{type(e).__name__}: {e}"
        tracking.end_run(run_id, FAILED, reason)
        raise
    else:
        _ignore(stops)
        tracking.end_run(run_id, FINISHED)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _ignore(signals) -> None:
    for s in signals:
        signal.signal(s, signal.SIG_IGN)


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


def _log_datasets(data: DataBundle) -> None:
    """Each split as a table of sample ids and labels: its digest identifies the split."""
    source = _dataset_source(data)
    for context, ids, labels in (("train", data.train_ids, data.train_labels),
                                 ("validation", data.val_ids, data.val_labels)):
        df = pd.DataFrame({"id": ids, "label": [data.classes[y] for y in labels]})
        mlflow.log_input(mlflow.data.from_pandas(df, source=source, name=f"{data.name}-{context}"), context=context)


def _dataset_source(data: DataBundle):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if data.name in ("digits", "synthetic") and not Path(data.source).exists():
        return CodeDatasetSource({"loader": data.source})
    with warnings.catch_warnings():  # MLflow warns that a local path fits two equal source types
        warnings.simplefilter("ignore")
        return resolve_dataset_source(data.source)


def _log_results(trainer: Trainer, data: DataBundle, cfg: TrainConfig, display: str) -> None:
    final = trainer.evaluate()
    labels = list(range(len(data.classes)))
    cm = confusion_matrix(final.y_true, final.y_pred, labels=labels)
    report = classification_report(final.y_true, final.y_pred, labels=labels, target_names=data.classes,
                                   output_dict=True, zero_division=0)
    history = [{"epoch": r.epoch, **r.metrics()} for r in trainer.history]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "confusion_matrix.json").write_text(json.dumps({"labels": data.classes, "matrix": cm.tolist()}))
        (out / "classification_report.json").write_text(json.dumps(report, indent=2))
        (out / "config.yaml").write_text(to_yaml(cfg))
        if data.skipped:
            (out / "skipped_images.txt").write_text("\n".join(data.skipped) + "\n")
        plots.confusion_matrix(cm, data.classes, f"{display}: validation confusion matrix",
                               out / "confusion_matrix.png")
        plots.curve(history, "acc", f"{display}: accuracy", out / "acc_curve.png")
        plots.curve(history, "loss", f"{display}: loss", out / "loss_curve.png")
        mlflow.log_artifacts(tmp)

    model = trainer.model.eval()
    example = torch.stack([data.val[i][0] for i in range(min(2, len(data.val)))])
    if len(example) < 2:  # torch.export fixes a batch size of one; two keeps it free
        example = example.repeat(2, 1, 1, 1)
    mlflow.pytorch.log_model(model.to("cpu"), name="model", input_example=example.numpy().astype(np.float32),
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
