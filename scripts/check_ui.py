#!/usr/bin/env python3
"""Open the links zar prints in a real browser and check what MLflow's UI shows for them.

Every link zar prints (``zar.tracking.runs_url``) must open MLflow's model-training view:
MLflow 3 otherwise opens an experiment in its GenAI view, and a run's page with the GenAI
side bar. This script makes a throw-away SQLite store with runs shaped like zar's (a study
run and its children, zar's tags, metrics and params), starts ``mlflow server`` on it, builds
the links with ``runs_url`` and loads each in headless Chromium. It reads the rendered DOM:

* the side bar must be the model-training one (a "Model registry" link to ``#/models``) and not
  the GenAI one (links to ``/evaluation-runs``, ``/chat-sessions``, ``/judges``);
* the runs table must hold every run, as a row or folded under its parent's row, and say
  "N matching runs" for all of them;
* a run's page must show the run's name, its metrics and params, and lead back to "Runs",
  not to "Evaluations".

The same links without ``?workflowType=machine_learning`` are loaded too, as a control: the
checks must fail on them, or they would tell nothing. A screenshot and the DOM of every page
land in the folder given on the command line.

    .venv/bin/python scripts/check_ui.py ui-check     # then look at ui-check/*.png

zar saves a runs-table view as an experiment tag (``zar.tracking.views.share_study_view``) and its
table link names it (``viewStateShareKey``): the check of that link asks for the study's
columns (val_acc, best_val_acc, model, seed) too.

Exit status 0 when zar's links pass and the controls fail, 1 otherwise, 2 without Chromium.
``tests/test_ui.py`` runs the same checks under pytest (``make test-slow``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from urllib.request import urlopen

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# Virtual time: Chromium skips ahead while the page only waits on timers, so a generous budget
# costs little wall time. MLflow's UI renders its tables within about 3 s of virtual time.
BUDGET_MS = 20_000
WINDOW = (1600, 1200)
# Links only MLflow's GenAI side bar has, and the model-training side bar's model registry link.
GENAI_ONLY_LINKS = ("/evaluation-runs", "/chat-sessions", "/judges")
ML_REGISTRY_LINK = "#/models"
# The columns a study is read by; MLflow's runs table names its columns by these keys (col-id).
STUDY_COLUMNS = ("metrics.`val_acc`", "metrics.`best_val_acc`", "params.`model`", "params.`seed`")  # zar.tracking's
# ?viewStateShareKey=KEY opens the runs table as the experiment tag mlflow.sharedViewState.KEY saved it.
SHARE_PARAM = "viewStateShareKey"
SHARE_TAG_PREFIX = "mlflow.sharedViewState."


# --- a store with runs shaped like zar's ----------------------------------------------------------


@dataclass
class Run:
    run_id: str
    name: str
    parent_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Study:
    experiment_id: str
    parent: Run
    children: list[Run]

    @property
    def runs(self) -> list[Run]:
        return [self.parent, *self.children]


def make_study(tracking_uri: str) -> Study:
    """Experiment ``zar``: a study run and two finished children, with zar's tags, params and metrics.

    The values have at most four decimals, as MLflow's tables show them.
    """
    from mlflow.tracking import MlflowClient

    from zar import tracking

    # MLflow prints a "View run" link of its own for every run closed on a server.
    with _env("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"):
        return _make_study(MlflowClient(tracking_uri), tracking)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _make_study(client, tracking) -> Study:
    from mlflow.entities import Metric, Param

    from zar.tracking import views

    experiment_id = client.create_experiment(tracking.DEFAULT_EXPERIMENT)
    views.share_study_view(experiment_id)  # as zar does for every experiment it starts runs in
    name = "study-2x1"
    parent = client.create_run(experiment_id, run_name=name, tags={tracking.TAG_STUDY: "1"})
    study = Study(experiment_id, Run(parent.info.run_id, name), [])
    for model, display, per_epoch in (
        ("resnet", "ResNet-34", (0.8125, 0.9167)),
        ("se", "SE-ResNet-34", (0.95, 0.9889)),
    ):
        name = f"{model}-34-seed42"
        tags = {tracking.TAG_MODEL: model, tracking.TAG_DISPLAY: display, tracking.TAG_PARENT: study.parent.run_id}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        params = {"model": model, "seed": "42", "depth": "34", "epochs": str(len(per_epoch))}
        now = int(time.time() * 1000)
        metrics = [Metric("val_acc", v, now, step) for step, v in enumerate(per_epoch)]
        metrics.append(Metric("best_val_acc", max(per_epoch), now, len(per_epoch) - 1))
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run_id, tracking.FINISHED)
        last = {"val_acc": per_epoch[-1], "best_val_acc": max(per_epoch)}
        study.children.append(Run(run_id, name, study.parent.run_id, last, params))
    client.set_terminated(study.parent.run_id, tracking.FINISHED)
    views.share_study_runs_view(experiment_id, study.parent.run_id)  # as zar study does for its run
    return study


# --- mlflow server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(
    folder: Path,
    port: int | None = None,
    timeout: float = 240.0,
    backend_uri: str | None = None,
    serve_artifacts: bool = False,
) -> Iterator[str]:
    """``mlflow server`` on ``backend_uri`` (default ``folder/mlflow.db``, created if missing), on
    loopback; yields its address once /health answers. ``serve_artifacts``: the server stores and
    serves the artifacts (in ``folder/artifacts``), as a team server does, and clients never see the path.

    One worker and no job runner: the checks send a handful of requests, and a shared machine's
    cores are better left to the browser.
    """
    port = port or free_port()
    address = f"http://127.0.0.1:{port}"
    log_path = folder / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri or f"sqlite:///{folder / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if serve_artifacts:
        cmd += ["--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(OSError):
                with urlopen(f"{address}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.25)
        yield address
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """The server and the uvicorn process it started: they share the session started for them."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- the browser -----------------------------------------------------------------------------------


def find_chromium() -> str | None:
    """``$CHROMIUM`` when set, else the first Chromium or Chrome on PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def render(chromium: str, url: str, screenshot: Path | None = None, budget_ms: int = BUDGET_MS, window=WINDOW) -> str:
    """The DOM of ``url`` after ``budget_ms`` of virtual time, in a fresh profile (MLflow keeps the
    last workflow type in local storage: a profile shared between pages would carry it over)."""
    with tempfile.TemporaryDirectory(prefix="zar-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",  # root in CI containers
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
        ]
        if screenshot is not None:
            cmd.append(f"--screenshot={screenshot}")
        done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or "<html" not in done.stdout:
        raise RuntimeError(f"{Path(chromium).name} failed on {url} ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


# --- reading the DOM -------------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        parts = [c if isinstance(c, str) else c.text() for c in self.children]
        return " ".join(" ".join(parts).split())

    def iter(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str | None) -> list[Node]:
        """Descendants with ``tag`` whose attributes equal ``attrs`` (None: the attribute is present)."""
        found = []
        for n in self.iter():
            if tag is not None and n.tag != tag:
                continue
            if all((k in n.attrs) if v is None else n.attrs.get(k) == v for k, v in attrs.items()):
                found.append(n)
        return found


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        if self.stack[-1].tag not in ("script", "style"):
            self.stack[-1].children.append(data)


class Page:
    """What the checks read from one rendered page."""

    def __init__(self, dom: str) -> None:
        builder = _TreeBuilder()
        builder.feed(dom)
        self.root = builder.root
        self.text = self.root.text()

    def title(self) -> str:
        return " ".join(t.text() for t in self.root.find_all("title"))

    def side_bar_links(self) -> list[str]:
        return [a.attrs.get("href", "") for nav in self.root.find_all("nav") for a in nav.find_all("a")]

    def links(self, testid: str) -> list[Node]:
        return self.root.find_all("a", **{"data-testid": testid})

    def grid_rows(self) -> dict[str, dict[str, str]]:
        """The runs table, row id (the run id) -> column id -> cell text (rows are split over pinned parts)."""
        rows: dict[str, dict[str, str]] = {}
        for grid in self.root.find_all(role="grid"):
            for row in grid.find_all(role="row", **{"row-id": None}):
                cells = rows.setdefault(row.attrs["row-id"], {})
                for cell in row.find_all(role="gridcell", **{"col-id": None}):
                    cells[cell.attrs["col-id"]] = cell.text()
        return rows

    def grid_columns(self) -> list[str]:
        return [h.attrs["col-id"] for g in self.root.find_all(role="grid") for h in g.find_all(**{"col-id": None})]

    def table_rows(self) -> list[list[str]]:
        """Rows of the plain tables (a run page's metrics and params), as lists of cell texts."""
        return [
            [c.text() for c in row.iter() if c.attrs.get("role") in ("cell", "columnheader")]
            for table in self.root.find_all(role="table")
            for row in table.find_all(role="row")
        ]

    def matching_runs(self) -> int | None:
        m = re.search(r"(\d+) matching runs?", self.text)
        return int(m.group(1)) if m else None


# --- the checks: each returns what is wrong, nothing when the page is right -------------------------


def view_problems(page: Page) -> list[str]:
    """The model-training side bar, not the GenAI one."""
    links = page.side_bar_links()
    if not links:
        return ["the page did not render: it has no side bar (a larger --budget may help)"]
    problems = []
    genai = sorted({m for m in GENAI_ONLY_LINKS for href in links if m in href})
    if genai:
        problems.append(f"the side bar is MLflow's GenAI one (it links to {', '.join(genai)})")
    if ML_REGISTRY_LINK not in links:
        problems.append(f"the side bar has no model registry link ({ML_REGISTRY_LINK}) of the model-training view")
    return problems


def runs_table_problems(page: Page, study: Study, columns: tuple[str, ...] = ()) -> list[str]:
    """Every run of the study in the table, as a row or folded under its parent's row; ``columns`` shown."""
    problems = view_problems(page)
    rows = page.grid_rows()
    if not rows:
        return [*problems, "there is no runs table (no grid rows)"]
    for run in study.runs:
        if run.run_id in rows:
            name = rows[run.run_id].get("attributes.`Run Name`", "")
            if run.name not in name:
                problems.append(f"run {run.name}'s row shows the name {name!r}")
        elif run.parent_id not in rows:
            problems.append(f"run {run.name} is in the table neither as a row nor under its parent")
    count = page.matching_runs()
    if count != len(study.runs):
        problems.append(f"the table says {count} matching runs, not {len(study.runs)}")
    shown = page.grid_columns()
    for col in columns:
        if col not in shown:
            problems.append(
                f"the table has no column {col} (is the view the link names saved as a {SHARE_TAG_PREFIX} tag?)"
            )
            continue
        kind, key = col.split(".", 1)
        key = key.strip("`")
        for run in study.children:
            cell = rows.get(run.run_id, {}).get(col)
            want = getattr(run, kind).get(key)
            if cell is not None and not _same(cell, want):
                problems.append(f"run {run.name} shows {cell!r} in column {col}, not {want!r}")
    return problems


def study_curves_problems(page: Page, study: Study) -> list[str]:
    """The study's children only (not its own row), one group per architecture, in the chart view
    with a val_acc chart among the first shown."""
    problems = view_problems(page)
    count = page.matching_runs()
    if count != len(study.children):
        problems.append(f"the table says {count} matching runs, not the study's {len(study.children)} children")
    if study.parent.name in page.text:
        problems.append(f"the study's own run {study.parent.name} is listed")
    for model in sorted({c.params["model"] for c in study.children}):
        if f"Group: {model}" not in page.text:
            problems.append(f"no group of the runs of model {model} (is the view grouped by the param model?)")
    cards = page.root.find_all(**{"data-testid": "experiment-view-compare-runs-card"})
    titles = [h.attrs.get("title", "") for card in cards for h in card.find_all("h4")]
    if not cards:
        problems.append("no chart cards: the link did not open the chart view")
    elif "val_acc" not in titles:
        problems.append(f"no val_acc chart among those shown first ({', '.join(titles)})")
    return problems


def run_page_problems(page: Page, study: Study, run: Run) -> list[str]:
    """The run's name, metrics and params, reached from "Runs" (the GenAI view says "Evaluations")."""
    problems = view_problems(page)
    headers = [h.text() for h in page.root.find_all(**{"data-testid": "runs-header"})]
    if run.name not in headers:
        problems.append(f"the page's heading is {headers}, not the run's name {run.name!r}")
    for crumb in page.links("experiment-observatory-link-runs"):
        if crumb.attrs.get("href", "").rstrip("/").endswith("/evaluation-runs"):
            problems.append(f"the page leads back to GenAI evaluations ({crumb.text()!r}), not to the runs table")
    table = {row[0]: row[1] for row in page.table_rows() if len(row) >= 2}
    for kind, values in (("metric", run.metrics), ("param", run.params)):
        for key, want in values.items():
            if key not in table:
                problems.append(f"the page does not show the {kind} {key}")
            elif not _same(table[key], want):
                problems.append(f"the page shows {kind} {key} = {table[key]!r}, not {want!r}")
    return problems


def _same(shown: str, want) -> bool:
    if isinstance(want, float):
        try:
            return abs(float(shown) - want) < 5e-5
        except ValueError:
            return False
    return shown == str(want)


# --- links -------------------------------------------------------------------------------------------


def _with_query(url: str, edit) -> str:
    """``url`` with the query of its fragment (``#/experiments/1/runs?...``) passed through ``edit``."""
    parts = urlsplit(url)
    route, _, query = parts.fragment.partition("?")
    params = edit(parse_qsl(query, keep_blank_values=True))
    fragment = f"{route}?{urlencode(params)}" if params else route
    return urlunsplit(parts._replace(fragment=fragment))


def without_workflow(url: str) -> str:
    """The link as zar printed it before: MLflow picks the view (GenAI, on a first visit)."""
    return _with_query(url, lambda params: [(k, v) for k, v in params if k != "workflowType"])


@dataclass
class Check:
    """One page to load, and what must be true of it."""

    name: str
    url: str
    problems: Callable[[Page], list[str]]
    control: bool = False  # a link that must fail: it shows the checks can fail
    seconds: float = 0.0  # how long the page took to load, once run

    def run(self, chromium: str, folder: Path, budget_ms: int = BUDGET_MS) -> list[str]:
        """The page's problems. A link that must pass and did not is loaded once more with twice the
        budget: on a loaded machine MLflow's chart view can miss the first budget (seen in CI), and
        a page that is wrong stays wrong however long it is given."""
        started = time.monotonic()
        problems = self._load(chromium, folder, budget_ms)
        if problems and not self.control:
            problems = self._load(chromium, folder, 2 * budget_ms)
        self.seconds = time.monotonic() - started
        return problems

    def _load(self, chromium: str, folder: Path, budget_ms: int) -> list[str]:
        dom = render(chromium, self.url, folder / f"{self.name}.png", budget_ms)
        (folder / f"{self.name}.html").write_text(dom)
        return self.problems(Page(dom))


def zar_checks(study: Study) -> list[Check]:
    """zar's links (``runs_url`` at the current tracking URI), and the same links without the view."""
    from zar.tracking import runs_url
    from zar.tracking.views import study_runs_url

    table_url = runs_url(study.experiment_id)
    columns = STUDY_COLUMNS if SHARE_PARAM in table_url else ()
    child = study.children[0]
    parent_url = runs_url(study.experiment_id, study.parent.run_id)
    checks = [
        Check("runs-table", table_url, lambda p: runs_table_problems(p, study, columns)),
        Check("study-run", parent_url, lambda p: run_page_problems(p, study, study.parent)),
        Check("child-run", runs_url(study.experiment_id, child.run_id), lambda p: run_page_problems(p, study, child)),
        Check(
            "study-curves",
            study_runs_url(study.experiment_id, study.parent.run_id),
            lambda p: study_curves_problems(p, study),
        ),
    ]
    controls = [  # one run page is control enough
        Check(f"control-{c.name}", without_workflow(c.url), c.problems, control=True)
        for c in checks
        if c.name in ("runs-table", "child-run")
    ]
    # The table of every run is not the study's curves: its link must fail that check.
    controls.append(Check("control-study-curves", table_url, lambda p: study_curves_problems(p, study), control=True))
    return checks + controls


def run_checks(checks: list[Check], chromium: str, folder: Path, budget_ms: int = BUDGET_MS, jobs: int = 3):
    """{check name: problems}; the pages load ``jobs`` at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        results = pool.map(lambda c: c.run(chromium, folder, budget_ms), checks)
        return {c.name: problems for c, problems in zip(checks, results)}


# --- the command -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the screenshots (.png) and DOMs (.html) go")
    parser.add_argument("--budget", type=int, default=BUDGET_MS, help="virtual ms each page gets to render")
    parser.add_argument("--port", type=int, help="mlflow server's port (default: a free one)")
    parser.add_argument("--jobs", type=int, default=3, help="pages loaded at once")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found: apt-get install chromium (or set CHROMIUM)", file=sys.stderr)
        return 2
    args.folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zar-ui-") as tmp, mlflow_server(Path(tmp), args.port) as address:
        print(f"mlflow server at {address} after {time.monotonic() - started:.1f} s")
        os.environ["MLFLOW_TRACKING_URI"] = address  # runs_url builds its links on the server's address
        study = make_study(address)
        checks = zar_checks(study)
        results = run_checks(checks, chromium, args.folder, args.budget, args.jobs)
        shutil.copy(Path(tmp) / "server.log", args.folder / "server.log")
    failed = False
    for check in checks:
        problems = results[check.name]
        ok = bool(problems) if check.control else not problems
        failed |= not ok
        if check.control:
            verdict = "fails, as a control must" if problems else "PASSES: the checks cannot tell the views apart"
        else:
            verdict = "FAILS" if problems else "ok"
        print(f"{check.name:20} {check.seconds:4.1f} s  {verdict}  {check.url}")
        for p in problems:
            print(f"    - {p}")
    print(f"{len(checks)} pages in {time.monotonic() - started:.1f} s; screenshots in {args.folder}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
