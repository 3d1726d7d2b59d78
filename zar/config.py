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

from .errors import UserError, quote
from .variants import DEPTHS

OPTIMIZERS = ("adamw", "adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 where the hardware has it and it measures faster (zar.learn)
SCHEDULERS = ("none", "cosine", "onecycle")  # of the learning rate, stepped per batch (zar.learn.engine)
AUGMENTS = ("none", "flip", "randaugment")  # of each training image (zar.learn.engine)
MAX_SEED = 2**32 - 1  # what numpy and scikit-learn accept as a seed
SCALARS = (str, int, float, bool)


class ConfigError(UserError):
    pass


# What a key is, said once where it is declared; every list of keys elsewhere is derived from it.
DATA = "data"  # changes the images a run trains and validates on: runs must match in it, a sweep never searches it
TRAINING = "training"  # changes how a run learns from the same data: runs must match in it, a sweep may search it
ARCHITECTURE = "architecture"  # part of the architecture's name (SE-ResNet-18 (r=4)): splits rows by that name
SEED = "seed"  # differs between the runs of one row by design
RUNTIME = "runtime"  # where and how fast a run trains, never what it learns
ROLES = (DATA, TRAINING, ARCHITECTURE, SEED, RUNTIME)


def key(
    default: Any,
    help: str,
    choices: tuple | None = None,
    *,
    role: str = TRAINING,
    bounds: tuple[int, int] | None = None,
    not_searched: str | None = None,
) -> Any:
    """A config field: its default, the help ``--help`` shows, its choices where there are few or
    its inclusive ``bounds`` (a whole number's), and its role.

    ``not_searched``: why a sweep may not search the key; every data, seed and runtime key has one
    (tests/test_config.py holds them to it), a training or architecture key may.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; valid: {', '.join(ROLES)}")
    metadata = {"help": help, "choices": choices, "role": role, "bounds": bounds, "not_searched": not_searched}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = key(1e-3, "learning rate")
    batch_size: int = key(32, "training batch size")
    epochs: int = key(10, "number of training epochs")
    optimizer: str = key("adamw", "optimizer", OPTIMIZERS)
    weight_decay: float = key(1e-4, "weight decay of the optimizer")
    seed: int = key(
        42,
        "training seed: weight init and batch order",
        role=SEED,
        not_searched="the trials share one seed; pass --seeds to train the best configurations with several",
    )
    split_seed: int = key(
        42,
        "seed of the train/validation split, the same for every architecture",
        role=DATA,
        not_searched="every trial must validate on the same images",
    )
    val_ratio: float = key(
        0.2,
        "share of the images held out for validation",
        role=DATA,
        not_searched="every trial must validate on the same images",
    )
    image_size: int = key(
        32,
        "side in pixels that images are resized to",
        role=DATA,
        bounds=(8, 1024),
        not_searched="every trial must train on the same data",
    )
    workers: int = key(
        0,
        "data-loader worker processes",
        role=RUNTIME,
        not_searched="it changes how fast a trial loads data, not what it learns",
    )
    depth: int = key(34, "ResNet depth", DEPTHS, role=ARCHITECTURE)
    se_reduction: int = key(16, "SE reduction ratio r (se, se_mish)", role=ARCHITECTURE, bounds=(1, 64))
    data: str = key(
        "digits",
        "'digits' (embedded), 'synthetic' (tiny, for tests) or an image folder with one sub-folder per class",
        role=DATA,
        not_searched="every trial must train on the same data",
    )
    device: str = key(
        "auto",
        "where to train (auto: cuda when there is a GPU)",
        DEVICES,
        role=RUNTIME,
        not_searched="it changes where a trial runs, not what it learns",
    )
    precision: str = key(
        "auto",
        "arithmetic of training (auto: bf16 where the hardware has it natively and a few timed steps on "
        "this machine say it is faster, else fp32; runs record the one that ran)",
        PRECISIONS,
    )
    skip_bad_images: bool = key(
        False,
        "leave unreadable images out (listed in skipped_images.txt) instead of stopping",
        role=DATA,
        not_searched="every trial must train on the same data",
    )
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
            (
                f.name,
                getattr(self, f.name) in f.metadata["choices"],
                f"must be one of {', '.join(map(str, f.metadata['choices']))}",
            )
            for f in fields(self)
            if f.metadata["choices"]
        ]
        checks += [
            (f.name, lo <= getattr(self, f.name) <= hi, f"must be between {lo} and {hi}")
            for f in fields(self)
            if f.metadata["bounds"]
            for lo, hi in [f.metadata["bounds"]]
        ]
        checks += [
            ("lr", 0 < self.lr < math.inf, "must be > 0 and finite"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "must be >= 0 and finite"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"must be between 0 and {MAX_SEED}"),
            ("split_seed", 0 <= self.split_seed <= MAX_SEED, f"must be between 0 and {MAX_SEED}"),
            ("val_ratio", 0 < self.val_ratio < 1, "must be between 0 and 1 (exclusive)"),
            ("workers", self.workers >= 0, "must be >= 0"),
            ("data", self.data.strip() != "", "must name 'digits', 'synthetic' or an image folder"),
            (
                "warmup_epochs",
                self.warmup_epochs == 0 or self.scheduler != "none",
                "must be 0 with scheduler 'none' (warmup is part of cosine and onecycle)",
            ),
            ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, f"must be >= 0 and below epochs ({self.epochs})"),
            ("early_stop_patience", self.early_stop_patience >= 0, "must be >= 0 (0: off)"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be >= 0 and below 1"),
            ("mixup", 0 <= self.mixup < math.inf, "must be >= 0 and finite (0: off)"),
            ("cutmix", 0 <= self.cutmix < math.inf, "must be >= 0 and finite (0: off)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"config key '{name}' {rule}, got {quote(getattr(self, name))}")

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
ROLE = {f.name: f.metadata["role"] for f in fields(TrainConfig)}
# What zar.learn.data reads: a study's children that agree on these share one load (tests/test_config.py checks).
DATA_KEYS = tuple(k for k, role in ROLE.items() if role == DATA)
# What the runs of one table row must agree on (zar.analysis.table guards it).
MATCHED_KEYS = tuple(k for k, role in ROLE.items() if role in (DATA, TRAINING))
# The keys a sweep may not search, and why (zar.space says it when a search space names one).
NOT_SEARCHED = {
    f.name: f.metadata["not_searched"] for f in fields(TrainConfig) if f.metadata["not_searched"] is not None
}
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
