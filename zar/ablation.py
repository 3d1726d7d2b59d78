"""Ablations as data: ``--vary KEY=V1,V2`` parsed and checked without torch or MLflow.

A study with ``--vary`` trains one child per model, combination of the varied values and seed;
each child's config is the study's with that combination applied (``cfg.replace``). Every
combination is built, and so validated, before any run starts: a bad key or value costs no run.
Several ``--vary`` options make a grid; ``;`` separates keys within one (``lr=0.1,0.01;depth=18,34``),
as ``mlflow run -P vary=...`` passes a single string, and as the study run records it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from .config import FIELD_TYPES, ConfigError, TrainConfig
from .errors import clip, quote

# What --vary refuses, and the option that varies it instead.
NOT_VARIED = {"seed": "--seeds", "model": "--models"}
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def parse_vary(specs: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """``["se_reduction=2,4", "lr=0.1,0.01"]`` -> ``{"se_reduction": [2, 4], "lr": [0.1, 0.01]}``.

    Values are read as the key's type; a key named twice, a repeated value, an unknown key, or
    ``seed``/``model`` (varied by --seeds and --models) is a ConfigError naming it.
    """
    vary: dict[str, list[Any]] = {}
    for spec in (part for s in specs for part in s.split(";")):
        if not spec.strip():
            continue  # 'mlflow run' passes --vary '' when nothing varies
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--vary takes KEY=V1,V2,..., got {quote(spec)}")
        if key in NOT_VARIED:
            raise ConfigError(f"--vary {key}: vary the {key} with {NOT_VARIED[key]}, not --vary")
        if key not in FIELD_TYPES:
            raise ConfigError(f"--vary: unknown config key {quote(key)}; valid: {', '.join(FIELD_TYPES)}")
        if key in vary:
            raise ConfigError(f"--vary names {key} twice; list its values once: {key}=V1,V2")
        raw = [v.strip() for v in values.split(",")]
        if any(v == "" for v in raw):
            raise ConfigError(f"--vary {key}: an empty value in {quote(values)}")
        parsed = [_value(key, v) for v in raw]
        repeated = sorted({str(v) for v in parsed if parsed.count(v) > 1})
        if repeated:
            raise ConfigError(f"--vary {key} names {clip(', '.join(repeated))} more than once; each must appear once")
        vary[key] = parsed
    return vary


def _value(key: str, text: str) -> Any:
    kind = FIELD_TYPES[key]
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"--vary {key}: {quote(text)} is not {'an' if kind == 'int' else 'a'} {kind}") from None
    if kind == "bool":
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ConfigError(f"--vary {key}: {quote(text)} is not true or false")
    return text


def describe(vary: dict[str, list[Any]]) -> str:
    """The spec as one string, as parse_vary reads it back: ``se_reduction=2,4;lr=0.1,0.01``."""
    return ";".join(f"{key}={','.join(map(str, values))}" for key, values in vary.items())


def combinations(vary: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the varied values, in the order given (one empty one when nothing varies)."""
    return [dict(zip(vary, values)) for values in itertools.product(*vary.values())]


@dataclass(frozen=True)
class Child:
    """One run of a study: an architecture, its config, and which varied values made it."""

    model: str
    cfg: TrainConfig
    varied: tuple[tuple[str, Any], ...] = ()
    resume: str | None = None  # the run an interrupted attempt left, continued from its checkpoint
    job: str | None = None  # the Slurm job an earlier attempt submitted, still queued or running it

    @property
    def key(self) -> tuple[str, ...]:
        """What tells this child's run from its siblings', as its params record it."""
        return (self.model, str(self.cfg.seed), *(str(getattr(self.cfg, k)) for k, _ in self.varied))

    @property
    def label(self) -> str:
        """How messages name it: ``se seed 42``, or ``se se_reduction=4 seed 42`` in an ablation."""
        return " ".join([self.model, *(f"{k}={v}" for k, v in self.varied), f"seed {self.cfg.seed}"])


def plan(models: list[str], seeds: list[int], cfg: TrainConfig, vary: dict[str, list[Any]]) -> list[Child]:
    """The study's runs: a child per model, combination and seed, each config validated now (a
    ConfigError names the combination)."""
    configs = []
    for combo in combinations(vary):
        for seed in seeds:
            try:
                configs.append((combo, cfg.replace(**combo, seed=seed)))
            except ConfigError as e:
                where = " ".join(f"{k}={v}" for k, v in combo.items())
                raise ConfigError(f"--vary {where}: {e}" if where else str(e)) from None
    return [Child(model, c, tuple(combo.items())) for model in models for combo, c in configs]
