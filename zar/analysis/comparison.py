"""The table of ``zar compare`` before it is rendered: runs fetched, guarded and built into rows.

``zar report`` and a study's page build on the same one, so that they show what ``zar compare`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import tracking
from ..errors import UserError
from ..tracking import runs
from .fetch import Fetched, Parent, describe_parent, describe_usage, fetch_bench, fetch_runs, require_rows
from .grouping import check_comparable, check_group_by
from .judging import Judging
from .render import EXTENSIONS
from .table import Table, build_table
from .verdicts import DEFAULT_MARGIN


@dataclass
class Comparison:
    """What ``zar compare`` prints, before it is rendered: the table, the runs behind it, the warnings."""

    table: Table
    fetched: Fetched
    warnings: list[str]
    group_by: list[str]
    experiment: str
    parent: str | None
    filter_string: str | None = None  # the user's --filter, as given

    @property
    def usage(self) -> str:
        return describe_usage(len(self.fetched.rows), self.fetched.left_out)


def comparison(
    experiment: str,
    parent: str | None = None,
    filter_string: str | None = None,
    baseline: str | None = None,
    group_by: list[str] | tuple[str, ...] = (),
    baseline_value: dict[str, str] | None = None,
    with_bench: bool = False,
    select: str = "last",
    include_unfinished: bool = False,
    strict: bool = False,
    margin: float | None = None,
    stats: str = "bootstrap",
) -> Comparison:
    """The table of ``zar compare`` with these options; ``zar report`` builds on the same one.

    With ``parent`` a sweep's run, its --seeds runs, each architecture at its best trial; with a
    study's run, a row per value of what that study varied (unless ``group_by`` says otherwise).
    ``margin`` (points; default the study's, else 1) and ``stats`` make each verdict; a study run
    --until-decided is judged by its sequential design.
    """
    baseline_value = baseline_value or {}
    user_filter = filter_string
    found = describe_parent(parent) if parent else None
    tuned = found.tuned_keys if found is not None else None
    if tuned is not None:
        rerun = f"tags.`{tracking.TAG_RERUN_OF}` LIKE '%'"
        filter_string = f"{filter_string} and {rerun}" if filter_string else rerun
    fetched = fetch_runs(experiment, parent, filter_string, select, include_unfinished)
    if tuned is not None and not fetched.rows:
        raise UserError(
            f"sweep {parent} has no --seeds runs to compare; 'zar compare --parent {parent} --select best-trial' "
            "prints its best trials"
        )
    require_rows(fetched, experiment, parent, filter_string)
    group_by = list(group_by)
    if found is not None and not group_by:  # an ablation's table, as the study printed it: a row per varied value
        group_by = found.vary_keys
    grouped = list(dict.fromkeys([*group_by, *baseline_value]))
    check_group_by(fetched.rows, grouped)
    warnings = check_comparable(fetched.rows, strict, [*grouped, *(tuned or ())])  # those are meant to differ
    bench = fetch_bench(experiment) if with_bench else None
    judging = judging_for(found, margin, stats)
    table = build_table(
        fetched.rows,
        baseline,
        group_by=group_by,
        baseline_value=baseline_value,
        bench=bench,
        tuned=tuned or (),
        judging=judging,
    )
    return Comparison(table, fetched, warnings, group_by, experiment, parent, user_filter)


def judging_for(parent: Parent | None, margin: float | None = None, stats: str = "bootstrap") -> Judging:
    """How a table of ``parent``'s runs is judged: its study's margin and sequential design where it has them."""
    if margin is None:
        margin = (parent.margin if parent is not None else None) or DEFAULT_MARGIN
    return Judging(stats, margin, sequential=parent.sequential if parent is not None else None)


def keep_in_env_run(text: str, fmt: str) -> None:
    """Under ``mlflow run -e compare``, the table is kept in the run MLflow made for it."""
    with runs.in_env_run("compare", {tracking.TAG_COMPARE: "1"}) as run_id:
        if run_id:
            tracking.log_text(run_id, text, f"comparison.{EXTENSIONS[fmt]}")
