"""What MLflow keeps of one training run: its setup, each epoch, and the results at the end.

A ``Recorder`` is made once its run exists, and owns what belongs to that run: its id, its
checkpoint, the per-epoch metrics, and at the end the summary, confusion matrix, report, curves
and the two models. zar.training decides when each happens; the engine that trains knows nothing
of any of it.

Checkpoints cost what they are worth: every epoch's state is copied in memory (into the buffers
of the last copy: 0.09 s for a ResNet-34), and written to disk (255 MB, synced: ~0.6 s) only while
copies and writes stay within ``ZAR_CHECKPOINT_BUDGET`` (default 2%) of the run's time so far,
and whenever the run stops on an error, Ctrl-C or SIGTERM. Only a process killed outright (kill -9,
power loss) resumes from an older epoch than MLflow shows; resume trains those epochs again and
does not log them twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix
from torch.utils.serialization import config as serialization_config

from . import plots, predictions, tracking
from .checks import BUILT_IN_DATA
from .config import TrainConfig, to_yaml
from .errors import UserError, clip
from .learn import distributed, served_model
from .learn.data import IMAGENET_MEAN, IMAGENET_STD, DataBundle, SmallImages
from .learn.engine import EpochResult, Trainer
from .learn.models import count_params
from .tracking.runs import STOP_SIGNALS


@dataclass(frozen=True)
class Prepared:
    """What one run trains, on what and where: everything a mistake can be found in before a run exists.

    The model is not here: it is built inside the run (zar.training.build_trainer), so that a
    model that fails to build fails its run rather than leaving none.
    """

    model_name: str
    display: str  # e.g. "SE-ResNet-34 (r=4)"
    cfg: TrainConfig  # with the precision that will run in place of 'auto'
    device: torch.device
    data: DataBundle


BUDGET_ENV = "ZAR_CHECKPOINT_BUDGET"  # the share of a run's time its checkpoints may take; 1 writes every epoch
DISK_BYTES_PER_S = 200e6  # what a first write is taken to cost before one is timed


@dataclass
class Checkpoints:
    """The last epoch's state in memory, and when it goes to disk: within the budget, or when told."""

    budget: float = field(default_factory=lambda: float(os.environ.get(BUDGET_ENV) or 0.02))
    started: float = field(default_factory=time.monotonic)
    spent: float = 0.0  # seconds copying and writing so far
    write_s: float | None = None  # the last write's seconds
    state: dict | None = None
    epoch: int = 0  # the epoch ``state`` ends
    written: int = 0  # the epoch on disk
    logged_before: set[int] = field(default_factory=set)  # epochs an earlier attempt logged (a resume)

    def keep(self, state: dict, epoch: int) -> None:
        start = time.perf_counter()
        best = state.pop("best_state", None)  # replaced by training, never changed in place: no copy
        self.state = {**snapshot(state, self.state), "best_state": best}
        self.epoch = epoch
        self.spent += time.perf_counter() - start

    def due(self) -> bool:
        if self.budget >= 1:  # all of the run's time: every epoch, whatever a write is estimated to cost
            return True
        estimate = self.write_s if self.write_s is not None else _nbytes(self.state) / DISK_BYTES_PER_S
        return self.spent + estimate <= self.budget * (time.monotonic() - self.started)

    def write(self, path: Path) -> None:
        if self.state is None or self.written == self.epoch:
            return
        with signals_deferred():  # a stop signal now is handled once the checkpoint is whole and counted
            start = time.perf_counter()
            save_checkpoint(path, self.state)
            self.write_s = time.perf_counter() - start
            self.spent += self.write_s
            self.written = self.epoch


@dataclass(frozen=True)
class Recorder:
    """One training run in MLflow, from the moment it exists."""

    run_id: str
    experiment_id: str
    artifact_uri: str
    ckpt: Path
    checkpoints: Checkpoints = field(default_factory=Checkpoints, compare=False, repr=False)

    @classmethod
    def of(cls, run) -> Recorder:
        # Always the run's own location, never the checkpoint tag: a tag on a shared server must not
        # point zar at a file to read or delete.
        return cls(run.info.run_id, run.info.experiment_id, run.info.artifact_uri, tracking.checkpoint_path(run))

    def setup(self, prepared: Prepared) -> None:
        """A new run's params, then proof that its checkpoint folder and artifact store take files,
        then its datasets: a run that cannot keep its results fails before its first epoch."""
        cfg, data, world = prepared.cfg, prepared.data, distributed.world_size()
        tracking.log_params(
            self.run_id,
            {
                **cfg.to_dict(),
                "model": prepared.model_name,
                "dataset": data.name,
                "num_classes": len(data.classes),
                "world_size": world,  # processes training together (torchrun); batch_size is per process
                "global_batch_size": cfg.batch_size * world,
                # what the logged models do to a [0, 1] pixel before the network, per channel
                **{f"normalisation_{k}": ",".join(map(str, vs)) for k, vs in zip(("mean", "std"), normalisation(data))},
            },
        )
        self.check_writable(cfg)
        log_datasets(data)

    def check_writable(self, cfg: TrainConfig) -> None:
        """Fail now, not after the first epoch: the checkpoint folder takes a file, the artifact store
        takes the run's config (logged first for that reason)."""
        folder = self.ckpt.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as e:
            raise UserError(f"cannot write checkpoints to {folder}: {e.strerror or e}") from None
        try:
            tracking.log_text(self.run_id, to_yaml(cfg), "config.yaml")
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot write to the run's artifact store {self.artifact_uri}: {clip(reason)}") from None

    def model_size(self, model: torch.nn.Module) -> None:
        tracking.log_metrics(self.run_id, count_params(model))

    def backfill(self, trainer: Trainer) -> None:
        """After a resume: the epochs the checkpoint holds that MLflow lacks (the process may have died
        between checkpointing an epoch and logging it)."""
        logged = {step for step, _ in tracking.metric_history(self.run_id, "val_acc")}
        for result in trainer.history:
            if result.epoch not in logged:
                tracking.log_metrics(self.run_id, result.metrics(), step=result.epoch)
        self.checkpoints.logged_before.update(logged)  # those past the checkpoint train again, unlogged
        self.checkpoints.epoch = self.checkpoints.written = trainer.epoch  # what the checkpoint holds

    def epoch(self, prepared: Prepared, trainer: Trainer, result: EpochResult) -> None:
        """Log the epoch (unless an earlier attempt did), keep its state, write it if the budget allows."""
        state = {**trainer.state_dict(), "config": prepared.cfg.to_dict(), "model_name": prepared.model_name}
        self.checkpoints.keep(state, result.epoch)
        if self.checkpoints.due():
            self.checkpoints.write(self.ckpt)
        if result.epoch not in self.checkpoints.logged_before:
            tracking.log_metrics(self.run_id, result.metrics(), step=result.epoch)

    def save(self) -> None:
        """The last finished epoch's state to disk, if it is not there: the run is stopping."""
        self.checkpoints.write(self.ckpt)

    def finish(self, prepared: Prepared, trainer: Trainer) -> dict[str, float]:
        """The summary metrics and results; then the checkpoint goes, as the logged model supersedes it."""
        summary = trainer.summary()
        tracking.log_metrics(self.run_id, summary)
        try:
            log_results(prepared, trainer, self.run_id)
        except BaseException:  # a resume finishes from the last epoch, training nothing more
            with contextlib.suppress(Exception):
                self.save()
            raise
        self.drop_checkpoint()
        return summary

    def drop_checkpoint(self) -> None:
        with contextlib.suppress(OSError):
            self.ckpt.unlink()
            self.ckpt.parent.rmdir()


def snapshot(state, reuse=None):
    """A copy of a state dict's tensors on the CPU, safe to keep while training changes the
    originals; into ``reuse``'s tensors (an earlier copy) where their shapes match."""
    if isinstance(state, torch.Tensor):
        if isinstance(reuse, torch.Tensor) and reuse.shape == state.shape and reuse.dtype == state.dtype:
            return reuse.copy_(state.detach())
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {k: snapshot(v, reuse.get(k)) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(state) else [None] * len(state)
        return type(state)(snapshot(v, r) for v, r in zip(state, reuse))
    return state


def _nbytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(v) for v in state)
    return 0


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


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C, SIGTERM and SIGHUP held until the block ends, then delivered to their handlers.

    A stop signal raised inside torch.save's writer surfaces as torch's RuntimeError ("unexpected
    pos"), not as the interruption it was: the run would end FAILED instead of KILLED, with no
    checkpoint of its last epoch. Outside the main thread signals cannot be handled: no change.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)


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


def log_results(prepared: Prepared, trainer: Trainer, run_id: str) -> None:
    """What a person opens after training: confusion matrix, report, curves, and the models."""
    data, display = prepared.data, prepared.display
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
        tracking.log_artifacts(run_id, tmp)
    predictions.log_predictions(prepared, trainer, run_id)  # before log_models moves the model to the CPU
    log_models(prepared, trainer, run_id)


def log_models(prepared: Prepared, trainer: Trainer, run_id: str) -> None:
    """The final model ('model') and the best epoch's ('best'), each with the metrics measured on it.

    Each is a ``served_model.Classifier``: it takes images as a user has them (float32 pixels in
    [0, 1], N x C x image_size x image_size), normalises them as this run did, and returns class
    probabilities; the class names and the normalisation go with it, in its files and metadata.
    The best epoch is chosen on the validation set, so 'best' is what an optimistic
    ``zar compare --select best`` row stands for; the final model is what the default row is.
    """
    data = prepared.data
    mean, std = normalisation(data)
    example = torch.stack([pixels(data, i) for i in range(min(2, len(data.val)))])
    if len(example) < 2:  # torch.export fixes a batch size of one; two keeps it free
        example = example.repeat(2, 1, 1, 1)
    example = example.numpy().astype(np.float32)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"]
    metadata = {
        "classes": data.classes,
        "input": "float32 pixels in [0, 1], N x C x H x W at image_size; C = 1 (grayscale) or 3 (RGB)",
        "normalisation_mean": mean,
        "normalisation_std": std,
        "output": "class probabilities (softmax); the pyfunc adds the predicted class's name",
    }
    network = trainer.model.eval().to("cpu")
    last, best = trainer.history[-1], trainer.history[trainer.best_epoch - 1]
    for name, state, result in (("model", None, last), ("best", trainer.best_state, best)):
        if state is not None:
            network.load_state_dict(state)
        classifier = served_model.Classifier(network, mean, std).eval()
        # MLflow links the run's metrics of that step (epoch) to the model: its page shows them.
        tracking.log_model(classifier, name, result.epoch, example, requirements, data.classes, metadata)


def normalisation(data: DataBundle) -> tuple[list[float], list[float]]:
    """The mean and std per input channel that the run's images were normalised with.

    The built-in data (grayscale) uses its training split's own (``SmallImages``); an image
    folder (RGB), ImageNet's.
    """
    if isinstance(data.train, SmallImages):
        return [data.train.mean], [data.train.std]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def pixels(data: DataBundle, i: int) -> torch.Tensor:
    """Validation image ``i`` as a user has it: unnormalised, at image_size, float32 in [0, 1]."""
    mean, std = normalisation(data)
    x = data.val[i][0][: len(mean)]
    return x * torch.tensor(std).reshape(-1, 1, 1) + torch.tensor(mean).reshape(-1, 1, 1)
