"""The ``zar`` command line: the only part of zar that speaks click (tests/test_structure.py holds it to that).

- ``group``: the ``zar`` group, its commands, and errors as one line each;
- ``make_runs``: train, study, sweep, bench; ``read_runs``: models, compare, report, runs, ui;
- ``options``: the config's keys as options; ``output``: links and tables printed or written.

Each command parses, checks, calls one function of zar and prints what it returns.
"""

from .group import cli, main

__all__ = ["cli", "main"]
