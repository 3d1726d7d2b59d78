"""The table as text: Markdown or LaTeX with its notes under it, or CSV or JSON with the metrics named in each row."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict

from ..errors import UserError
from .bench import BENCH_KEYS
from .table import TableRow

FORMATS = ("markdown", "csv", "json", "latex")
EXTENSIONS = {"markdown": "md", "csv": "csv", "json": "json", "latex": "tex"}
# One pass over the characters, so that an escape is never escaped again; a bare < prints as ¡ in LaTeX.
LATEX_ESCAPES = str.maketrans(
    {
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "±": r"$\pm$",
        "<": "$<$",
        ">": "$>$",
        "–": "--",
    }
)


VERDICT = "Verdict"  # better, worse, equivalent (±δ), undecided (~N seeds): zar.analysis.verdicts


def columns(select: str = "last") -> list[str]:
    """The table's headers: what each number is, for this ``--select``."""
    if select == "best":
        return [
            "Model",
            "Train Acc at best epoch, eval mode (%)",
            "Best-epoch Val Acc (%), optimistic",
            "Train - Val gap at best epoch, eval mode (pp)",
            "Best-epoch Val Acc vs baseline (pp) [95% CI] (p), optimistic",
            "Params (M)",
            "Runs",
            VERDICT,
        ]
    return [
        "Model",
        "Train Acc, eval mode (%)",
        "Val Acc (%)",
        "Train - Val gap, eval mode (pp)",
        "Val Acc vs baseline (pp) [95% CI] (p)",
        "Params (M)",
        "Runs",
        VERDICT,
    ]


COLUMNS = columns("last")
# With --with-bench: the matched zar bench run's numbers, after the accuracy columns.
BENCH_COLUMNS = [
    "Latency, batch 1, median (ms) (range over bench rounds)",
    "MFLOPs/image, forward (conv+linear, 2 per MAC)",
    "Peak memory (MiB)",
]


def render(table: list[TableRow], fmt: str = "markdown") -> str:
    """The table as Markdown or LaTeX (notes under it), or CSV or JSON (the metrics named in each row)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    notes = getattr(table, "notes", [])
    compared, with_bench = getattr(table, "compared", True), getattr(table, "with_bench", False)
    headers, rows = table_cells(table)
    if fmt == "markdown":
        return markdown_table(headers, rows) + "\n" + "".join(f"\n{n}" for n in notes) + ("\n" if notes else "")
    if fmt == "csv":
        records = [_csv_record(r, with_bench) for r in table]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buf.getvalue()
    if fmt == "json":
        records = [{k: v for k, v in asdict(r).items() if k != "run_ids"} for r in table]
        return json.dumps(records, indent=2) + "\n"
    return _latex_table(table, headers, notes, compared, with_bench)


def _latex_table(table: list[TableRow], headers: list[str], notes: list[str], compared: bool, with_bench: bool) -> str:
    lines = [
        r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}",
        r"\hline",
        " & ".join(map(_latex, headers)) + r" \\",
        r"\hline",
    ]
    lines += [" & ".join(map(_latex, _cells(r, "±", compared, with_bench))) + r" \\" for r in table]
    lines += [r"\hline", r"\end{tabular}"]
    if notes:  # in a group of its own, so that the small type ends with them
        lines += [r"\par{\footnotesize"] + [_latex(n) + r"\par" for n in notes] + ["}"]
    return "\n".join(lines) + "\n"


def table_cells(table: list[TableRow]) -> tuple[list[str], list[list[str]]]:
    """The headers and each row's cells, as text: what every format of the table shows."""
    select = getattr(table, "select", table[0].select if table else "last")
    compared, with_bench = getattr(table, "compared", True), getattr(table, "with_bench", False)
    headers = columns(select) + (BENCH_COLUMNS if with_bench else [])
    return headers, [_cells(r, "±", compared, with_bench) for r in table]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; a '|' in a cell (a folder or class name) is escaped, or it would start a new cell."""
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, headers)) + " |", "| --- | " + " | ".join([":-:"] * (len(headers) - 1)) + " |"]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


def _latex(text: str) -> str:
    """Text as LaTeX prints it: special characters escaped, and '--select' not turned into a dash."""
    return "-{}-".join(part.translate(LATEX_ESCAPES) for part in text.split("--"))


def _csv_record(row: TableRow, with_bench: bool) -> dict:
    """A row as CSV wants it: one column per group key and, with bench, per bench number."""
    record = asdict(row)
    group, bench = record.pop("group"), record.pop("bench")
    record.pop("run_ids")
    for key, value in group.items():
        record[f"param.{key}" if key in record else key] = value
    if with_bench:
        record.update({f"bench_{k}": (bench or {}).get(k) for k in BENCH_KEYS})
    return record


def _cells(row: TableRow, pm: str = "±", compared: bool = True, with_bench: bool = False) -> list[str]:
    cells = [
        row.name,
        _pm(row.train_eval_acc_mean, row.train_eval_acc_std, pm),
        _pm(row.val_acc_mean, row.val_acc_std, pm),
        _pm(row.gap_mean, row.gap_std, pm, signed=True),
        _delta(row, compared),
        _num(row.params_m),
        str(row.runs),
        row.verdict if compared and row.verdict else "-",
    ]
    if with_bench:
        b = row.bench or {}
        cells += [
            _latency(b),
            _fmt(b.get("flops_per_image"), "{:,.1f}", 1e-6),
            _fmt(b.get("peak_memory_mb"), "{:,.0f}"),
        ]
    return cells


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _pm(mean: float | None, std: float | None, pm: str = "±", signed: bool = False) -> str:
    text = _num(mean, signed)
    return text if mean is None or std is None else f"{text} {pm} {std:.2f}"


def _delta(row: TableRow, compared: bool = True) -> str:
    if not compared:
        return "-"
    if row.is_baseline:
        return "baseline"
    if row.val_acc_vs_baseline is None:
        return "no baseline with these settings"
    text = f"{row.val_acc_vs_baseline:+.2f}"
    if row.ci_low is not None:
        text += f" [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"
    p = row.p_adjusted if row.p_adjusted is not None else row.p_value
    if p is None:
        return text
    return f"{text} (p<0.001)" if p < 0.001 else f"{text} (p={p:.3f})"


def _latency(b: dict) -> str:
    """The bench's median latency, with the range of its rounds' medians when they differ: the
    machine's noise, next to the differences between architectures it may explain."""
    text = _fmt(b.get("latency_ms_median"), "{:.2f}")
    low, high = b.get("latency_ms_median_min"), b.get("latency_ms_median_max")
    if low is not None and high is not None and f"{low:.2f}" != f"{high:.2f}":
        text += f" ({low:.2f}-{high:.2f})"
    return text


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None or not math.isfinite(value) else spec.format(value * scale)
