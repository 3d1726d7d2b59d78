"""The one exception type for user mistakes: it becomes a one-line message and exit code 2."""

import click


class ZarError(click.ClickException):
    exit_code = 2
