"""The command line's shared options: one ``--key`` per config field, made from the config's own metadata.

Help, choices, bounds and defaults are the config's (zar.config.key); a command that takes a few
keys on their own (``zar bench``) takes them through ``config_option`` from the same metadata.
"""

from __future__ import annotations

import functools
from dataclasses import fields

import click

from ..checks import check_model_name
from ..config import TrainConfig, load_config
from ..errors import quote
from ..tracking.store import DEFAULT_EXPERIMENT
from ..variants import VARIANTS

CLICK_TYPES = {"int": click.INT, "float": click.FLOAT, "str": click.STRING}
FIELDS = {f.name: f for f in fields(TrainConfig)}


def config_options(fn):
    """One ``--key`` option per config field (``--key_name`` too, as ``mlflow run`` passes extra -P)."""
    for f in reversed(fields(TrainConfig)):
        dashed, under = f"--{f.name.replace('_', '-')}", f"--{f.name}"
        names = [dashed] if dashed == under else [dashed, under]
        text, choices = f.metadata["help"], f.metadata["choices"]
        text = text[0].upper() + text[1:]
        if f.type == "bool":  # a flag; the underscore spelling takes a value, as `mlflow run -P key=true` passes it
            fn = click.option(under, f"{f.name}_value", type=click.BOOL, default=None, hidden=True)(fn)
            option = click.option(dashed, f.name, is_flag=True, default=None, help=f"{text}.")
        else:
            # Choices of text are click's to refuse; numbers (depth) are the config's, with its message.
            kind = click.Choice(choices) if choices and f.type == "str" else CLICK_TYPES[f.type]
            among = f"{', '.join(map(str, choices))}; " if choices and f.type != "str" else ""
            option = click.option(*names, f.name, type=kind, default=None, help=f"{text} ({among}default {f.default}).")
        fn = option(fn)
    fn = click.option(
        "--params",
        "params_file",
        type=click.Path(dir_okay=False),
        help="YAML file of config keys (e.g. params/seed.yaml); options override it.",
    )(fn)

    @functools.wraps(fn)
    def wrapper(params_file, **kwargs):
        overrides = {f.name: kwargs.pop(f.name) for f in fields(TrainConfig)}
        for f in fields(TrainConfig):
            if f.type == "bool":
                value = kwargs.pop(f"{f.name}_value")
                overrides[f.name] = overrides[f.name] if value is None else value

        def cfg_loader():
            return load_config(params_file, overrides)

        # What the user set, so that a command can refuse options it would otherwise ignore.
        cfg_loader.given = [k for k, v in overrides.items() if v is not None] + (["params"] if params_file else [])
        return fn(cfg_loader=cfg_loader, **kwargs)

    return wrapper


def config_option(name: str, help: str | None = None):
    """``--name`` for one config key, as a command that is not a training run takes it (``zar bench``):
    the key's default, choices or bounds and help, validated by click."""
    f = FIELDS[name]
    choices, bounds = f.metadata["choices"], f.metadata["bounds"]
    if choices:
        kind, default = click.Choice([str(c) for c in choices]), str(f.default)
    else:
        kind, default = (click.IntRange(*bounds) if bounds else CLICK_TYPES[f.type]), f.default
    text = help or f.metadata["help"][0].upper() + f.metadata["help"][1:] + "."
    return click.option(f"--{name.replace('_', '-')}", name, type=kind, default=default, show_default=True, help=text)


experiment_option = click.option(
    "--experiment",
    default=DEFAULT_EXPERIMENT,
    show_default=True,
    help="MLflow experiment to write runs to and read them from.",
)
filter_option = click.option(
    "--filter", "filter_string", metavar="FILTER", help="MLflow search filter, e.g. \"params.epochs = '10'\"."
)
no_progress_option = click.option("--no-progress", is_flag=True, help="No progress bar, only one line per epoch.")


def _model_name(ctx, param, value):
    if value is not None:
        check_model_name(value)
    return value


def register_option(what: str):
    """``--register NAME``: put the model of ``what`` in MLflow's Model Registry (zar.registry)."""
    return click.option(
        "--register",
        metavar="NAME",
        callback=_model_name,
        help=f"Register {what} in MLflow's Model Registry as a new version of NAME (models:/NAME/<version>).",
    )


def comma_list(kind):
    """A callback that reads ``a,b,c`` as a list of ``kind``."""

    def parse(ctx, param, value):
        if value is None:
            return []
        try:
            return [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(
                f"expected a comma-separated list of {kind.__name__}s, got {quote(value)}"
            ) from None

    return parse


def models_option(verb: str):
    """``--models``: the architectures to ``verb``, every one by default."""
    return click.option(
        "--models",
        default=",".join(VARIANTS),
        show_default=True,
        callback=comma_list(str),
        help=f"Comma-separated architectures to {verb}.",
    )


def baseline_values(specs) -> dict[str, str]:
    """``--baseline-value KEY=V`` options as {key: value}."""
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip() or "," in value:
            raise click.BadParameter(
                f"expected KEY=VALUE (one value), got {quote(spec)}", param_hint="--baseline-value"
            )
        if key in out:
            raise click.BadParameter(f"{key} is given twice", param_hint="--baseline-value")
        out[key] = value.strip()
    return out


def verdict_options(fn):
    """``--margin`` and ``--stats``: how each comparison's verdict is made (zar.analysis.verdicts)."""
    fn = click.option(
        "--stats",
        type=click.Choice(["bootstrap", "welch"]),
        default="bootstrap",
        show_default=True,
        help="bootstrap: paired over seeds and validation images, where runs logged per-image predictions "
        "(else Welch); welch: over seeds alone.",
    )(fn)
    return click.option(
        "--margin",
        type=click.FloatRange(0, 100, min_open=True, max_open=True),
        metavar="PP",
        help="Equivalence margin δ in points of val accuracy: 'equivalent (±δ)' when the 90% interval lies "
        "inside ±δ.  [default: the study's, else 1]",
    )(fn)
