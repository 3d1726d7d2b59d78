"""``zar report``: a study as one page a person reads top to bottom, built only from what MLflow recorded.

The page holds the table exactly as ``zar compare`` prints it (``comparison.comparison``, the same
options), then the curves of every table row on shared charts (the mean over its runs and their
range), the confusion matrices side by side (summed over a row's runs), each row's cost, and
what was compared: settings, data, code and the runs, linked to the MLflow UI. HTML is one file
with its images inline and no outside script, font or stylesheet; Markdown is a folder with
``report.md`` and its PNGs, for a repository or a paper draft.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shlex
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import plots, tracking
from ..errors import UserError
from ..tracking import runs
from ..tracking.provenance import TAG_GIT_COMMIT, TAG_TORCH, TAG_VERSION
from .comparison import Comparison
from .gallery import MAX_SHOWN, Disagreement, disagreements, png_data_uri
from .render import markdown_table, render, table_cells
from .table import TableRow

FORMATS = ("html", "markdown")
FIGURES = {
    "val_acc": "Validation accuracy per epoch",
    "loss": "Loss per epoch",
    "confusion": "Confusion matrices",
}
SKIP_CONFIG = {"seed", "model"}  # the seed differs within a row by design; the model names the row


@dataclass
class Row:
    """One row of the table, with its runs and what the charts need of them."""

    table_row: TableRow
    color: str
    runs: list = field(default_factory=list)  # MLflow runs
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)  # run -> metric -> steps
    confusion: np.ndarray | None = None  # summed over the runs that logged one
    confusion_runs: int = 0
    classes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.table_row.name


@dataclass
class Report:
    comparison: Comparison
    rows: list[Row]
    title: str
    experiment_id: str
    disagreements: list[Disagreement] = field(default_factory=list)

    @property
    def runs(self) -> list:
        return [run for row in self.rows for run in row.runs]


def collect(found: Comparison, title: str | None = None) -> Report:
    """Every run behind the table, its per-epoch metrics and its confusion matrix."""
    colors = plots.row_colors([r.name for r in found.table])
    rows = []
    for table_row in found.table:
        row = Row(table_row, colors[table_row.name])
        for run_id in table_row.run_ids:
            run = tracking.get_run(run_id)
            row.runs.append(run)
            row.histories[run_id] = {
                key: tracking.metric_history(run_id, key) for key in ("val_acc", "train_loss", "val_loss")
            }
            raw = tracking.read_artifact(run_id, "confusion_matrix.json")
            if raw is not None:
                cm = json.loads(raw)
                matrix = np.array(cm["matrix"], dtype=int)
                if row.confusion is None:
                    row.confusion, row.classes = matrix, list(cm["labels"])
                elif matrix.shape == row.confusion.shape and list(cm["labels"]) == row.classes:
                    row.confusion = row.confusion + matrix
                else:
                    continue
                row.confusion_runs += 1
        rows.append(row)
    experiment_id = rows[0].runs[0].info.experiment_id if rows and rows[0].runs else ""
    if title is None:
        title = f"Study run {found.parent}" if found.parent else f"Experiment '{found.experiment}'"
    classes = next((r.classes for r in rows if r.classes), [])
    found_apart = disagreements([(r.table_row, r.runs) for r in rows], classes)
    return Report(found, rows, title, experiment_id, found_apart)


# --- figures ------------------------------------------------------------------------------------------


def _series(row: Row, key: str) -> plots.Series | None:
    """The row's runs over the epochs all of them reached (an early-stopped run ends the range)."""
    per_run = [dict(row.histories[r.info.run_id][key]) for r in row.runs if row.histories[r.info.run_id][key]]
    if not per_run:
        return None
    epochs = sorted(set.intersection(*(set(h) for h in per_run)))
    return plots.Series(row.name, row.color, epochs, [[h[e] for e in epochs] for h in per_run])


def figures(report: Report, folder: Path) -> dict[str, Path]:
    out = {}
    val = [s for s in (_series(r, "val_acc") for r in report.rows) if s]
    if val:
        out["val_acc"] = plots.mean_band(
            val, "validation accuracy (%)", "Validation accuracy per epoch: mean over runs, band min-max",
            folder / "val_acc.png", scale=100,
        )  # fmt: skip
    pairs = [(_series(r, "train_loss"), _series(r, "val_loss")) for r in report.rows]
    pairs = [(t, v) for t, v in pairs if t and v]
    if pairs:
        out["loss"] = plots.losses([t for t, _ in pairs], [v for _, v in pairs], folder / "loss.png")
    matrices = [r for r in report.rows if r.confusion is not None]
    if matrices and all(r.classes == matrices[0].classes for r in matrices):
        out["confusion"] = plots.confusion_grid(
            [(f"{r.name} (sum of {r.confusion_runs} run{'s' * (r.confusion_runs > 1)})", r.color, r.confusion)
             for r in matrices],
            matrices[0].classes,
            folder / "confusion.png",
        )  # fmt: skip
    return out


# --- the numbers beside the charts --------------------------------------------------------------------


def _fmt(value, spec: str = "{:.2f}") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else spec.format(value)


def _span(values: list[float], spec: str) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return spec.format(statistics.median(values)) + (
        "" if low == high else f" ({spec.format(low)}-{spec.format(high)})"
    )


def cost_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Per row: parameters, best epoch, epoch time; FLOPs, latency and memory where a bench run matched."""
    headers = ["Model", "Runs", "Params (M)", "Best epoch, median (range)", "Epoch time, median (s)"]
    bench = any(r.table_row.bench for r in report.rows)
    if bench:
        headers += ["MFLOPs/image", "Latency, batch 1 (ms)", "Peak memory (MiB)"]
    rows = []
    for r in report.rows:
        best = [m for m in (run.data.metrics.get("best_epoch") for run in r.runs) if m is not None]
        times = [
            v for run in r.runs for _, v in tracking.metric_history(run.info.run_id, "epoch_time_s")[1:]
        ]  # the first epoch of a process also pays for warm-up
        cells = [r.name, str(len(r.runs)), _fmt(r.table_row.params_m), _span(best, "{:.0f}"), _span(times, "{:.2f}")]
        if bench:
            b = r.table_row.bench or {}
            flops = b.get("flops_per_image")
            cells += [_fmt(flops / 1e6 if flops else None, "{:,.1f}"), _fmt(b.get("latency_ms_median")),
                      _fmt(b.get("peak_memory_mb"), "{:,.0f}")]  # fmt: skip
        rows.append(cells)
    return headers, rows


def provenance(report: Report) -> list[tuple[str, str]]:
    """What was compared: the settings all runs share, those that differ, the data and the code."""
    runs = report.runs
    params = [run.data.params for run in runs]
    keys = sorted({k for p in params for k in p} - SKIP_CONFIG)
    shared, differing = [], []
    for key in keys:
        values = sorted({p.get(key, "") for p in params})
        (shared if len(values) == 1 else differing).append((key, values))
    tags = [run.data.tags for run in runs]

    def values(tag: str) -> str:
        found = Counter(t.get(tag, "unrecorded") for t in tags)
        return ", ".join(f"{v} ({n} runs)" if len(found) > 1 else v for v, n in sorted(found.items()))

    seeds = sorted({p.get("seed", "") for p in params}, key=lambda s: (len(s), s))
    out = [
        ("Settings shared by every run", ", ".join(f"{k}={v[0]}" for k, v in shared) or "-"),
        ("Settings that differ", "; ".join(f"{k}: {', '.join(v)}" for k, v in differing) or "none but the seed"),
        ("Seeds", ", ".join(seeds)),
        ("Validation split fingerprint", values(tracking.TAG_FINGERPRINT)),
        ("Data fingerprint", values(tracking.TAG_DATA_FINGERPRINT)),
        ("zar", values(TAG_VERSION)),
        ("torch", values(TAG_TORCH)),
        ("git commit", values(TAG_GIT_COMMIT)),
    ]
    return out


def _rerun_command(report: Report) -> str:
    """The command that prints this table, quoted as a shell reads it."""
    found = report.comparison
    args = ["zar", "compare", "--experiment", found.experiment]
    if found.parent:
        args += ["--parent", found.parent]
    if found.filter_string:
        args += ["--filter", found.filter_string]
    if found.table.with_bench:
        args.append("--with-bench")
    return shlex.join(args)


# --- HTML and Markdown -----------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: center; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .notes { font-size: 0.85em; color: #444; } code { font-size: 0.9em; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; border-radius: 2px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; font-size: 0.9em; }
dt { font-weight: 600; } dd { margin: 0; word-break: break-word; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.6em; margin: 0.4em 0 1em; }
.gallery figure { margin: 0; width: 6.5em; text-align: center; font-size: 0.8em; }
.gallery img, .gallery .missing { width: 64px; height: 64px; object-fit: contain; image-rendering: pixelated;
       border: 1px solid #ccc; display: block; margin: 0 auto 0.2em; }
.gallery .missing { font-size: 0.7em; color: #888; overflow: hidden; }
"""


def _html_table(headers: list[str], rows: list[list[str]], colors: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, cells in enumerate(rows):
        tds = [f"<td>{html.escape(c)}</td>" for c in cells]
        if colors:
            tds[0] = f'<td><span class="swatch" style="background:{colors[i]}"></span>{html.escape(cells[0])}</td>'
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _table_cells(report: Report) -> tuple[list[str], list[list[str]]]:
    """The comparison's cells: the same text ``zar compare`` prints."""
    return table_cells(report.comparison.table)


def _notes(report: Report) -> list[str]:
    return [*report.comparison.warnings, *report.comparison.table.notes, report.comparison.usage]


def to_html(report: Report, images: dict[str, Path]) -> str:
    headers, cells = _table_cells(report)
    colors = [r.color for r in report.rows]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(report.title)}: zar report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1>",
        f"<p>{len(report.runs)} runs in {len(report.rows)} rows, from MLflow "
        f"(<code>{html.escape(tracking.shown_uri())}</code>). The table is <code>{html.escape(_rerun_command(report))}"
        "</code>; each chart shows every row in its own colour.</p>",
        "<h2>Results</h2>",
        _html_table(headers, cells, colors),
        '<div class="notes">' + "".join(f"<p>{html.escape(n)}</p>" for n in _notes(report)) + "</div>",
    ]
    for key, caption in FIGURES.items():
        if key in images:
            data = base64.b64encode(images[key].read_bytes()).decode()
            parts += [f"<h2>{caption}</h2>", f'<img alt="{caption}" src="data:image/png;base64,{data}">']
    parts += _gallery_html(report)
    headers, cost = cost_table(report)
    parts += ["<h2>Cost per architecture</h2>", _html_table(headers, cost, colors)]
    parts.append(
        '<p class="notes">Best epoch: chosen on the validation set. Epoch time: training plus evaluation, '
        "each run's first epoch left out (it pays for warm-up).</p>"
    )
    parts += ["<h2>What was compared</h2>", "<dl>"]
    parts += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in provenance(report)]
    parts.append("</dl>")
    parts += ["<h2>Runs</h2>", "<ul>"]
    for row in report.rows:
        for run in row.runs:
            url = tracking.runs_url(run.info.experiment_id, run.info.run_id)
            label = f"{row.name}, seed {run.data.params.get('seed', '?')}: {run.info.run_id} ({run.info.status})"
            parts.append(f'<li><a href="{html.escape(url)}">{html.escape(label)}</a></li>')
    parts += ["</ul>", "</body></html>"]
    return "\n".join(parts) + "\n"


GALLERY_TITLE = "Where they disagree with the baseline"


def _counted(d: Disagreement) -> str:
    """What the gallery's numbers count, in words."""
    if not d.seeds:
        return (
            f"No seed of {d.row} and {d.baseline} both logged per-image predictions "
            "(val_predictions.npz; runs of an older zar have none): nothing to pair."
        )
    epoch = "last" if d.select == "last" else "best (chosen on the validation set)"
    seeds = ", ".join(d.seeds)
    return (
        f"Validation images one gets right and the other wrong, at each run's {epoch} epoch, over the "
        f"{len(d.seeds)} seed{'s' * (len(d.seeds) > 1)} both ran ({seeds}), the image shown once with the "
        f"number of seeds it happened in: {len(d.baseline_only)} images {d.baseline} gets right and {d.row} "
        f"wrong, {len(d.row_only)} the reverse."
    )


def _side(d: Disagreement, cases, right: str, wrong: str) -> list[str]:
    more = f" (the {MAX_SHOWN} most frequent of {len(cases)})" if len(cases) > MAX_SHOWN else ""
    parts = [f"<h4>{html.escape(right)} right, {html.escape(wrong)} wrong: {len(cases)} images{more}</h4>"]
    if not cases:
        return parts
    figures, seeds = [], f"{len(d.seeds)} seed{'s' * (len(d.seeds) > 1)}"
    for case in cases[:MAX_SHOWN]:
        pixels = d.images.get(case.id)
        picture = (
            f'<img alt="validation image {html.escape(case.id)}" src="{png_data_uri(pixels)}">'
            if pixels is not None
            else f'<div class="missing">{html.escape(case.id)} not found</div>'
        )
        caption = f"true {html.escape(case.true)}, said {html.escape(case.wrong_as)}<br>{case.seeds} of {seeds}"
        figures.append(
            f'<figure data-id="{html.escape(case.id)}" data-seeds="{case.seeds}">{picture}'
            f'<figcaption title="image {html.escape(case.id)}">{caption}</figcaption></figure>'
        )
    return [*parts, '<div class="gallery">' + "".join(figures) + "</div>"]


def _gallery_html(report: Report) -> list[str]:
    if not report.disagreements:
        return []
    parts = [f"<h2>{GALLERY_TITLE}</h2>"]
    for d in report.disagreements:
        parts += [
            f'<h3 data-row="{html.escape(d.row)}">{html.escape(d.row)} against {html.escape(d.baseline)}</h3>',
            f'<p class="notes">{html.escape(_counted(d))}</p>',
        ]
        if d.seeds:
            parts += _side(d, d.baseline_only, d.baseline, d.row) + _side(d, d.row_only, d.row, d.baseline)
    return parts


def _gallery_markdown(report: Report) -> list[str]:
    if not report.disagreements:
        return []
    parts = ["", f"## {GALLERY_TITLE}"]
    for d in report.disagreements:
        parts += ["", f"### {d.row} against {d.baseline}", "", _counted(d)]
        for cases, right, wrong in ((d.baseline_only, d.baseline, d.row), (d.row_only, d.row, d.baseline)):
            if d.seeds and cases:
                rows = [[c.id, c.true, c.wrong_as, f"{c.seeds} of {len(d.seeds)}"] for c in cases[:MAX_SHOWN]]
                headers = ["Image", "True class", f"{wrong} said", "Seeds"]
                parts += ["", f"{right} right, {wrong} wrong: {len(cases)} images", "", markdown_table(headers, rows)]
    return parts


def to_markdown(report: Report, images: dict[str, Path]) -> str:
    parts = [
        f"# {report.title}",
        "",
        f"{len(report.runs)} runs in {len(report.rows)} rows, from MLflow. The table is `{_rerun_command(report)}`.",
        "",
        "## Results",
        "",
        render(report.comparison.table, "markdown").rstrip(),
        "",
        *[f"{w}\n" for w in report.comparison.warnings],
        report.comparison.usage,
    ]
    for key, caption in FIGURES.items():
        if key in images:
            parts += ["", f"## {caption}", "", f"![{caption}]({images[key].name})"]
    parts += _gallery_markdown(report)
    headers, cost = cost_table(report)
    parts += ["", "## Cost per architecture", "", markdown_table(headers, cost), ""]
    parts += ["## What was compared", ""] + [f"- **{k}**: {v}" for k, v in provenance(report)]
    parts += ["", "## Runs", ""]
    for row in report.rows:
        for run in row.runs:
            url = tracking.runs_url(run.info.experiment_id, run.info.run_id)
            parts.append(f"- [{row.name}, seed {run.data.params.get('seed', '?')}]({url}): `{run.info.run_id}`")
    return "\n".join(parts) + "\n"


def write_report(found: Comparison, output: Path, fmt: str = "html", title: str | None = None) -> Path:
    """The report of ``found`` at ``output``: a file (html) or a folder of report.md and PNGs (markdown)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown report format {fmt!r}; valid: {', '.join(FORMATS)}")
    report = collect(found, title)
    if fmt == "markdown":
        output.mkdir(parents=True, exist_ok=True)
        images = figures(report, output)
        path = output / "report.md"
        path.write_text(to_markdown(report, images), encoding="utf-8")
        return path
    with tempfile.TemporaryDirectory() as tmp:
        images = figures(report, Path(tmp))
        text = to_html(report, images)
    tmp_path = output.with_name(output.name + ".tmp")
    try:
        tmp_path.write_text(text, encoding="utf-8")
        tmp_path.replace(output)  # never a half-written report
    finally:
        tmp_path.unlink(missing_ok=True)
    return output


def keep_in_env_run(path: Path) -> None:
    """Under ``mlflow run -e report``, the report is kept in the run MLflow made for it."""
    with runs.in_env_run("report", {tracking.TAG_RUN_NAME: "report"}) as run_id:
        if run_id is None:
            return
        if path.name == "report.md":
            tracking.log_artifacts(run_id, path.parent)
        else:
            tracking.log_artifacts_file(run_id, path)
