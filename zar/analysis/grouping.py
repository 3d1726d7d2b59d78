"""Which runs share a row of the table, what the row is called and where it stands, and the guard
that says (or, strict, refuses) when runs differ in more than the architecture and the seed.

A row holds runs of one display name and depth that agree on every ``GUARDED`` setting and on
each ``group_by`` param; ``check_comparable`` turns any other difference into a warning.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from ..errors import UserError
from ..variants import VARIANTS
from .fetch import GUARDED, RunRow, param_value


def check_comparable(rows: list[RunRow], strict: bool, group_by: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Why the table may mislead, as warnings; with ``strict`` the first reason refuses the table.

    Runs that differ in a guarded setting never share a row; without ``strict`` they get rows
    of their own, named by the settings that differ. A ``group_by`` key is meant to differ: it
    is never a reason.
    """
    warnings = []
    differing = differing_hparams(rows, group_by)
    if differing:
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in differing.items())
        if strict:
            raise UserError(f"runs are not comparable, they differ in {detail}")
        warnings.append(
            f"runs differ in more than model and seed: {detail} (split into rows named by {', '.join(differing)})"
        )
    repeated = repeated_seeds(rows, group_by)
    if repeated:
        message = f"runs repeat a seed, so they are not independent samples: {', '.join(repeated)}"
        if strict:
            raise UserError(message)
        warnings.append(f"{message} (pick them apart with --parent or --filter)")
    return warnings


def differing_hparams(rows: list[RunRow], group_by: list[str] | tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Hyperparameters that are not the same across all runs: one row must not average them.

    ``group_by`` keys are left out: rows are split by them on purpose, and labelled with them.
    """
    out = {}
    for key in (k for k in GUARDED if k not in group_by):
        values = sorted({r.hparams.get(key, "") for r in rows})
        if len(values) > 1:
            out[key] = values
    return out


def repeated_seeds(rows: list[RunRow], group_by=()) -> list[str]:
    """Rows holding several runs of one seed: same config, same seed, so not independent samples."""
    names = labels(rows, group_by)
    counts = Counter((names[row_key(r, group_by)], r.seed) for r in rows if r.seed)
    return [f"{label} seed {seed} x{n}" for (label, seed), n in counts.items() if n > 1]


def check_group_by(rows: list[RunRow], group_by) -> None:
    """A --group-by key must be a param some run records; 'model' splits rows already."""
    for key in group_by:
        if key == "model":
            raise UserError("--group-by model: rows are one per architecture already")
        if not any(param_value(r, key) for r in rows):
            raise UserError(f"--group-by {key}: no run in this table records a param {key!r}")


def _settings(r: RunRow, group_by=()) -> tuple[str, ...]:
    return tuple(r.hparams.get(k, "") for k in GUARDED if k not in group_by)


def _group(r: RunRow, group_by) -> tuple[str, ...]:
    return tuple(param_value(r, k) for k in group_by)


def row_key(r: RunRow, group_by=()) -> tuple:
    """What one row of the table holds: one display name, depth, set of settings and group values."""
    return (r.name, r.depth, _settings(r, group_by), _group(r, group_by))


def base_name(name: str, group_by=()) -> str:
    """The display name, less its SE reduction when the label names se_reduction itself: never twice."""
    return re.sub(r" \(r=\d+\)$", "", name) if "se_reduction" in group_by else name


def run_label(r: RunRow, group_by=()) -> str:
    """A run's name with its group values, e.g. 'SE-ResNet-34 (se_reduction=4)'."""
    shown = ", ".join(f"{k}={param_value(r, k) or 'unrecorded'}" for k in group_by)
    return f"{base_name(r.name, group_by)} ({shown})" if shown else r.name


def labels(rows: list[RunRow], group_by=()) -> dict[tuple, str]:
    """Each row's label: its display name, plus its group values and the settings that differ within the table."""
    differing = list(differing_hparams(rows, group_by))
    out = {}
    for r in rows:
        shown = [f"{k}={v or 'unrecorded'}" for k, v in zip(group_by, _group(r, group_by))]
        shown += [f"{k}={r.hparams.get(k, '') or 'unrecorded'}" for k in differing]
        name = base_name(r.name, group_by)
        out[row_key(r, group_by)] = f"{name} ({', '.join(shown)})" if shown else name
    repeated = {label for label, n in Counter(out.values()).items() if n > 1}  # a name without its depth
    return {
        key: (f"{label[:-1]}, depth={key[1]})" if label.endswith(")") else f"{label} (depth={key[1]})")
        if label in repeated
        else label
        for key, label in out.items()
    }


def _natural(text: str) -> tuple:
    """Numbers in text sort as numbers: 'r=4' before 'r=16'."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


def numeric(values: tuple[str, ...]) -> tuple:
    """Group values in numeric order where they are numbers (lr 1e-05 before 0.001), else as text."""
    out = []
    for v in values:
        try:
            out.append((0, float(v), ""))
        except ValueError:
            out.append((1, 0.0, v))
    return tuple(out)


def _order(model: str) -> int:
    order = list(VARIANTS)
    return order.index(model) if model in order else len(order)


def sort_key(r: RunRow, group_by) -> tuple:
    """The study's order of architectures, then depth, then group values and SE reduction as numbers, then the rest."""
    name = base_name(r.name, ["se_reduction"])  # 'SE-ResNet-34 (r=4)' before 'SE-ResNet-34' (r=16)
    by_number = numeric((*_group(r, group_by), param_value(r, "se_reduction")))
    return (_order(r.model), r.depth, _natural(name), by_number, _natural(r.name), _settings(r))


def as_tuned(rows: list[RunRow], tuned) -> list[RunRow]:
    """Rows whose ``tuned`` settings no longer split them from their baseline; each architecture must have one."""
    if not tuned:
        return rows
    for model in dict.fromkeys(r.model for r in rows):
        settings = {tuple(param_value(r, k) for k in tuned) for r in rows if r.model == model}
        if len(settings) > 1:
            raise UserError(f"runs of {model} differ in {', '.join(tuned)}: a row must hold one configuration")
    return [replace(r, hparams={k: "tuned" if k in tuned else v for k, v in r.hparams.items()}) for r in rows]
