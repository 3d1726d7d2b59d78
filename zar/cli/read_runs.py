"""The commands that read runs: models, compare, report, runs, ui."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..tracking.store import probe_server
from ..variants import DEPTHS, VARIANTS
from .options import baseline_values, comma_list, experiment_option, filter_option, verdict_options
from .output import emit


@click.command()
@click.option("--depth", type=click.Choice([str(d) for d in DEPTHS]), default=str(DEPTHS[-1]), show_default=True)
@click.option("--num-classes", type=click.IntRange(min=1), default=10, show_default=True)
def models(depth, num_classes):
    """List the architectures and their parameter counts."""
    from ..learn.models import build_model, count_params

    depth = int(depth)
    click.echo("| model | architecture | parameters |\n| --- | --- | ---: |")
    for name, variant in VARIANTS.items():
        n = count_params(build_model(name, depth, num_classes))["params_total"]
        click.echo(f"| {name} | {variant.display_name(depth)} | {n:,} |")


@click.command()
@experiment_option
@click.option("--parent", metavar="RUN_ID", help="Only the child runs of this study run.")
@filter_option
@click.option(
    "--baseline", help="Architecture the others are compared to.  [default: resnet, where it has runs, else none]"
)
@click.option(
    "--group-by",
    callback=comma_list(str),
    metavar="KEY[,KEY]",
    help="Split rows by these params and name them by their values, in numeric order, e.g. "
    "--group-by se_reduction for an ablation (any param; its differences are then no warning).",
)
@click.option(
    "--baseline-value",
    "baseline_value_specs",
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
@verdict_options
def compare(
    experiment,
    parent,
    filter_string,
    baseline,
    group_by,
    baseline_value_specs,
    with_bench,
    select,
    fmt,
    output,
    include_unfinished,
    strict,
    margin,
    stats,
):
    """Print the study's table from the MLflow runs.

    One row per architecture and settings (runs that differ in lr, epochs, data... are never
    averaged together), and per value of each --group-by param (with --parent, the keys its
    study varied unless told); several seeds give mean ± std, the difference to the baseline
    with its 95% Welch confidence interval and, from 3 runs a side, a Holm-adjusted Welch
    t-test p-value. Each comparison's Verdict: better, worse, equivalent (±--margin) or undecided
    with the seeds per side that would decide it; paired per image where runs logged predictions.
    'zar bench' runs are never rows.
    """
    if output and not os.path.isdir(os.path.dirname(output) or "."):  # else the table is made, then lost
        raise click.BadParameter(f"folder {os.path.dirname(output)} does not exist", param_hint="--output")
    group_by = list(dict.fromkeys(k.replace("-", "_") for k in group_by))
    baseline_value = baseline_values(baseline_value_specs)
    if baseline and baseline_value:
        raise click.UsageError(
            "--baseline compares architectures, --baseline-value each architecture with itself; pass one"
        )
    if select == "best-trial" and not parent:
        raise click.UsageError("--select best-trial needs --parent SWEEP_RUN_ID")
    probe_server()  # before MLflow loads: a dead server is reported in a second
    from ..analysis import trials
    from ..analysis.comparison import comparison, keep_in_env_run
    from ..analysis.render import render

    if select == "best-trial":
        text = trials.render(trials.fetch_best(experiment, parent), fmt)
        emit(text, output)
        return
    found = comparison(
        experiment, parent, filter_string, baseline, group_by, baseline_value, with_bench, select,
        include_unfinished, strict, margin=margin, stats=stats,
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
    emit(text, output)
    keep_in_env_run(text, fmt)


@click.command()
@experiment_option
@click.option("--parent", metavar="RUN_ID", help="The study (or sweep) run whose children the report covers.")
@filter_option
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
    if fmt == "markdown" and output.exists() and not output.is_dir():
        raise click.BadParameter(f"{output} is a file; name the folder to write report.md into", param_hint="--output")
    if not output.parent.is_dir():  # the html file's folder, or the markdown folder's parent
        raise click.BadParameter(f"folder {output.parent} does not exist", param_hint="--output")
    probe_server()
    from ..analysis.comparison import comparison
    from ..analysis.fetch import fetch_bench
    from ..analysis.report import keep_in_env_run, write_report

    with_bench = bool(fetch_bench(experiment))
    found = comparison(experiment, parent, filter_string, with_bench=with_bench)
    for warning in found.warnings:
        click.echo(f"Warning: {warning}", err=True)
    path = write_report(found, output, fmt, title)
    click.echo(f"Report: {path.resolve()}")
    keep_in_env_run(path)


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback lets others on the network read every run.",
)
@click.option(
    "--allowed-hosts",
    metavar="NAME[,NAME]",
    help="Host names browsers may reach the UI by, besides localhost and private IPs (MLflow's "
    "--allowed-hosts; MLflow answers any other name with 403).",
)
@experiment_option
def ui(port, host, allowed_hosts, experiment):
    """Start MLflow's UI on zar's store and print the link to the training runs table."""
    probe_server()
    from ..ui import serve

    warn = lambda line: click.echo(line, err=True)  # noqa: E731
    sys.exit(serve(host, port, experiment, click.echo, allowed_hosts=allowed_hosts, warn=warn))


@click.command()
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
    from .. import tracking
    from ..tracking.client import FAILED, RUNNING
    from ..tracking.runs import end, is_stale, process_alive

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
