"""Training and evaluation: plain functions and a resumable loop that return numbers.

Nothing here knows about MLflow or files. ``Trainer.epochs()`` yields one
``EpochResult`` per finished epoch; its caller decides what to log and when to
checkpoint (``Trainer.state_dict()`` holds everything needed to continue exactly:
weights, optimizer, lr scheduler, random streams, history and so early stopping).

The options for longer runs (lr schedule, early stopping, label smoothing, augmentation,
MixUp/CutMix) are off by default; off, each leaves the loop computing what it computed
before the option existed (tests/test_training_options.py holds it to that, bit for bit).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..config import TrainConfig
from . import distributed
from .data import IMAGENET_MEAN, IMAGENET_STD


class Diverged(RuntimeError):
    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"loss became {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


@dataclass
class EpochResult:
    """One epoch's numbers. ``train_loss``/``train_acc`` are running means over the epoch's batches
    in train mode (what the study reported); ``train_eval_*`` and ``val_*`` are measured the same
    way, in eval mode after the epoch, so that they compare like with like. ``train_loss`` is the
    loss minimised (with label smoothing, MixUp/CutMix where on); ``train_acc`` always counts the
    images' own labels; ``val_loss`` and ``train_eval_loss`` are always plain cross entropy."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    epoch_time_s: float
    train_eval_loss: float = math.nan
    train_eval_acc: float = math.nan
    lr: float = math.nan  # the learning rate of the epoch's last batch (the schedule steps per batch)

    def metrics(self) -> dict[str, float]:
        """The numbers to log; ``train_eval_*`` and ``lr`` only where measured (a run from before they were)."""
        return {k: v for k, v in asdict(self).items() if k != "epoch" and not math.isnan(v)}


@dataclass
class Evaluation:
    loss: float
    acc: float
    y_true: list[int]
    y_pred: list[int]
    p_true: list[float] = field(default_factory=list)  # each image's softmax probability of its true class


# Evaluation has no optimizer step and keeps no activations for backward: bigger batches
# pay (1.6x at 32 px measured) and give the same predictions, as BatchNorm uses running stats.
EVAL_BATCH_SIZE = 256
# On a GPU, bf16 autocast pays where convolutions are big enough; on a CPU, auto measures it
# (zar.learn.autoprecision): issue 8 found it 3.6x fp32 at 224 px and slower at 32 px on a Xeon
# with AMX, issue 23 1.4x faster at 32 px on an AMD EPYC with avx512_bf16.
AUTO_BF16_MIN_IMAGE_SIZE = 64
# Warmup starts at lr / 100 and rises linearly, batch by batch (as torchvision's reference recipes do).
WARMUP_START_FACTOR = 0.01
# The augmentation stream is seeded with seed + 2**32: never the same stream as the loader's, for any seed.
AUGMENT_SEED_OFFSET = 2**32


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


def resolve_precision(
    name: str, device: torch.device, image_size: int, batch_size: int = 32, threads: int | None = None
) -> str:
    """``auto``: bf16 only where the hardware has it natively and it pays: on a CPU where a measurement
    of a few training steps at ``image_size`` says so (zar.learn.autoprecision, cached per machine), on
    a GPU from AUTO_BF16_MIN_IMAGE_SIZE. ``threads``: the CPU threads the run will train on (default torch's now)."""
    if name != "auto":
        return name
    if not native_bf16(device):
        return "fp32"
    if device.type == "cpu":
        from .autoprecision import choose

        return choose(image_size, batch_size, threads or torch.get_num_threads())
    return "bf16" if image_size >= AUTO_BF16_MIN_IMAGE_SIZE else "fp32"


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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler | None:
    """The learning-rate schedule of ``cfg.scheduler``, stepped once after every batch; None for 'none'.

    cosine: linear warmup from lr * WARMUP_START_FACTOR to lr over ``warmup_epochs``, then cosine decay
    to 0 at the end of the last epoch. onecycle: torch's OneCycleLR peaking at lr, with its defaults
    (start at lr/25, end at lr/25e4, momentum or Adam's beta1 cycled between 0.85 and 0.95) and the
    rise taking ``warmup_epochs / epochs`` of the steps. The fused optimizers read the lr (and betas)
    from their param groups at every step, so they follow the schedule (tests check the step sizes).
    """
    if cfg.scheduler == "none":
        return None
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=cfg.warmup_epochs / cfg.epochs)
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=total)
    rise = LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, end_factor=1.0, total_iters=warmup)
    decay = CosineAnnealingLR(optimizer, T_max=total - warmup)
    return SequentialLR(optimizer, [rise, decay], milestones=[warmup])


def normalisation(dataset: Dataset) -> tuple[list[float], list[float]]:
    """The per-channel mean and std the dataset's images were normalised with.

    zar.learn.data's SmallImages (digits, synthetic) carry their own scalar ``mean`` and ``std``; image
    folders (CachedImages) are normalised with ImageNet's.
    """
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if isinstance(mean, float) and isinstance(std, float):
        return [mean], [std]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


# Each image's augmentation (config key 'augment'); RandAugment with torchvision's defaults, 2 ops of magnitude 9.
PER_IMAGE = {"flip": v2.RandomHorizontalFlip, "randaugment": v2.RandAugment}


class Augment:
    """What a training batch goes through before the model sees it: per-image augmentation, then MixUp/CutMix.

    Each image gets its own random draw (a v2 transform called on a whole batch draws once for all
    of it): flip mirrors about half the images; RandAugment (2 ops of magnitude 9) works on pixels
    in [0, 1], so images are un-normalised for it and normalised again after. MixUp and CutMix draw
    one mixing weight per batch and pair each image with the one before it, as torchvision's do;
    they make the targets soft, the labels stay as they were (train_acc is measured on them).

    The randomness is a stream of its own, seeded by the training seed and checkpointed, never the
    global one: every architecture trained with a seed sees the same augmented images, and a resumed
    run the images it would have seen. (torchvision draws from torch's global generator; it is
    swapped for this stream around each call.)
    """

    def __init__(self, cfg: TrainConfig, num_classes: int | None, mean: list[float], std: list[float]):
        self.generator = torch.Generator().manual_seed(cfg.seed + AUGMENT_SEED_OFFSET)
        self.per_image = PER_IMAGE[cfg.augment]() if cfg.augment != "none" else None
        self.unit_range = cfg.augment == "randaugment"
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
        mixers = []
        if cfg.mixup > 0 or cfg.cutmix > 0:
            if num_classes is None:
                raise ValueError("MixUp and CutMix need the number of classes")
            if cfg.mixup > 0:
                mixers.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
            if cfg.cutmix > 0:
                mixers.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if len(mixers) > 1 else mixers[0] if mixers else None

    @staticmethod
    def wanted(cfg: TrainConfig) -> bool:
        return cfg.augment != "none" or cfg.mixup > 0 or cfg.cutmix > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented batch and its targets: ``y`` itself, or soft targets (B x classes) after MixUp/CutMix."""
        with torch.random.fork_rng(devices=[]), one_thread():
            torch.set_rng_state(self.generator.get_state())
            if self.per_image is not None:
                x = self._each_image(x)
            target = y
            if self.mix is not None:
                x, target = self.mix(x, y)
            self.generator.set_state(torch.get_rng_state())
        return x, target

    def _each_image(self, x: torch.Tensor) -> torch.Tensor:
        if not self.unit_range:  # a flip commutes with normalisation
            return torch.stack([self.per_image(image) for image in x])
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        pixels = (x * std + mean).clamp_(0, 1)
        return (torch.stack([self.per_image(image) for image in pixels]) - mean) / std


@contextlib.contextmanager
def one_thread():
    """Torch's CPU ops on one thread: augmenting one small image, or mixing a batch, gains nothing from
    more, and each op's threads wait for each other. RandAugment on a batch of 32 images of 32 px took
    12 ms on one thread and 550 ms on two where the other core was busy (2-core AMD EPYC, issue 11)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    model,
    loader,
    optimizer,
    precision: Precision,
    epoch: int,
    progress: bool = True,
    *,
    criterion: nn.Module | None = None,
    scheduler: LRScheduler | None = None,
    augment: Augment | None = None,
) -> tuple[float, float, float]:
    """Returns (mean loss, accuracy, lr of the last batch) over the epoch's training batches.

    The loss is the one minimised (``criterion``: cross entropy, with label smoothing if asked, on
    MixUp/CutMix's soft targets where they are on); the accuracy counts predictions equal to the
    images' own labels. ``scheduler`` steps after every batch.
    """
    model.train()
    if criterion is None:
        criterion = nn.CrossEntropyLoss()
    loss_sum, correct, seen, lr = 0.0, 0, 0, math.nan
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if progress else True, unit="batch")
    for step, (x, y) in enumerate(bar, start=1):
        x, y = precision.inputs(x), y.to(precision.device, non_blocking=True)
        target = y
        if augment is not None:
            x, target = augment(x, y)
            x = precision.inputs(x)  # in the memory format the model wants again
        with precision.autocast():
            logits = model(x)
            loss = criterion(logits, target)
        loss_value = loss.item()
        if not _all_finite(loss_value, precision.device):
            raise Diverged(epoch, step, loss_value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss_value * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen], precision.device)  # every rank's batches
    return loss_sum / seen, correct / seen, float(lr)


def _all_finite(loss: float, device: torch.device) -> bool:
    """Whether the loss is finite on every rank: all ranks stop at the same step, or none does."""
    bad = 0.0 if math.isfinite(loss) else 1.0
    return (distributed.all_sum([bad], device)[0] if distributed.active() else bad) == 0


@torch.inference_mode()
def evaluate(model, loader, precision: Precision, sharded: bool = False) -> Evaluation:
    """Loss, accuracy and every prediction over ``loader`` (class, and probability of the true class);
    ``sharded``: each rank's loader holds its ``distributed.shard`` of the set, and the ranks'
    results are put back in the set's order."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, y_true, y_pred, p_true = 0.0, [], [], []
    for x, y in loader:
        x, y = precision.inputs(x), y.to(precision.device)
        with precision.autocast():
            logits = model(x)
        loss_sum += criterion(logits.float(), y).item()
        y_true += y.tolist()
        y_pred += logits.argmax(1).tolist()
        p_true += logits.float().softmax(1).gather(1, y[:, None])[:, 0].tolist()
    if sharded and distributed.active():
        parts = distributed.all_gather((loss_sum, y_true, y_pred, p_true))
        w = len(parts)
        n = sum(len(p[1]) for p in parts)  # rank r holds samples r, r + w, ...: sample i is rank i % w's (i // w)th
        y_true, y_pred, p_true = ([parts[i % w][k][i // w] for i in range(n)] for k in (1, 2, 3))
        loss_sum = sum(p[0] for p in parts)
    n = len(y_true)
    return Evaluation(loss_sum / n, sum(t == p for t, p in zip(y_true, y_pred)) / n, y_true, y_pred, p_true)


class Trainer:
    """The study's loop: seeded shuffling, one optimizer step per batch, evaluation per epoch.

    Early stopping (``early_stop_patience``) needs no state of its own: it follows from the last
    epoch and the best one, both checkpointed, so a resumed run stops where the uninterrupted one does.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        cfg: TrainConfig,
        device: torch.device,
        progress: bool = True,
        train_eval_set: Dataset | None = None,
        num_classes: int | None = None,
    ):
        self.cfg, self.device, self.progress = cfg, device, progress
        self.precision = Precision(resolve_precision(cfg.precision, device, cfg.image_size, cfg.batch_size), device)
        self.model = model.to(device, memory_format=self.precision.memory_format)
        # Under torchrun, DDP trains it (rank 0's weights to every rank first, gradients averaged
        # every step); self.model stays the plain module that is evaluated, checkpointed and logged.
        self.net = self.model
        if distributed.active():
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model, cfg)
        # Training loss only: evaluate() measures val_loss and train_eval_loss as plain cross entropy.
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        if num_classes is None and isinstance(getattr(model, "fc", None), nn.Linear):
            num_classes = model.fc.out_features
        self.augment = Augment(cfg, num_classes, *normalisation(train_set)) if Augment.wanted(cfg) else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # Under torchrun each rank trains on its share of every epoch's seeded shuffle (batch_size
        # per rank), and evaluates its share of the evaluation sets; their results are combined.
        self.sampler = DistributedSampler(train_set, seed=cfg.seed) if distributed.active() else None
        per_rank = self.sampler.num_samples if self.sampler is not None else len(train_set)
        # BatchNorm cannot train on a batch of one: drop a last batch of exactly one sample.
        drop_last = per_rank % cfg.batch_size == 1 and per_rank > 1
        pin = device.type == "cuda"
        self.train_loader = DataLoader(
            train_set,
            cfg.batch_size,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            generator=self.generator,
            num_workers=cfg.workers,
            drop_last=drop_last,
            pin_memory=pin,
        )
        eval_batch = max(cfg.batch_size, EVAL_BATCH_SIZE)

        def eval_loader(dataset: Dataset) -> DataLoader:
            if distributed.active():
                dataset = Subset(dataset, distributed.shard(len(dataset)))
            return DataLoader(dataset, eval_batch, num_workers=cfg.workers, pin_memory=pin)

        self.val_set, self.val_loader = val_set, eval_loader(val_set)
        # The training images that are evaluated like the validation set after each epoch.
        self.train_eval_loader = eval_loader(train_eval_set) if train_eval_set is not None else None
        self.scheduler = make_scheduler(self.optimizer, cfg, len(self.train_loader))
        self.last_evaluation: Evaluation | None = None
        self.epoch = 0  # last completed epoch
        self.history: list[EpochResult] = []
        self.best_epoch = 0
        self.best_val_acc = 0.0
        self.best_state: dict[str, torch.Tensor] | None = None  # the weights of the best epoch, on the CPU

    def epochs(self) -> Iterator[EpochResult]:
        """One result per epoch trained, up to ``epochs``, or until early stopping ends training."""
        while self.epoch < self.cfg.epochs and not self.stopped_early:
            epoch = self.epoch + 1
            start = time.perf_counter()
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)  # each epoch its own shuffle, the same on every rank
            train_loss, train_acc, lr = train_one_epoch(
                self.net,
                self.train_loader,
                self.optimizer,
                self.precision,
                epoch,
                self.progress,
                criterion=self.criterion,
                scheduler=self.scheduler,
                augment=self.augment,
            )
            distributed.sync_buffers(self.model)
            ev = self.last_evaluation = self._evaluate(self.val_loader)
            tr = self._evaluate(self.train_eval_loader) if self.train_eval_loader else None
            result = EpochResult(
                epoch,
                train_loss,
                train_acc,
                ev.loss,
                ev.acc,
                time.perf_counter() - start,
                tr.loss if tr else math.nan,
                tr.acc if tr else math.nan,
                lr,
            )
            self.epoch = epoch
            self.history.append(result)
            if ev.acc > self.best_val_acc or self.best_epoch == 0:
                self.best_epoch, self.best_val_acc = epoch, ev.acc
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            yield result

    @property
    def stopped_early(self) -> bool:
        """Whether early stopping ended training: val_acc has not risen above its best for
        ``early_stop_patience`` epochs, and epochs were left to train."""
        patience = self.cfg.early_stop_patience
        return patience > 0 and self.epoch < self.cfg.epochs and self.epoch - self.best_epoch >= patience

    @property
    def improved(self) -> bool:
        """Whether the last finished epoch is the best so far."""
        return self.best_epoch == self.epoch > 0

    def evaluate(self) -> Evaluation:
        """The current model on the validation set (that of the last epoch, computed once)."""
        if self.last_evaluation is None:
            self.last_evaluation = self._evaluate(self.val_loader)
        return self.last_evaluation

    def evaluate_best(self) -> Evaluation:
        """The best epoch's weights (``best_state``) on the validation set; the model keeps its own weights."""
        if self.best_state is None or self.best_epoch == self.epoch:
            return self.evaluate()
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.best_state)
        try:
            if not distributed.active():
                return self._evaluate(self.val_loader)
            # Under torchrun only rank 0 records: the whole set here, with no collective the others would wait in.
            loader = DataLoader(self.val_set, self.val_loader.batch_size, num_workers=self.cfg.workers)
            return evaluate(self.model, loader, self.precision)
        finally:
            self.model.load_state_dict(current)

    def _evaluate(self, loader) -> Evaluation:
        return evaluate(self.model, loader, self.precision, sharded=distributed.active())

    def summary(self) -> dict[str, float]:
        """The best epoch (chosen on the validation set, so its val_acc is optimistic) and its numbers;
        ``stopped_epoch``, the last epoch trained, only where early stopping ended training."""
        best = self.history[self.best_epoch - 1] if self.best_epoch else None
        summary = {
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "train_acc_at_best": best.train_acc if best else 0.0,
        }
        if best and not math.isnan(best.train_eval_acc):  # measured only with a train_eval_set
            summary["train_eval_acc_at_best"] = best.train_eval_acc
        if self.stopped_early:
            summary["stopped_epoch"] = self.epoch
        return summary

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "loader": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.augment is not None:
            rng["augment"] = self.augment.generator.get_state()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "history": [asdict(r) for r in self.history],
            "best": self.summary(),
            "best_state": self.best_state,
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
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
        if self.augment is not None:
            self.augment.generator.set_state(state["rng"]["augment"])
