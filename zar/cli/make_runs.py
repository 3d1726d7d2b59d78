"""The commands that make runs: train, study, sweep, bench.

Each checks first what a user can get wrong without torch or MLflow (zar.checks), then probes the
tracking server, and only then imports what trains: a typo costs no wait.
"""

from __future__ import annotations

import sys

import click

from ..ablation import parse_vary, plan
from ..checks import check_data_path, check_study, known_model
from ..tracking.store import probe_server
from ..variants import VARIANTS
from .options import (
    comma_list,
    config_option,
    config_options,
    experiment_option,
    models_option,
    no_progress_option,
    register_option,
)
from .output import ui_hint

DEFAULT_BASELINE = "resnet"  # zar.analysis.table's, which loads MLflow


def launcher_options(f):
    """--launcher and the Slurm launcher's settings, for zar study (its children) and zar sweep (workers, reruns)."""
    for option in reversed(
        [
            click.option(
                "--launcher",
                type=click.Choice(["local", "slurm"]),
                default="local",
                show_default=True,
                help="Where runs train: this machine, or a Slurm job each (submitit); with slurm, --jobs caps "
                "the jobs queued or running at once (a study: all at once when not given; a sweep: its workers).",
            ),
            click.option(
                "--slurm",
                "slurm_pairs",
                multiple=True,
                metavar="KEY=VALUE",
                help="With --launcher slurm: partition, time (minutes), cpus_per_task, gpus_per_task, mem_gb, "
                "account, qos, logs (a folder every node reaches), or sbatch.FLAG=VALUE for any other sbatch flag.",
            ),
            click.option(
                "--slurm-config",
                type=click.Path(dir_okay=False),
                metavar="FILE",
                help="With --launcher slurm: a YAML file of the --slurm keys (sbatch: a mapping of other flags); "
                "--slurm wins.",
            ),
            click.option(
                "--keep-jobs",
                is_flag=True,
                help="With --launcher slurm: on Ctrl-C leave the jobs running (the same command again attaches to "
                "them) rather than cancel them.",
            ),
        ]
    ):
        f = option(f)
    return f


@click.command()
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
@click.option(
    "--tag",
    "tag_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    hidden=True,
    help="A tag on the new run (how a sweep's --seeds runs on Slurm say which trial they train again).",
)
@register_option("the run's last-epoch model")
@no_progress_option
def train(model_name, cfg_loader, experiment, resume_run, parent_run, tag_pairs, register, no_progress):
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
    from .. import tracking, training
    from ..learn.distributed import close

    try:
        if resume_run:
            result = training.resume(resume_run, progress=not no_progress)
        else:
            from ..slurm import requeued_run

            tags = dict(pair.partition("=")[::2] for pair in tag_pairs)
            earlier = requeued_run(parent_run) if parent_run else None  # a Slurm job run again: resume its run
            if earlier:
                result = training.resume(earlier, progress=not no_progress)
            else:
                result = training.train(
                    model_name, cfg, experiment, progress=not no_progress, parent_run_id=parent_run, tags=tags or None
                )
    finally:
        close()  # under torchrun: leave the process group
    if result is not None:  # None: a torchrun rank other than 0, which records nothing
        click.echo(f"Run: {tracking.runs_url(result.experiment_id, result.run_id)}{ui_hint()}")
        if register:
            from ..registry import register_run

            _said(register_run(register, result.run_id))


def _said(registered) -> None:
    from .. import tracking

    click.echo(f"Registered {registered.uri}: {registered.said}")
    click.echo(f"Model:     {tracking.model_version_url(registered.name, registered.version)}{ui_hint()}")


@click.command()
@models_option("train")
@click.option(
    "--seeds",
    callback=comma_list(int),
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
@launcher_options
@click.option(
    "--resume",
    "resume_run",
    metavar="RUN_ID",
    help="Continue this interrupted study run with its own settings (the same command again does too).",
)
@click.option(
    "--until-decided",
    is_flag=True,
    help="Train in rounds of --seeds: after each, the comparisons decided (better, worse, equivalent within "
    "--margin; O'Brien–Fleming boundaries over the rounds) stop, the others get as many new seeds.",
)
@click.option(
    "--max-seeds",
    type=click.IntRange(min=3),
    default=10,
    show_default=True,
    help="With --until-decided: seeds per architecture at most.",
)
@click.option(
    "--margin",
    type=click.FloatRange(0, 100, min_open=True, max_open=True),
    default=1.0,
    show_default=True,
    metavar="PP",
    help="With --until-decided: the equivalence margin δ in points of val accuracy.",
)
@register_option("the model of the table's best row (its best seed's last-epoch model)")
@config_options
@experiment_option
@no_progress_option
@click.pass_context
def study(
    ctx,
    register,
    models,
    seeds,
    baseline,
    vary_specs,
    jobs,
    launcher,
    slurm_pairs,
    slurm_config,
    keep_jobs,
    resume_run,
    until_decided,
    max_seeds,
    margin,
    cfg_loader,
    experiment,
    no_progress,
):
    """Run the whole study and print its table.

    Every architecture and seed (and, with --vary, every combination of the varied values) trains
    as a child of one parent run, which keeps the table and charts. Interrupted, it continues when
    the same command runs again: finished runs are kept, the others resumed from their checkpoints.
    """
    slurm = _slurm_options(ctx, launcher, slurm_pairs, slurm_config, keep_jobs, jobs)
    if resume_run:
        names = ("models", "seeds", "baseline", "vary_specs", "until_decided", "max_seeds", "margin")
        given = [name for name in names if _given(ctx, name)]
        ignored = [*given, *cfg_loader.given]
        if ignored:
            raise click.UsageError(
                "--resume continues a study with its own settings; drop "
                + ", ".join("--" + k.replace("_specs", "").replace("_", "-") for k in ignored)
            )
        probe_server()
        from ..study import resume_study

        result = resume_study(resume_run, progress=not no_progress, jobs=jobs, slurm=slurm)
        _study_done(result, register)
        return
    cfg = cfg_loader()
    seeds = seeds or [cfg.seed]
    vary = parse_vary(vary_specs)
    both = [k for k in vary if k in cfg_loader.given]
    if both:
        raise click.UsageError(f"--{both[0].replace('_', '-')} and --vary {both[0]} both set {both[0]}; drop one")
    _check_study(models, seeds, baseline, cfg, vary)
    until = (max_seeds, margin) if until_decided else None
    if not until_decided and (_given(ctx, "max_seeds") or _given(ctx, "margin")):
        raise click.UsageError("--max-seeds and --margin go with --until-decided")
    if until_decided and (len(seeds) < 3 or max_seeds < len(seeds) or vary):  # as run_study refuses, before torch
        raise click.UsageError(
            "--until-decided needs a first round of at least 3 --seeds, --max-seeds at least as many, and no --vary"
        )
    probe_server()  # before torch and MLflow load: a dead server is reported in a second
    from ..study import run_study

    result = run_study(
        models,
        seeds,
        cfg,
        experiment,
        baseline,
        progress=not no_progress,
        jobs=jobs,
        vary=vary,
        until_decided=until,
        slurm=slurm,
    )
    _study_done(result, register)


def _slurm_options(ctx, launcher, pairs, config_file, keep_jobs, jobs):
    """The Slurm launcher's settings, or None for local processes; Slurm's options without it are refused."""
    if launcher != "slurm":
        stray = [name for name in ("slurm_pairs", "slurm_config", "keep_jobs") if _given(ctx, name)]
        if stray:
            flags = ", ".join("--" + n.replace("_pairs", "").replace("_", "-") for n in stray)
            raise click.UsageError(f"{flags} go with --launcher slurm")
        return None
    from ..slurm import parse_options

    return parse_options(pairs, config_file, jobs if _given(ctx, "jobs") else None, keep_jobs)


def _study_done(result, register: str | None) -> None:
    from .. import tracking
    from ..tracking import views

    click.echo(f"\nStudy run: {tracking.runs_url(result.experiment_id, result.run_id)}")
    click.echo(f"Curves:    {views.study_runs_url(result.experiment_id, result.run_id)}")
    click.echo("           (the study's runs grouped by architecture: mean and min-max band over seeds)")
    click.echo(f"All runs:  {tracking.runs_url(result.experiment_id)}{ui_hint()}")
    if register:
        from ..registry import register_best

        _said(register_best(register, result.table, result.run_id))


def _given(ctx, name: str) -> bool:
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def _check_study(models, seeds, baseline, cfg, vary) -> None:
    """What run_study would refuse, in its order, before torch loads (run_study checks again for other callers)."""
    if not models:
        raise click.BadParameter("needs at least one model", param_hint="--models")
    check_study(models, baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in models else models[0]), seeds)
    for data in dict.fromkeys(kid.cfg.data for kid in plan(models[:1], seeds, cfg, vary)):  # each config checked
        check_data_path(data)


@click.command(hidden=True)
def worker():
    """Train the children a study hands this process on stdin, in turn (how 'zar study --jobs' runs them)."""
    probe_server()
    from ..worker import serve

    sys.exit(serve())


@click.command()
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
    callback=comma_list(int),
    help="Then train each architecture's best configuration with these seeds, for mean ± std.",
)
@click.option(
    "--storage",
    metavar="URL",
    envvar="ZAR_OPTUNA_STORAGE",
    help="Optuna storage (sqlite:///..., postgresql://...) shared by workers; or $ZAR_OPTUNA_STORAGE.  "
    "[default: optuna.db beside MLflow's SQLite store]",
)
@click.option(
    "--startup-trials",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Trials per architecture that always run to the end before the median pruner may stop one.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --launcher slurm: workers (Slurm jobs) taking trials at once; and --seeds runs queued at once.",
)
@launcher_options
@config_options
@experiment_option
@no_progress_option
@click.pass_context
def sweep(
    ctx,
    models,
    space_file,
    trials,
    method,
    seeds,
    storage,
    startup_trials,
    jobs,
    launcher,
    slurm_pairs,
    slurm_config,
    keep_jobs,
    cfg_loader,
    experiment,
    no_progress,
):
    """Search hyperparameters with the same budget for every architecture (Optuna).

    One Optuna study per architecture over the same space and number of trials; each trial is a
    child run of one parent run, which keeps the best trial per architecture. Run the same command
    again to continue an interrupted sweep: finished trials are never run twice. The same command
    started while the sweep runs joins it as a worker, on this machine or another one that shares
    the tracking server and the --storage: each worker takes the next trial.
    """
    from ..space import check_method, load_space

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
    from .. import tracking
    from ..sweep import SweepSpec, run_sweep

    slurm = _slurm_options(ctx, launcher, slurm_pairs, slurm_config, keep_jobs, jobs)
    if slurm is None and _given(ctx, "jobs"):
        raise click.UsageError("--jobs goes with --launcher slurm (other workers: the same command elsewhere)")
    spec = SweepSpec(models, space, trials, cfg, method, seeds or [], startup_trials, experiment)
    on_slurm = None
    if slurm is not None:
        from ..sweep import absolute_storage, default_storage
        from ..sweep_slurm import SlurmLauncher

        on_slurm = SlurmLauncher(slurm, absolute_storage(storage or default_storage()))
    result = run_sweep(spec, storage, progress=not no_progress, launcher=on_slurm)
    click.echo(f"\nSweep run: {tracking.runs_url(result.experiment_id, result.run_id)}")
    click.echo(f"All runs:  {tracking.runs_url(result.experiment_id)}{ui_hint()}")
    if result.failures:
        click.echo(f"{len(result.failures)} trials or runs failed: " + "; ".join(result.failures), err=True)


@click.command()
@models_option("measure")
@config_option("depth")
@config_option("image_size", "Side of the images in pixels.")
@click.option("--num-classes", type=click.IntRange(min=1), default=10, show_default=True)
@config_option("se_reduction")
@config_option("device", "Where to measure (auto: cuda when there is a GPU).")
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
    from .. import tracking
    from ..benchmarking import run_benches
    from ..learn import measure

    device = measure.device_name(device)
    specs = [measure.BenchSpec(m, int(depth), image_size, num_classes, se_reduction, device, min_time) for m in models]
    tracking.check_reachable()
    result = run_benches(specs, rounds, experiment, click.echo, lambda line: click.echo(line, err=True))
    if result.measured:
        click.echo("\n" + result.table, nl=False)
    if result.experiment_id:
        click.echo(f"\nAll runs:  {tracking.runs_url(result.experiment_id)}{ui_hint()}")
    if result.failures:
        failures = result.failures
        raise measure.BenchFailed(f"{len(failures)} of {len(specs)} benches failed: " + "; ".join(failures))
