"""zar report: the study of conftest (synthetic data, plain and resnet, two seeds each) as one page.

The HTML is parsed back: every section is there, every image is inline and decodes, nothing is
fetched from outside, and the table's numbers are those of ``zar compare --format json``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import ROOT, invoke

SECTIONS = [
    "Results",
    "Validation accuracy per epoch",
    "Loss per epoch",
    "Confusion matrices",
    "Where they disagree with the baseline",
    "Cost per architecture",
    "What was compared",
    "Runs",
]


class Page(HTMLParser):
    """The headings, images, links and table cells of a report."""

    def __init__(self, text: str):
        super().__init__()
        self.h2, self.images, self.links, self.tables = [], [], [], []
        self.figures = []  # the gallery's: (data-id, data-seeds, its image's src or None)
        self.external = []  # anything the page would load from elsewhere
        self._tag, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._tag = tag
        if tag == "figure":
            self.figures.append([attrs["data-id"], int(attrs["data-seeds"]), None])
        if tag == "img" and attrs.get("alt", "").startswith("validation image"):
            self.figures[-1][2] = attrs["src"]
        elif tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link", "iframe") or (tag == "img" and not attrs["src"].startswith("data:")):
            self.external.append((tag, attrs))
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self._row = []
            self.tables[-1].append(self._row)
        if tag in ("td", "th"):
            self._cell = []  # its text, across the tags inside it

    def handle_data(self, data):
        if self._tag == "h2":
            self.h2.append(data.strip())
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        self._tag = None
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None


def decodes(src: str) -> tuple[int, int]:
    assert src.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image.size


def test_the_study_keeps_its_report_and_the_page_has_every_section(in_study):
    assert "Report: " in in_study.output
    (path,) = [Path(line.split(": ", 1)[1]) for line in in_study.output.splitlines() if line.startswith("Report: ")]
    assert path.name == "report.html" and path.is_file()
    names = [a.path for a in MlflowClient().list_artifacts(in_study.parent_id)]
    assert "report.html" in names

    page = Page(path.read_text())
    assert page.h2 == SECTIONS
    assert page.external == []
    assert len(page.images) == 3 and all(w > 300 and h > 200 for w, h in map(decodes, page.images))
    assert sum("?workflowType=machine_learning" in href for href in page.links) == 4  # a link per run

    # The results table is zar compare's, number for number.
    table = json.loads(invoke("compare", "--parent", in_study.parent_id, "--format", "json").stdout)
    header, *rows = page.tables[0]
    val = header.index("Val Acc (%)")
    assert [r[0] for r in rows] == [t["name"] for t in table]
    assert [r[val] for r in rows] == [f"{t['val_acc_mean']:.2f} ± {t['val_acc_std']:.2f}" for t in table]
    params = header.index("Params (M)")
    assert [r[params] for r in rows] == [f"{t['params_m']:.2f}" for t in table]
    # The cost table: each row's runs, and its seeds summed into its confusion matrix.
    cost_header, *cost = page.tables[1]
    assert [c[:2] for c in cost] == [[t["name"], "2"] for t in table]


def test_report_command_writes_html_and_a_markdown_folder(in_study, tmp_path):
    out = tmp_path / "study.html"
    result = invoke("report", "--parent", in_study.parent_id, "--output", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Report: {out.resolve()}"
    assert Page(out.read_text()).h2 == SECTIONS

    folder = tmp_path / "paper"
    result = invoke("report", "--parent", in_study.parent_id, "--format", "markdown", "--output", str(folder))
    assert result.exit_code == 0, result.output
    text = (folder / "report.md").read_text()
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    pictures = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert pictures == ["val_acc.png", "loss.png", "confusion.png"]
    for name in pictures:
        Image.open(folder / name).load()
    table = invoke("compare", "--parent", in_study.parent_id).stdout.split("\n\n")[0]
    assert table in text  # the same Markdown table, character for character


def test_report_mistakes_are_one_line_and_write_nothing(in_study, tmp_path):
    missing = invoke("report", "--parent", "0123abc", "--output", str(tmp_path / "r.html"))
    assert missing.exit_code == 2 and missing.output.count("\n") == 1, missing.output
    nowhere = invoke("report", "--output", str(tmp_path / "no" / "such" / "r.html"))
    assert nowhere.exit_code == 2 and "does not exist" in nowhere.output, nowhere.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(in_study, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("ZAR_REQUIRE_CHROMIUM"):
            pytest.fail("ZAR_REQUIRE_CHROMIUM is set and no Chromium is installed (apt-get install chromium)")
        pytest.skip("no Chromium: apt-get install chromium (CI installs it)")
    page = tmp_path / "study.html"
    assert invoke("report", "--parent", in_study.parent_id, "--output", str(page)).exit_code == 0
    png = tmp_path / "study.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_report.py"), str(page), str(png)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = Image.open(png).convert("L")
    assert image.width == 1200 and 2000 < image.height < 7000, image.size  # cut under the page's end
    assert image.getextrema()[0] < 100  # text and charts drawn, not a blank page


def test_the_page_names_the_compare_command_with_its_filter_quoted_as_a_shell_reads_it(in_study, tmp_path):
    """It dropped --filter and quoted nothing: a filter holds spaces and quotes."""
    page = tmp_path / "md"
    run = MlflowClient().get_run(in_study.parent_id)
    experiment = MlflowClient().get_experiment(run.info.experiment_id).name
    result = invoke("report", "--parent", in_study.parent_id, "--filter", "params.seed = '1'", "--format", "markdown",
                    "--output", str(page))  # fmt: skip
    assert result.exit_code == 0, result.output
    text = (page / "report.md").read_text()
    words = ["zar", "compare", "--experiment", experiment, "--parent", in_study.parent_id, "--filter"]
    command = shlex.join([*words, "params.seed = '1'"])
    assert f"The table is `{command}`" in text and "--filter 'params.seed = '\"'\"'1'\"'\"''" in command


def test_a_markdown_report_onto_a_file_is_a_one_line_error(in_study, tmp_path):
    taken = tmp_path / "report"
    taken.write_text("a file where the report's folder would go")
    result = invoke("report", "--parent", in_study.parent_id, "--format", "markdown", "--output", str(taken))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"{taken} is a file; name the folder to write report.md into" in result.stderr
    assert taken.read_text() == "a file where the report's folder would go"


# --- the figures themselves, read from matplotlib before they are saved (issue 22, item 6) -----------------


@pytest.fixture
def figures(monkeypatch):
    """Each figure zar.plots saves, kept open for the test to read."""
    from zar import plots

    kept = []
    save = plots._save

    def keep(fig, path):
        kept.append(fig)
        fig.savefig(path, dpi=plots.DPI)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield kept
    monkeypatch.setattr(plots, "_save", save)
    for fig in kept:
        plots.plt.close(fig)


def test_acc_curve_shows_train_in_eval_mode_against_validation_and_train_mode_dashed(figures, tmp_path):
    from zar import plots

    history = [
        {"epoch": e, "train_acc": t, "train_eval_acc": te, "val_acc": v}
        for e, t, te, v in ((1, 0.9, 0.4, 0.38), (2, 0.95, 0.5, 0.47))
    ]
    plots.curve(history, "acc", "ResNet-18: accuracy", tmp_path / "acc_curve.png")
    (ax,) = figures[0].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["train (eval mode)", "validation", "train (train mode, running mean)"]
    assert list(lines["train (eval mode)"].get_ydata()) == [40.0, 50.0]  # percent, as the axis says
    assert lines["train (train mode, running mean)"].get_linestyle() == "--"
    assert lines["train (eval mode)"].get_linestyle() == lines["validation"].get_linestyle() == "-"
    assert ax.get_ylabel() == "acc (%)"


def test_overlapping_bands_of_three_rows_stay_apart(figures, tmp_path):
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_hex

    from zar import plots

    colors = plots.row_colors(["a", "b", "c"])
    same = [[80.0, 90.0], [85.0, 95.0]]  # three rows whose runs span the same band
    series = [plots.Series(label, colors[label], [1, 2], [[v / 100 for v in r] for r in same]) for label in colors]
    plots.mean_band(series, "val acc (%)", "Validation accuracy", tmp_path / "val_acc.png", scale=100)
    (ax,) = figures[0].axes
    edged = [c for c in ax.collections if isinstance(c, PolyCollection) and c.get_hatch()]
    assert len(edged) == 3
    assert len({c.get_hatch() for c in edged}) == 3  # each row its own hatch
    assert [to_hex(c.get_edgecolor()[0]) for c in edged] == list(colors.values())  # and its own colour


@pytest.mark.parametrize("classes, rows", [(10, 5), (4, 2), (20, 3)])
def test_confusion_numbers_are_readable_at_1200_px(figures, tmp_path, classes, rows):
    import numpy as np

    from zar import plots

    labels = [str(k) for k in range(classes)]
    matrices = [(f"row {r}", "#1f77b4", np.full((classes, classes), 123)) for r in range(rows)]
    plots.confusion_grid(matrices, labels, tmp_path / "confusion.png")
    fig = figures[0]
    width_px = fig.get_size_inches()[0] * plots.DPI
    shown = min(1.0, 1100 / width_px)  # the report's body is 1100 px wide in a 1200 px window
    numbers = [t for ax in fig.axes for t in ax.texts]
    assert len(numbers) == (rows * classes * classes if classes <= 20 else 0)
    smallest_px = min(t.get_fontsize() for t in numbers) * plots.DPI / 72 * shown
    assert smallest_px >= 11, f"confusion-matrix numbers are {smallest_px:.1f} px tall on the page"


def test_the_gallery_shows_each_image_the_two_rows_disagree_on_counted_over_paired_seeds(in_study, tmp_path):
    """Counted again here from each run's val_predictions.npz, seed by seed, and held against the page."""
    from zar.predictions import ARTIFACT, load_predictions

    client = MlflowClient()
    kids = client.search_runs(
        [client.get_run(in_study.parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{in_study.parent_id}'"
    )
    by = {(k.data.tags["zar.model"], k.data.params["seed"]): k.info.run_id for k in kids}

    def correct(model, seed):
        path = client.download_artifacts(by[model, seed], ARTIFACT, str(tmp_path))
        p = load_predictions(Path(path).read_bytes())
        return dict(zip(p.ids.tolist(), (p.pred["last"] == p.y_true).tolist()))

    expected = {"baseline_only": {}, "row_only": {}}
    for seed in ("1", "2"):
        base, row = correct("resnet", seed), correct("plain", seed)
        for image in base:
            if base[image] != row[image]:
                side = expected["baseline_only" if base[image] else "row_only"]
                side[image] = side.get(image, 0) + 1
    out = tmp_path / "r.html"
    assert invoke("report", "--parent", in_study.parent_id, "--output", str(out)).exit_code == 0
    text = out.read_text()
    page = Page(text)
    shown = {image: seeds for image, seeds, _ in page.figures}
    # Each side's 12 most frequent (ties by id), as many as the page shows.
    both = {k: v for side in expected.values() for k, v in sorted(side.items(), key=lambda kv: (-kv[1], kv[0]))[:12]}
    assert shown == both and both, "the tiny study's two rows should disagree somewhere"
    assert all(src is not None and decodes(src) == (8, 8) for _, _, src in page.figures)  # the digit itself
    assert (
        f"{len(expected['baseline_only'])} images ResNet-18 gets right and Plain-18 wrong, "
        f"{len(expected['row_only'])} the reverse" in text
    )
    assert "over the 2 seeds both ran (1, 2)" in text
