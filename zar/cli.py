"""The ``zar`` command line: models, train, study, sweep, compare, report, bench, runs, ui."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlparse

import click

from .ablation import children, parse_vary
from .checks import check_data_path, check_study, known_model
from .config import DEVICES, TrainConfig, load_config
from .errors import ZarException, quote
from .tracking.store import DEFAULT_EXPERIMENT, probe_server
from .variants import DEPTHS, VARIANTS

# torch and MLflow take seconds to import: commands import what they use when they run, and
# check first everything a user can get wrong that needs neither (zar.checks), so that a typo
# costs no wait.

CLICK_TYPES = {"int": click.INT, "float": click.FLOAT, "str": click.STRING}
DEFAULT_BASELINE = "resnet"  # zar.analysis.table's, which loads MLflow


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


experiment_option = click.option(
    "--experiment",
    default=DEFAULT_EXPERIMENT,
    show_default=True,
    help="MLflow experiment to write runs to and read them from.",
)
no_progress_option = click.option("--no-progress", is_flag=True, help="No progress bar, only one line per epoch.")


class ZarGroup(click.Group):
    """Every error is one line on stderr and a non-zero exit, never a traceback or a usage dump.

    It also closes the run that ``mlflow run`` created when zar fails before adopting it.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `zar`: the help, not an error
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "zar"
            message, exit_code = f"{e.format_message()} (see '{where} --help')", e.exit_code
        except click.ClickException as e:
            message, exit_code = e.format_message(), e.exit_code
        except ZarException as e:
            message, exit_code = str(e), e.exit_code
        except click.Abort:
            message, exit_code = "aborted", 130
        except Exception as e:  # not a user mistake: still one line (ZAR_DEBUG=1 shows the traceback)
            if os.environ.get("ZAR_DEBUG"):
                raise
            message, exit_code = f"{type(e).__name__}: {e}".splitlines()[0], 1
        else:
            sys.exit(code if isinstance(code, int) else 0)
        message = hide_password(message)
        if os.environ.get("MLFLOW_RUN_ID"):  # still set: zar failed before it adopted that run
            from .tracking.runs import fail_env_run

            fail_env_run(message)
        click.echo(f"Error: {message}", err=True)
        sys.exit(exit_code)


def hide_password(text: str) -> str:
    """``text`` with the tracking URI's password masked, wherever a library's message repeated it."""
    password = urlparse(os.environ.get("MLFLOW_TRACKING_URI", "")).password
    return text.replace(password, "***") if password else text


@click.group(cls=ZarGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="zar")
@click.pass_context
def cli(ctx):
    """zar: run and compare image-classifier architecture studies on MLflow.

    Runs go to MLFLOW_TRACKING_URI, or to ./mlflow.db (artifacts in ./mlruns) when it is unset.
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1" and ctx.invoked_subcommand != "train":  # each rank would make runs of its own
        raise click.UsageError(
            f"torchrun started {world} processes, and only 'zar train' trains as one of several; "
            f"run 'zar {ctx.invoked_subcommand}' without torchrun"
        )


@cli.command()
@click.option("--depth", type=click.Choice([str(d) for d in DEPTHS]), default=str(DEPTHS[-1]), show_default=True)
@click.option("--num-classes", type=click.IntRange(min=1), default=10, show_default=True)
def models(depth, num_classes):
    """List the architectures and their parameter counts."""
    from .models import build_model, count_params

    depth = int(depth)
    click.echo("| model | architecture | parameters |\n| --- | --- | ---: |")
    for name, variant in VARIANTS.items():
        n = count_params(build_model(name, depth, num_classes))["params_total"]
        click.echo(f"| {name} | {variant.display_name(depth)} | {n:,} |")


@cli.command()
@click.option("--model", "model_name", help=f"Architecture: {', '.join(VARIANTS)}.  [default: resnet]")
@config_options
@experiment_option
@click.option(
    "--resume",
    "resume_run",
    metavar="RUN_ID",
    help="Continue this stopped run from its last checkpoint (other options are taken from it).",
)
@click.option(
    "--parent-run",
    metavar="RUN_ID",
    hidden=True,
    help="Train as a child of this study run (how 'zar study --jobs' starts its children).",
)
@no_progress_option
def train(model_name, cfg_loader, experiment, resume_run, parent_run, no_progress):
    """Train one architecture and record the run in MLflow."""
    if resume_run:
        ignored = cfg_loader.given + (["model"] if model_name else [])
        if ignored:
            raise click.UsageError(
                f"--resume continues a run with its own settings; drop "
                f"{', '.join('--' + k.replace('_', '-') for k in ignored)}"
            )
    else:
        cfg = cfg_loader()
        model_name = known_model(model_name or "resnet").name
        check_data_path(cfg.data)
    probe_server()  # before torch and MLflow load: a dead server is reported in a second
    from . import tracking, training
    from .distributed import close

    try:
        if resume_run:
            result = training.resume(resume_run, progress=not no_progress)
        else:
            result = training.train(model_name, cfg, experiment, progress=not no_progress, parent_run_id=parent_run)
    finally:
        close()  # under torchrun: leave the process group
    if result is not None:  # None: a torchrun rank other than 0, which records nothing
        click.echo(f"Run: {tracking.runs_url(result.experiment_id, result.run_id)}{_ui_hint()}")


def _csv(kind):
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
        callback=_csv(str),
        help=f"Comma-separated architectures to {verb}.",
    )


@cli.command()
@models_option("train")
@click.option(
    "--seeds",
    callback=_csv(int),
    help="Comma-separated training seeds; several give mean ± std per architecture.  [default: --seed]",
)
@click.option(
    "--baseline",
    help="Architecture the others are compared to.  [default: resnet when among --models, else none]",
)
@click.option(
    "--vary",
    "vary_specs",
    multiple=True,
    metavar="KEY=V1,V2",
    help="Ablation: train each model and seed once per value of this config key, e.g. "
    "--vary se_reduction=2,4,8,16,32; several --vary make a grid. The table gets a row per value.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train up to this many children at once, each in its own process (one GPU each where "
    "there are several; the CPU cores split between them).",
)
@config_options
@experiment_option
@no_progress_option
def study(models, seeds, baseline, vary_specs, jobs, cfg_loader, experiment, no_progress):
    """Run the whole study and print its table.

    Every architecture and seed (and, with --vary, every combination of the varied values) trains
    as a child of one parent run, which keeps the table and charts.
    """
    cfg = cfg_loader()
    seeds = seeds or [cfg.seed]
    vary = parse_vary(vary_specs)
    both = [k for k in vary if k in cfg_loader.given]
    if both:
        raise click.UsageError(f"--{both[0].replace('_', '-')} and --vary {both[0]} both set {both[0]}; drop one")
    _check_study(models, seeds, baseline, cfg, vary)
    probe_server()  # before torch and MLflow load: a dead server is reported in a second
    from . import tracking
    from .study import run_study

    result = run_study(models, seeds, cfg, experiment, baseline, progress=not no_progress, jobs=jobs, vary=vary)
    click.echo(f"\nStudy run: {tracking.runs_url(result.experiment_id, result.run_id)}")
    click.echo(f"All runs:  {tracking.runs_url(result.experiment_id)}{_ui_hint()}")


def _check_study(models, seeds, baseline, cfg, vary) -> None:
    """What run_study would refuse, in its order, before torch loads (run_study checks again for other callers)."""
    if not models:
        raise click.BadParameter("needs at least one model", param_hint="--models")
    check_study(models, baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in models else models[0]), seeds)
    for data in dict.fromkeys(kid.cfg.data for kid in children(models[:1], seeds, cfg, vary)):  # each config checked
        check_data_path(data)


@cli.command()
@models_option("search")
@click.option(
    "--space",
    "space_file",
    type=click.Path(dir_okay=False),
    required=True,
    help="YAML search space, e.g. params/sweep-space.yaml: lr: {log_uniform: [1e-4, 1e-2]}, "
    "batch_size: {choice: [16, 32, 64]}, ... (also uniform and int ranges).",
)
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True, help="Trials per architecture.")
@click.option(
    "--method",
    type=click.Choice(["tpe", "grid"]),
    default="tpe",
    show_default=True,
    help="Optuna's TPE sampler (seeded with --seed), or every point of a grid of choices in seeded random order.",
)
@click.option(
    "--seeds",
    callback=_csv(int),
    help="Then train each architecture's best configuration with these seeds, for mean ± std.",
)
@click.option(
    "--storage",
    metavar="URL",
    help="Optuna storage (sqlite:///..., postgresql://...) shared by workers.  [default: optuna.db beside "
    "MLflow's SQLite store]",
)
@click.option(
    "--startup-trials",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Trials per architecture that always run to the end before the median pruner may stop one.",
)
@config_options
@experiment_option
@no_progress_option
def sweep(models, space_file, trials, method, seeds, storage, startup_trials, cfg_loader, experiment, no_progress):
    """Search hyperparameters with the same budget for every architecture (Optuna).

    One Optuna study per architecture over the same space and number of trials; each trial is a
    child run of one parent run, which keeps the best trial per architecture. Run the same command
    again to continue an interrupted sweep: finished trials are never run twice. The same command
    started while the sweep runs joins it as a worker, on this machine or another one that shares
    the tracking server and the --storage: each worker takes the next trial.
    """
    from .space import check_method, load_space

    cfg = cfg_loader()
    space = load_space(space_file, cfg)
    both = [d.key for d in space if d.key in cfg_loader.given]
    if both:
        raise click.UsageError(f"--{both[0].replace('_', '-')} and the space both set {both[0]}; drop one")
    if not models:
        raise click.BadParameter("needs at least one model", param_hint="--models")
    check_study(models, models[0], seeds or [cfg.seed])
    check_method(method, space, models, trials)
    check_data_path(cfg.data)
    probe_server()  # before torch, MLflow and Optuna load: a dead server is reported in a second
    from . import tracking
    from .sweep import SweepSpec, run_sweep

    spec = SweepSpec(models, space, trials, cfg, method, seeds or [], startup_trials, experiment)
    result = run_sweep(spec, storage, progress=not no_progress)
    click.echo(f"\nSweep run: {tracking.runs_url(result.experiment_id, result.run_id)}")
    click.echo(f"All runs:  {tracking.runs_url(result.experiment_id)}{_ui_hint()}")
    if result.failures:
        click.echo(f"{len(result.failures)} trials or runs failed: " + "; ".join(result.failures), err=True)


@cli.command()
@experiment_option
@click.option("--parent", metavar="RUN_ID", help="Only the child runs of this study run.")
@click.option(
    "--filter", "filter_string", metavar="FILTER", help="MLflow search filter, e.g. \"params.epochs = '10'\"."
)
@click.option(
    "--baseline", help="Architecture the others are compared to.  [default: resnet, where it has runs, else none]"
)
@click.option(
    "--group-by",
    callback=_csv(str),
    metavar="KEY[,KEY]",
    help="Split rows by these params and name them by their values, in numeric order, e.g. "
    "--group-by se_reduction for an ablation (any param; its differences are then no warning).",
)
@click.option(
    "--baseline-value",
    "baseline_values",
    multiple=True,
    metavar="KEY=V",
    help="Compare each row to the same architecture with KEY=V (and otherwise the same settings) "
    "instead of to --baseline, e.g. --baseline-value se_reduction=16; KEY is grouped by.",
)
@click.option(
    "--with-bench",
    is_flag=True,
    help="Add latency, FLOPs and peak memory from the latest 'zar bench' run of each row's "
    "architecture, depth, image size and device.",
)
@click.option(
    "--select",
    type=click.Choice(["last", "best", "best-trial"]),
    default="last",
    show_default=True,
    help="Final-epoch accuracies, or those of the epoch with the best val_acc (chosen on the "
    "validation set itself, so optimistic); best-trial: a sweep's best trial per architecture "
    "(with --parent SWEEP_RUN_ID).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["markdown", "csv", "json", "latex"]), default="markdown", show_default=True
)
@click.option("--output", type=click.Path(dir_okay=False, writable=True), help="Write the table to this file.")
@click.option("--include-unfinished", is_flag=True, help="Count runs that are not FINISHED too.")
@click.option("--strict", is_flag=True, help="Refuse to compare runs whose hyperparameters differ.")
def compare(
    experiment,
    parent,
    filter_string,
    baseline,
    group_by,
    baseline_values,
    with_bench,
    select,
    fmt,
    output,
    include_unfinished,
    strict,
):
    """Print the study's table from the MLflow runs.

    One row per architecture and settings (runs that differ in lr, epochs, data... are never
    averaged together), and per value of each --group-by param (with --parent, the keys its
    study varied unless told); several seeds give mean ± std, the difference to the baseline
    with its 95% Welch confidence interval and, from 3 runs a side, a Holm-adjusted Welch
    t-test p-value. 'zar bench' runs are never rows.
    """
    if output and not os.path.isdir(os.path.dirname(output) or "."):  # else the table is made, then lost
        raise click.BadParameter(f"folder {os.path.dirname(output)} does not exist", param_hint="--output")
    group_by = list(dict.fromkeys(k.replace("-", "_") for k in group_by))
    baseline_value = _baseline_values(baseline_values)
    if baseline and baseline_value:
        raise click.UsageError(
            "--baseline compares architectures, --baseline-value each architecture with itself; pass one"
        )
    if select == "best-trial" and not parent:
        raise click.UsageError("--select best-trial needs --parent SWEEP_RUN_ID")
    probe_server()  # before MLflow loads: a dead server is reported in a second
    from .analysis import trials
    from .analysis.comparison import comparison, keep_in_env_run
    from .analysis.render import render

    if select == "best-trial":
        text = trials.render(trials.fetch_best(experiment, parent), fmt)
        _emit(text, output)
        return
    found = comparison(
        experiment, parent, filter_string, baseline, group_by, baseline_value, with_bench, select,
        include_unfinished, strict,
    )  # fmt: skip
    for warning in found.warnings:
        click.echo(f"Warning: {warning}", err=True)
    table = found.table
    text = render(table, fmt)
    usage = found.usage
    if fmt == "markdown":
        text += f"\n{usage}\n"
    else:
        click.echo(usage, err=True)
    _emit(text, output)
    keep_in_env_run(text, fmt)


@cli.command()
@experiment_option
@click.option("--parent", metavar="RUN_ID", help="The study (or sweep) run whose children the report covers.")
@click.option(
    "--filter", "filter_string", metavar="FILTER", help="MLflow search filter, e.g. \"params.epochs = '10'\"."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "markdown"]),
    default="html",
    show_default=True,
    help="html: one self-contained file; markdown: a folder with report.md and its PNGs.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=True),
    help="Where to write it.  [default: report.html, or report/ for markdown]",
)
@click.option("--title", help="The page's heading.  [default: the study run or the experiment]")
def report(experiment, parent, filter_string, fmt, output, title):
    """Write the study as one page: its table, curves, confusion matrices, costs and provenance.

    Built only from what MLflow recorded, so it works on any past study; the table is that of
    'zar compare' with the same options (and --with-bench where bench runs exist).
    """
    output = Path(output or ("report.html" if fmt == "html" else "report"))
    if fmt == "html" and output.is_dir():
        raise click.BadParameter(f"{output} is a folder; name the HTML file to write", param_hint="--output")
    if not output.parent.is_dir():  # the html file's folder, or the markdown folder's parent
        raise click.BadParameter(f"folder {output.parent} does not exist", param_hint="--output")
    probe_server()
    from .analysis.comparison import comparison
    from .analysis.fetch import fetch_bench
    from .analysis.report import keep_in_env_run, write_report

    with_bench = bool(fetch_bench(experiment))
    found = comparison(experiment, parent, filter_string, with_bench=with_bench)
    for warning in found.warnings:
        click.echo(f"Warning: {warning}", err=True)
    path = write_report(found, output, fmt, title)
    click.echo(f"Report: {path.resolve()}")
    keep_in_env_run(path)


def _emit(text: str, output: str | None) -> None:
    if output:
        with open(output, "w") as f:
            f.write(text)
        click.echo(f"Wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@cli.command()
@models_option("measure")
@click.option("--depth", type=click.Choice([str(d) for d in DEPTHS]), default=str(DEPTHS[-1]), show_default=True)
@click.option(
    "--image-size", type=click.IntRange(8, 1024), default=32, show_default=True, help="Side of the images in pixels."
)
@click.option("--num-classes", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--se-reduction",
    type=click.IntRange(1, 64),
    default=16,
    show_default=True,
    help="SE reduction ratio r (se, se_mish).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where to measure (auto: cuda when there is a GPU).",
)
@click.option(
    "--min-time",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds each of the three timings runs for, after its warm-up.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 50),
    default=3,
    show_default=True,
    help="Times each architecture is measured, interleaved with the others; the table shows the median.",
)
@experiment_option
def bench(models, depth, image_size, num_classes, se_reduction, device, min_time, rounds, experiment):
    """Measure each architecture: parameters, FLOPs, latency, throughput, training step, peak memory.

    Each architecture is measured in a fresh process (fp32, torch's thread count) and recorded
    as an MLflow run of its own, tagged zar.bench; 'zar compare --with-bench' joins them to the
    accuracy table. They are never rows of it.
    """
    if not models:
        raise click.BadParameter("needs at least one model", param_hint="--models")
    check_study(models, models[0])  # each an architecture, named once
    probe_server()  # before torch and MLflow load: a dead server is reported in a second
    from . import measure, tracking

    device = measure.device_name(device)
    specs = [measure.BenchSpec(m, int(depth), image_size, num_classes, se_reduction, device, min_time) for m in models]
    tracking.check_reachable()
    results, failures, experiment_id = _bench_runs(specs, rounds, experiment)
    if results:
        click.echo("\n" + measure.render(results), nl=False)
    if experiment_id:
        click.echo(f"\nAll runs:  {tracking.runs_url(experiment_id)}{_ui_hint()}")
    if failures:
        raise measure.BenchFailed(f"{len(failures)} of {len(specs)} benches failed: " + "; ".join(failures))


def _bench_runs(specs, rounds, experiment):
    """Measure every spec ``rounds`` times, interleaved, then record each in a run of its own (under
    'mlflow run', as children of its run, which keeps the table); runs.closing ends each FINISHED, or
    FAILED with the reason."""
    from . import measure, tracking
    from .tracking import provenance, runs

    measured, failed = {spec: [] for spec in specs}, {}
    for r, spec in measure.rounds_order(specs, rounds):
        if spec in failed:
            continue
        try:
            numbers = measure.measure_in_subprocess(spec)
        except measure.BenchFailed as e:  # recorded as a FAILED run below; the others are still measured
            failed[spec] = e
            click.echo(f"{spec.display_name}: {e}", err=True)
            continue
        measured[spec].append(numbers)
        click.echo(
            f"round {r + 1}/{rounds} {spec.display_name}: {numbers['latency_ms_median']:.2f} ms/image at batch 1, "
            f"{numbers['throughput_img_s']:,.0f} img/s at batch {measure.BATCH}"
        )

    results, failures, experiment_id = [], [], None
    parent = runs.start(experiment, "bench") if os.environ.get("MLFLOW_RUN_ID") else None
    parent_closing = runs.closing(parent.info.run_id, {tracking.TAG_RUN_NAME: "bench"}) if parent else None
    with parent_closing or contextlib.nullcontext():
        for spec in specs:
            name = f"bench-{spec.model}-{spec.depth}-{spec.image_size}px"
            run = runs.start(experiment, name)
            run_id, experiment_id = run.info.run_id, run.info.experiment_id
            tags = {
                tracking.TAG_BENCH: "1",
                tracking.TAG_RUN_NAME: name,
                tracking.TAG_MODEL: spec.model,
                tracking.TAG_DISPLAY: spec.display_name,
                tracking.TAG_DEVICE: spec.device,
                **provenance.code_tags(),
            }
            try:
                with runs.closing(run_id, tags):
                    tracking.log_params(
                        run_id,
                        {
                            "model": spec.model,
                            "depth": spec.depth,
                            "image_size": spec.image_size,
                            "num_classes": spec.num_classes,
                            "se_reduction": spec.se_reduction,
                            "device": spec.device,
                            "precision": "fp32",
                            "batch_size_latency": measure.LATENCY_BATCH,
                            "batch_size_throughput": measure.BATCH,
                            "batch_size_train": measure.BATCH,
                            "batch_size_flops": measure.FLOP_BATCH,
                            "min_time_s": spec.min_time,
                            "rounds": rounds,
                        },
                    )
                    if spec in failed:
                        raise failed[spec]
                    numbers = measure.combine(measured[spec])
                    extra = ("torch_threads", "rounds")
                    tracking.log_params(run_id, {"torch_threads": int(numbers["torch_threads"])})
                    tracking.log_metrics(run_id, {k: v for k, v in numbers.items() if k not in extra})
            except measure.BenchFailed as e:  # the run is FAILED already
                failures.append(str(e))
                continue
            results.append((spec, numbers))
            click.echo(
                f"{spec.display_name}: {numbers['latency_ms_median']:.2f} ms/image at batch 1 "
                f"(median of {rounds}), {numbers['throughput_img_s']:,.0f} img/s at batch {measure.BATCH}; "
                f"run {run_id}"
            )
        if parent and results:
            tracking.log_text(parent.info.run_id, measure.render(results), "bench.md")
    return results, failures, experiment_id


def _baseline_values(specs) -> dict[str, str]:
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


def _ui_hint() -> str:
    """How to open a printed link: on a local store the UI must be started; a server is one."""
    from . import tracking

    return "" if tracking.tracking_uri().startswith(("http://", "https://")) else "  (after 'zar ui' in this folder)"


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback lets others on the network read every run.",
)
@experiment_option
def ui(port, host, experiment):
    """Start MLflow's UI on zar's store and print the link to the training runs table."""
    probe_server()
    from .ui import serve

    sys.exit(serve(host, port, experiment, click.echo))


@cli.command()
@experiment_option
@click.option("--stale", is_flag=True, help="Only RUNNING runs whose process on this machine is gone.")
@click.option("--mark-failed", is_flag=True, help="With --stale: close those runs as FAILED.")
def runs(experiment, stale, mark_failed):
    """List runs; find and close those whose process died.

    A run killed with SIGKILL stays RUNNING in MLflow: --stale lists such runs of this machine.
    """
    if mark_failed and not stale:
        raise click.BadParameter("--mark-failed goes with --stale", param_hint="--mark-failed")
    probe_server()  # before MLflow loads: a dead server is reported in a second
    from . import tracking
    from .tracking.client import FAILED, RUNNING
    from .tracking.runs import end, is_stale, process_alive

    tracking.check_reachable(create=False)
    experiment_id = tracking.get_experiment_id(experiment, create=False)
    rows = []
    for run in tracking.latest_runs(experiment_id):
        tags = run.data.tags
        if stale and not is_stale(run):
            continue
        state = run.info.status
        if run.info.status == RUNNING:
            alive = process_alive(tags)
            state += {True: " (process alive)", False: " (process gone)", None: " (other machine)"}[alive]
        val = run.data.metrics.get("val_acc")
        name = tags.get(tracking.TAG_DISPLAY, "study" if tags.get(tracking.TAG_STUDY) else "-")
        rows.append(
            (
                run.info.run_id,
                f"{name} (bench)" if tags.get(tracking.TAG_BENCH) else name,
                state,
                "-" if val is None else f"{100 * val:.2f}",
            )
        )
    if not rows:
        click.echo("No stale runs." if stale else f"No runs in experiment '{experiment}'.")
        return
    click.echo("| run | model | status | val_acc (%) |\n| --- | --- | --- | ---: |")
    for row in rows:
        click.echo("| " + " | ".join(row) + " |")
    if mark_failed:
        for run_id, *_ in rows:
            end(run_id, FAILED, "process gone: closed by 'zar runs --stale --mark-failed'")
        click.echo(f"Marked {len(rows)} run(s) FAILED; 'zar train --resume RUN_ID' continues one from its checkpoint.")


def main():
    cli(prog_name="zar")
