"""A sweep's search space as data: read from YAML and checked without torch, MLflow or Optuna.

Each key is a config key; its value names a distribution::

    lr: {log_uniform: [1.0e-4, 1.0e-2]}
    weight_decay: {log_uniform: [1.0e-5, 1.0e-2]}
    label_smoothing: {uniform: [0.0, 0.2]}
    warmup_epochs: {int: [0, 2]}
    batch_size: {choice: [16, 32, 64]}

Every value a distribution can take is checked as a config value before any trial runs (the
bounds of a range, each choice), so a typo costs no run. ``suggest`` asks an Optuna trial for one
value per key; it takes the trial as given and never imports Optuna.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import FIELD_TYPES, NOT_SEARCHED, ConfigError, TrainConfig
from .errors import clip, quote
from .variants import VARIANTS

KINDS = ("log_uniform", "uniform", "int", "choice")
METHODS = ("tpe", "grid")  # Optuna's TPESampler and GridSampler
# Keys that change only some architectures: the others' studies leave them out.
APPLIES = {"se_reduction": lambda variant: variant.attn == "se"}


@dataclass(frozen=True)
class Dim:
    """One searched key: a range (log_uniform, uniform, int) or a list of choices."""

    key: str
    kind: str
    values: tuple  # (low, high) for a range, the choices for 'choice'

    def describe(self) -> str:
        return f"{self.key}: {self.kind} {list(self.values)}"


def load_space(path: str | Path, base: TrainConfig) -> list[Dim]:
    """The space in ``path``, each value checked as a config value on top of ``base``."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read search space {clip(path)}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"search space {clip(path)} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_space(raw, base, source=str(path))


def parse_space(raw: Any, base: TrainConfig, source: str = "search space") -> list[Dim]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source} must map config keys to distributions, e.g. lr: {{log_uniform: [1e-4, 1e-2]}}")
    dims = []
    for key, spec in raw.items():
        if key not in FIELD_TYPES:
            raise ConfigError(f"{source}: unknown config key {quote(key)}; valid: {', '.join(FIELD_TYPES)}")
        if key in NOT_SEARCHED:
            raise ConfigError(f"{source}: {key} cannot be searched: {NOT_SEARCHED[key]}")
        dims.append(_dim(key, spec, base, source))
    return dims


def _dim(key: str, spec: Any, base: TrainConfig, source: str) -> Dim:
    where = f"{source}: {key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where} must be one of {', '.join(f'{{{k}: [...]}}' for k in KINDS)}, got {quote(spec)}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} takes a list, got {quote(values)}")
    kind_of_key = FIELD_TYPES[key]
    if kind != "choice":
        if len(values) != 2:
            raise ConfigError(f"{where}: {kind} takes [low, high], got {quote(values)}")
        wanted = "int" if kind == "int" else "float"
        if kind_of_key != wanted:
            raise ConfigError(f"{where} is a {kind_of_key} key: {kind} is for {wanted} keys; use choice")
        low, high = (_number(v, where) for v in values)
        if not low < high:
            raise ConfigError(f"{where}: {kind} needs low < high, got {quote(values)}")
        if kind == "log_uniform" and low <= 0:
            raise ConfigError(f"{where}: log_uniform needs low > 0, got {low}")
        if kind == "int" and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: int takes whole numbers, got {quote(values)}")
        values = [low, high]
    checked = []
    for value in values:  # every choice, and a range's ends, checked as the config checks it
        try:
            checked.append(getattr(base.replace(**{key: value}), key))  # as the config reads it: '1e-3' is 0.001
        except ConfigError as e:
            raise ConfigError(f"{where}: {quote(value)} is no valid value ({e})") from None
    _check_distinct(where, values, checked)
    return Dim(key, kind, tuple(checked))


def _check_distinct(where: str, written: list, checked: list) -> None:
    """Choices equal as the config reads them (0.001 and 1e-3) would be one grid point taken twice."""
    for i, value in enumerate(checked):
        if value in checked[:i]:
            first = written[checked.index(value)]
            same = f" ({quote(first)} and {quote(written[i])} are the same value)" if first != written[i] else ""
            raise ConfigError(f"{where}: choice names {quote(value)} twice{same}; drop one")


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {quote(value)} is not a number")
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            raise ConfigError(f"{where}: {quote(value)} is not a number") from None
    return value


def applies(key: str, model: str) -> bool:
    """Whether ``key`` changes ``model``: se_reduction only where there is SE."""
    return model not in VARIANTS or APPLIES.get(key, lambda v: True)(VARIANTS[model])


def dims_for(space: list[Dim], model: str) -> list[Dim]:
    """The keys a search of ``model`` varies."""
    return [d for d in space if applies(d.key, model)]


def grid(space: list[Dim]) -> dict[str, list]:
    """The space as a grid (``--method grid``): every key must be a choice."""
    ranges = [d.key for d in space if d.kind != "choice"]
    if ranges:
        raise ConfigError(
            f"--method grid needs every key of the space as a choice; {', '.join(ranges)} "
            "is a range (write its values as {choice: [...]}, or use --method tpe)"
        )
    return {d.key: list(d.values) for d in space}


def check_method(method: str, space: list[Dim], models: list[str], trials: int) -> None:
    """A grid must be all choices, and hold at least ``trials`` points for each architecture."""
    if method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}; valid: {', '.join(METHODS)}")
    if method != "grid":
        return
    grid(space)
    for model in models:
        points = grid_size(dims_for(space, model))
        if trials > points:
            raise ConfigError(f"--trials {trials}: the grid has {points} points for {model}; pass --trials {points}")


def grid_size(space: list[Dim]) -> int:
    size = 1
    for d in space:
        size *= len(d.values)
    return size


def suggest(trial, space: list[Dim]) -> dict[str, Any]:
    """One value per key from an Optuna trial (``trial.suggest_*``), as config values."""
    values = {}
    for d in space:
        if d.kind == "choice":
            values[d.key] = trial.suggest_categorical(d.key, list(d.values))
        elif d.kind == "int":
            values[d.key] = trial.suggest_int(d.key, *d.values)
        else:
            values[d.key] = trial.suggest_float(d.key, *d.values, log=d.kind == "log_uniform")
    return values


def as_dict(space: list[Dim]) -> dict[str, dict[str, list]]:
    """The space as the YAML wrote it: what the sweep records and hashes."""
    return {d.key: {d.kind: list(d.values)} for d in space}
