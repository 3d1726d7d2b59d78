"""The training configuration: one frozen dataclass, loaded from YAML, validated once.

The field names are the public names: YAML keys, ``--option`` names (with dashes),
MLflow params and the columns ``zar compare`` reads all use them. Each field carries its
help text and, where the values are few, its choices: ``zar train --help`` is made from them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ZarError, quote
from .variants import DEPTHS

OPTIMIZERS = ("adamw", "adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 where the hardware has it and it pays (zar.engine)
SCHEDULERS = ("none", "cosine", "onecycle")  # of the learning rate, stepped per batch (zar.engine)
AUGMENTS = ("none", "flip", "randaugment")  # of each training image (zar.engine)
MAX_SEED = 2**32 - 1  # what numpy and scikit-learn accept as a seed
SCALARS = (str, int, float, bool)


class ConfigError(ZarError):
    pass


def key(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field: its default, the help ``--help`` shows, and its choices where there are few."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    lr: float = key(1e-3, "learning rate")
    batch_size: int = key(32, "training batch size")
    epochs: int = key(10, "number of training epochs")
    optimizer: str = key("adamw", "optimizer", OPTIMIZERS)
    weight_decay: float = key(1e-4, "weight decay of the optimizer")
    seed: int = key(42, "training seed: weight init and batch order")
    split_seed: int = key(42, "seed of the train/validation split, the same for every architecture")
    val_ratio: float = key(0.2, "share of the images held out for validation")
    image_size: int = key(32, "side in pixels that images are resized to")
    workers: int = key(0, "data-loader worker processes")
    depth: int = key(34, "ResNet depth", DEPTHS)
    se_reduction: int = key(16, "SE reduction ratio r (se, se_mish)")
    data: str = key(
        "digits", "'digits' (embedded), 'synthetic' (tiny, for tests) or an image folder with one sub-folder per class"
    )
    device: str = key("auto", "where to train (auto: cuda when there is a GPU)", DEVICES)
    precision: str = key(
        "fp32", "arithmetic of training (auto: bf16 where the hardware has it and it pays)", PRECISIONS
    )
    skip_bad_images: bool = key(False, "leave unreadable images out (listed in skipped_images.txt) instead of stopping")
    # Options for longer runs; each default is the study's (all off), which trains exactly as before they existed.
    scheduler: str = key(
        "none",
        "learning-rate schedule, stepped after every batch: none (constant lr), cosine (linear warmup over "
        "warmup_epochs from lr/100, then cosine decay to 0 at the last batch) or onecycle (torch's OneCycleLR "
        "peaking at lr, pct_start = warmup_epochs / epochs); metric 'lr' is each epoch's last batch's",
        SCHEDULERS,
    )
    warmup_epochs: int = key(0, "epochs of linear lr warmup (cosine) or of rise (onecycle); 0 with scheduler none")
    early_stop_patience: int = key(
        0,
        "stop once val_acc has not risen above its best for this many epochs (0: off); "
        "metric 'stopped_epoch' is then the last epoch trained",
    )
    label_smoothing: float = key(
        0.0, "label smoothing of the training loss, in [0, 1); val_loss and train_eval_loss stay plain cross entropy"
    )
    augment: str = key(
        "none",
        "augmentation of each training image: none, flip (horizontal, half the images; wrong for digits and "
        "text) or randaugment (torchvision RandAugment, 2 ops of magnitude 9 per image)",
        AUGMENTS,
    )
    mixup: float = key(0.0, "MixUp alpha for training batches (0: off; with cutmix, one of the two per batch)")
    cutmix: float = key(0.0, "CutMix alpha for training batches (0: off; with mixup, one of the two per batch)")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float":
                object.__setattr__(self, f.name, _as_float(value))
        _check_types(self)
        checks = [
            ("lr", 0 < self.lr < math.inf, "must be > 0 and finite"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "must be >= 0 and finite"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"must be between 0 and {MAX_SEED}"),
            ("split_seed", 0 <= self.split_seed <= MAX_SEED, f"must be between 0 and {MAX_SEED}"),
            ("val_ratio", 0 < self.val_ratio < 1, "must be between 0 and 1 (exclusive)"),
            ("image_size", 8 <= self.image_size <= 1024, "must be between 8 and 1024"),
            ("workers", self.workers >= 0, "must be >= 0"),
            ("depth", self.depth in DEPTHS, f"must be one of {', '.join(map(str, DEPTHS))}"),
            ("se_reduction", 1 <= self.se_reduction <= 64, "must be between 1 and 64"),
            ("data", self.data.strip() != "", "must name 'digits', 'synthetic' or an image folder"),
            ("device", self.device in DEVICES, f"must be one of {', '.join(DEVICES)}"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("scheduler", self.scheduler in SCHEDULERS, f"must be one of {', '.join(SCHEDULERS)}"),
            (
                "warmup_epochs",
                self.warmup_epochs == 0 or self.scheduler != "none",
                "must be 0 with scheduler 'none' (warmup is part of cosine and onecycle)",
            ),
            ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, f"must be >= 0 and below epochs ({self.epochs})"),
            ("early_stop_patience", self.early_stop_patience >= 0, "must be >= 0 (0: off)"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be >= 0 and below 1"),
            ("augment", self.augment in AUGMENTS, f"must be one of {', '.join(AUGMENTS)}"),
            ("mixup", 0 <= self.mixup < math.inf, "must be >= 0 and finite (0: off)"),
            ("cutmix", 0 <= self.cutmix < math.inf, "must be >= 0 and finite (0: off)"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {rule}, got {quote(getattr(self, key))}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **overrides})


def _as_float(value: Any) -> Any:
    """Ints are floats; so is YAML 1.1's ``1e-3``, which PyYAML reads as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
PY_TYPES = {"float": (float,), "int": (int,), "str": (str,), "bool": (bool,)}


def _check_types(cfg: TrainConfig) -> None:
    for name, type_name in FIELD_TYPES.items():
        value = getattr(cfg, name)
        wanted = PY_TYPES[type_name]
        if not isinstance(value, wanted) or (type_name != "bool" and isinstance(value, bool)):
            raise ConfigError(f"config key '{name}' must be {type_name}, got {type(value).__name__} {quote(value)}")


def from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must be a mapping of keys to values, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELD_TYPES), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {quote(unknown[0])} in {source}; valid: {', '.join(FIELD_TYPES)}")
    for name, value in values.items():
        if not isinstance(value, SCALARS):  # a list or mapping: said by its type, never printed whole
            raise ConfigError(
                f"config key '{name}' in {source} must be a single {FIELD_TYPES[name]}, "
                f"got {'nothing' if value is None else 'a ' + type(value).__name__}"
            )
    return TrainConfig(**values)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file's keys, then single-key overrides (``None`` means unset)."""
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read params file {path}: {e.strerror or e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
            values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(values, source)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
