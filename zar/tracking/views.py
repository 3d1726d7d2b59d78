"""The runs-table views zar saves in an experiment, and the links that open them in MLflow's UI.

The runs table hides every metric and param column until a user adds them. MLflow's UI opens a
view saved as the experiment tag ``mlflow.sharedViewState.<key>`` when its link names the key
(``viewStateShareKey``; mlflow/server/js/src/.../useSharedExperimentViewState.ts); columns are
"metrics.`key`". zar saves one view per experiment (``zar``: its columns) and one per study
(its children grouped by architecture, in the chart view).
"""

from __future__ import annotations

import json
import time

from .client import STUDY_VIEW_KEY, mlflow_client, retry_locked, ui_address

STUDY_COLUMNS = ("metrics.`val_acc`", "metrics.`best_val_acc`", "params.`model`", "params.`seed`")


def study_view() -> dict:
    """The runs table as a study is read: zar's columns, best ``val_acc`` first (sorting lists a
    study's children as rows of their own), every other setting at MLflow's default.

    Whole, because MLflow 3.1-3.14 replace their table settings with the saved ones (a partial
    view breaks the page there); 3.15+ fill what is missing from their defaults.
    """
    return {
        "selectedColumns": list(STUDY_COLUMNS),
        "columnOrder": [],
        "columnWidths": {},
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runsVisibilityMap": {},
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "autoRefreshEnabled": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        "searchFilter": "",
        "orderByKey": STUDY_COLUMNS[0],
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
    }


def study_runs_url(experiment_id: str, study_run_id: str, base: str | None = None) -> str:
    """The study's children alone (no parent row, no other runs), grouped by architecture, in the
    runs table's chart view: each architecture's curves as its mean over seeds with a min-max band.
    Opens the view ``share_study_runs_view`` saved; ``compareRunsMode`` picks the chart tab."""
    base = (base or ui_address()).rstrip("/")
    key = f"{STUDY_VIEW_KEY}-study-{study_run_id}"
    return (
        f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={key}&compareRunsMode=CHART"
    )


@retry_locked
def share_study_runs_view(experiment_id: str, study_run_id: str, group_by: list[str] = ("model",)) -> None:
    """Save the view ``study_runs_url`` opens: ``study_view`` filtered to the study's children and
    grouped by the params ``group_by`` (MLflow's "Group by", its charts drawing each group's mean):
    the architecture, and an ablation's varied keys."""
    keys = [{"mode": "param", "groupByData": key} for key in group_by]
    view = study_view() | {
        "searchFilter": f"tags.mlflow.parentRunId = '{study_run_id}'",
        "groupBy": {"aggregateFunction": "average", "groupByKeys": keys},
        "chartsSearchFilter": "acc",  # the accuracy charts first (val_acc, train_eval_acc, ...), not A-Z
    }
    value = {
        "name": f"zar: study {study_run_id[:8]}, by architecture",
        "createdAt": int(time.time() * 1000),
        "state": json.dumps(view),
        **view,
    }
    key = f"mlflow.sharedViewState.{STUDY_VIEW_KEY}-study-{study_run_id}"
    mlflow_client().set_experiment_tag(experiment_id, key, json.dumps(value))


@retry_locked
def share_study_view(experiment_id: str) -> None:
    """Save ``study_view`` as the experiment's shared view ``zar`` (once), which ``runs_url`` opens.

    The value is MLflow 3.15+'s saved-view envelope (``name``, ``createdAt``, ``state``: the view
    as a JSON string), listed under the table's "Views"; the view's own keys sit beside it for
    MLflow 3.1-3.14, which read them from the top level.
    """
    key = f"mlflow.sharedViewState.{STUDY_VIEW_KEY}"
    if key in mlflow_client().get_experiment(experiment_id).tags:
        return
    view = study_view()
    value = {"name": "zar: study columns", "createdAt": int(time.time() * 1000), "state": json.dumps(view), **view}
    mlflow_client().set_experiment_tag(experiment_id, key, json.dumps(value))
