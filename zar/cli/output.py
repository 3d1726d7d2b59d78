"""What the commands print besides their tables: links, and a table to a file or the terminal."""

from __future__ import annotations

import click


def ui_hint() -> str:
    """How to open a printed link: on a local store the UI must be started; a server is one."""
    from .. import tracking

    return "" if tracking.tracking_uri().startswith(("http://", "https://")) else "  (after 'zar ui' in this folder)"


def emit(text: str, output: str | None) -> None:
    if output:
        with open(output, "w") as f:
            f.write(text)
        click.echo(f"Wrote {output}", err=True)
    else:
        click.echo(text, nl=False)
