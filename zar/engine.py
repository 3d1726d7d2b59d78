"""Training and evaluation: plain functions and a resumable loop that return numbers.

Nothing here knows about MLflow or files. ``Trainer.epochs()`` yields one
``EpochResult`` per finished epoch; its caller decides what to log and when to
checkpoint (``Trainer.state_dict()`` holds everything needed to continue exactly).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import TrainConfig


class Diverged(RuntimeError):
    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"loss became {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


@dataclass
class EpochResult:
    """One epoch's numbers. ``train_loss``/``train_acc`` are running means over the epoch's batches
    in train mode (what the study reported); ``train_eval_*`` and ``val_*`` are measured the same
    way, in eval mode after the epoch, so that they compare like with like."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    epoch_time_s: float
    train_eval_loss: float = math.nan
    train_eval_acc: float = math.nan

    def metrics(self) -> dict[str, float]:
        """The numbers to log; ``train_eval_*`` only where measured (a run from before it was)."""
        return {k: v for k, v in asdict(self).items() if k != "epoch" and not math.isnan(v)}


@dataclass
class Evaluation:
    loss: float
    acc: float
    y_true: list[int]
    y_pred: list[int]


# Evaluation has no optimizer step and keeps no activations for backward: bigger batches
# pay (1.6x at 32 px measured) and give the same predictions, as BatchNorm uses running stats.
EVAL_BATCH_SIZE = 256
# bf16 autocast pays only where convolutions are big enough: issue 8 measured it at 3.6x fp32 at
# 224 px and slower than fp32 at 32 px (Xeon with AMX); benchmarks/bench_precision.py measures it.
AUTO_BF16_MIN_IMAGE_SIZE = 64


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device auto or cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bf16 itself (AMX or AVX512-BF16 on CPU) rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(name: str, device: torch.device, image_size: int) -> str:
    """``auto``: bf16 only where the hardware has it natively and the images are large enough to gain."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) and image_size >= AUTO_BF16_MIN_IMAGE_SIZE else "fp32"


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused=True: one kernel for all parameters, the same update up to float rounding. ResNet-34's
    # AdamW step took 20 ms instead of 111 ms on a Xeon (issue 8); a whole training step at 32 px
    # ran 1.15-1.3x faster on an AMD EPYC (docs/benchmarks.md).
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "fused": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), **kwargs)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), **kwargs)
    return torch.optim.SGD(model.parameters(), momentum=0.9, **kwargs)


class Precision:
    """How tensors are computed: fp32, or bf16 autocast with channels-last memory (where bf16 kernels want it)."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.dtype = torch.bfloat16 if name == "bf16" else None
        self.memory_format = torch.channels_last if name == "bf16" else torch.contiguous_format

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True, memory_format=self.memory_format)


def train_one_epoch(
    model, loader, optimizer, precision: Precision, epoch: int, progress: bool = True
) -> tuple[float, float]:
    """Returns (mean loss, accuracy) over the epoch's training batches."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if progress else True, unit="batch")
    for step, (x, y) in enumerate(bar, start=1):
        x, y = precision.inputs(x), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
            loss = criterion(logits, y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise Diverged(epoch, step, loss_value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss_value * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    return loss_sum / seen, correct / seen


@torch.inference_mode()
def evaluate(model, loader, precision: Precision) -> Evaluation:
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, y_true, y_pred = 0.0, [], []
    for x, y in loader:
        x, y = precision.inputs(x), y.to(precision.device)
        with precision.autocast():
            logits = model(x)
        loss_sum += criterion(logits.float(), y).item()
        y_true += y.tolist()
        y_pred += logits.argmax(1).tolist()
    n = len(y_true)
    return Evaluation(loss_sum / n, sum(t == p for t, p in zip(y_true, y_pred)) / n, y_true, y_pred)


class Trainer:
    """The study's loop: seeded shuffling, one optimizer step per batch, evaluation per epoch."""

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        cfg: TrainConfig,
        device: torch.device,
        progress: bool = True,
        train_eval_set: Dataset | None = None,
    ):
        self.cfg, self.device, self.progress = cfg, device, progress
        self.precision = Precision(resolve_precision(cfg.precision, device, cfg.image_size), device)
        self.model = model.to(device, memory_format=self.precision.memory_format)
        self.optimizer = make_optimizer(self.model, cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # BatchNorm cannot train on a batch of one: drop a last batch of exactly one sample.
        drop_last = len(train_set) % cfg.batch_size == 1 and len(train_set) > 1
        pin = device.type == "cuda"
        self.train_loader = DataLoader(
            train_set,
            cfg.batch_size,
            shuffle=True,
            generator=self.generator,
            num_workers=cfg.workers,
            drop_last=drop_last,
            pin_memory=pin,
        )
        eval_batch = max(cfg.batch_size, EVAL_BATCH_SIZE)
        self.val_loader = DataLoader(val_set, eval_batch, num_workers=cfg.workers, pin_memory=pin)
        # The training images that are evaluated like the validation set after each epoch.
        self.train_eval_loader = (
            DataLoader(train_eval_set, eval_batch, num_workers=cfg.workers, pin_memory=pin)
            if train_eval_set is not None
            else None
        )
        self.last_evaluation: Evaluation | None = None
        self.epoch = 0  # last completed epoch
        self.history: list[EpochResult] = []
        self.best_epoch = 0
        self.best_val_acc = 0.0
        self.best_state: dict[str, torch.Tensor] | None = None  # the weights of the best epoch, on the CPU

    def epochs(self) -> Iterator[EpochResult]:
        while self.epoch < self.cfg.epochs:
            epoch = self.epoch + 1
            start = time.perf_counter()
            train_loss, train_acc = train_one_epoch(
                self.model, self.train_loader, self.optimizer, self.precision, epoch, self.progress
            )
            ev = self.last_evaluation = evaluate(self.model, self.val_loader, self.precision)
            tr = evaluate(self.model, self.train_eval_loader, self.precision) if self.train_eval_loader else None
            result = EpochResult(
                epoch,
                train_loss,
                train_acc,
                ev.loss,
                ev.acc,
                time.perf_counter() - start,
                tr.loss if tr else math.nan,
                tr.acc if tr else math.nan,
            )
            self.epoch = epoch
            self.history.append(result)
            if ev.acc > self.best_val_acc or self.best_epoch == 0:
                self.best_epoch, self.best_val_acc = epoch, ev.acc
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            yield result

    @property
    def improved(self) -> bool:
        """Whether the last finished epoch is the best so far."""
        return self.best_epoch == self.epoch > 0

    def evaluate(self) -> Evaluation:
        """The current model on the validation set (that of the last epoch, computed once)."""
        if self.last_evaluation is None:
            self.last_evaluation = evaluate(self.model, self.val_loader, self.precision)
        return self.last_evaluation

    def summary(self) -> dict[str, float]:
        """The best epoch (chosen on the validation set, so its val_acc is optimistic) and its numbers."""
        best = self.history[self.best_epoch - 1] if self.best_epoch else None
        summary = {
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "train_acc_at_best": best.train_acc if best else 0.0,
        }
        if best and not math.isnan(best.train_eval_acc):  # measured only with a train_eval_set
            summary["train_eval_acc_at_best"] = best.train_eval_acc
        return summary

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "loader": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "history": [asdict(r) for r in self.history],
            "best": self.summary(),
            "best_state": self.best_state,
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["epoch"]
        known = {f.name for f in fields(EpochResult)}
        self.history = [EpochResult(**{k: v for k, v in r.items() if k in known}) for r in state["history"]]
        best = state["best"]
        self.best_val_acc, self.best_epoch = best["best_val_acc"], best["best_epoch"]
        self.best_state = state.get("best_state")
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["loader"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
