"""The ``zar`` group: its commands, and how every error ends as one line."""

from __future__ import annotations

import os
import sys

import click

from ..errors import ZarException, describe
from ..tracking.store import ENV_RUN_ID, redact_text
from .make_runs import bench, study, sweep, train, worker
from .read_runs import compare, models, report, runs, ui


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
            message, exit_code = describe(e), 1
        else:
            sys.exit(code if isinstance(code, int) else 0)
        message = redact_text(message)
        if os.environ.get(ENV_RUN_ID):  # still set: zar failed before it adopted that run
            from ..tracking.runs import fail_env_run

            fail_env_run(message)
        click.echo(f"Error: {message}", err=True)
        sys.exit(exit_code)


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


for command in (models, train, study, sweep, compare, report, bench, runs, ui, worker):
    cli.add_command(command)


def main():
    cli(prog_name="zar")
