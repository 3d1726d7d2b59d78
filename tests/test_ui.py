"""The links zar prints open MLflow's model-training view: checked in a real browser.

MLflow 3 opens an experiment in its GenAI view, and a run's page with the GenAI side bar,
unless the link says ``workflowType=machine_learning``. scripts/check_ui.py does the work: an
``mlflow server`` on a store shaped like zar's, the links from ``zar.tracking.runs_url`` at
that server's address, each page loaded in headless Chromium and its rendered DOM read back.
The same links without the query are loaded as a control: the checks must fail on them, or a
pass would tell nothing. Each page's screenshot and DOM stay in the test's temporary folder.

Chromium comes from ``apt-get install chromium`` (.ci/run installs it). Without it these tests
skip, unless ZAR_REQUIRE_CHROMIUM is set (CI sets it): then they fail.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import ROOT, leave_store, use_store


def _load_check_ui():
    spec = importlib.util.spec_from_file_location("check_ui", ROOT / "scripts" / "check_ui.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


check_ui = _load_check_ui()
CHROMIUM = check_ui.find_chromium()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("ZAR_REQUIRE_CHROMIUM"),
        reason="no Chromium to load MLflow's UI in: apt-get install chromium (CI installs it)",
    ),
]


class Pages:
    """Every page's problems by check name (see check_ui.zar_checks), and where its screenshot is."""

    def __init__(self, checks, problems: dict[str, list[str]], folder: Path) -> None:
        self.checks = {c.name: c for c in checks}
        self.problems = problems
        self.folder = folder

    def explain(self, name: str) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems[name])
        return f"{self.checks[name].url}\n{lines}\nscreenshot: {self.folder / name}.png"


@pytest.fixture(scope="module")
def pages(tmp_path_factory, empty_store) -> Pages:
    """zar's links and the controls, each loaded once: the server and the browser are the slow part."""
    if CHROMIUM is None:
        pytest.fail("ZAR_REQUIRE_CHROMIUM is set and no Chromium is installed (apt-get install chromium)")
    folder = tmp_path_factory.mktemp("ui")
    shutil.copy(empty_store, folder / "mlflow.db")  # migrated already: the server starts sooner
    with check_ui.mlflow_server(folder) as address, pytest.MonkeyPatch.context() as mp:
        use_store(mp, folder, address)  # runs_url builds its links on the server's address
        try:
            study = check_ui.make_study(address)
            checks = check_ui.zar_checks(study)
        finally:
            leave_store()
        problems = check_ui.run_checks(checks, CHROMIUM, folder / "pages")
    return Pages(checks, problems, folder / "pages")


def test_the_runs_table_link_shows_every_run_in_the_training_view(pages):
    assert pages.problems["runs-table"] == [], pages.explain("runs-table")


@pytest.mark.parametrize("name", ["study-run", "child-run"])
def test_a_run_link_shows_the_run_with_the_training_side_bar(pages, name):
    assert pages.problems[name] == [], pages.explain(name)


@pytest.mark.parametrize("name", ["control-runs-table", "control-child-run"])
def test_without_the_query_the_same_links_fail_the_checks(pages, name):
    """The control: MLflow's GenAI view is what the checks catch, so a pass above means something."""
    assert any("GenAI" in p for p in pages.problems[name]), pages.explain(name)


def test_the_study_curves_link_shows_its_runs_grouped_by_architecture_in_the_chart_view(pages):
    """zar study's "Curves:" link: the children only, a group per model, the val_acc chart in view."""
    assert pages.problems["study-curves"] == [], pages.explain("study-curves")
    assert pages.problems["control-study-curves"], pages.explain("control-study-curves")
