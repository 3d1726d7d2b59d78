"""The study's table from MLflow runs: fetch (one paged search), then pure functions.

``fetch_runs`` asks MLflow; ``build_table`` turns per-run numbers into per-architecture
rows (mean, std, count, difference to the baseline with a Welch t-test);
``render`` writes the table as Markdown, CSV, JSON or LaTeX.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field

from scipy import stats

from . import runs, tracking
from .config import FIELD_TYPES
from .errors import ZarError
from .variants import VARIANTS

FORMATS = ("markdown", "csv", "json", "latex")
EXTENSIONS = {"markdown": "md", "csv": "csv", "json": "json", "latex": "tex"}
SELECT = ("last", "best")
# What may differ between runs of one table: the architecture and the training seed.
NOT_GUARDED = {"seed", "depth", "se_reduction", "device", "workers"}
GUARDED = [k for k in FIELD_TYPES if k not in NOT_GUARDED] + ["dataset", "num_classes", "split_fingerprint"]
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
    }
)
COLUMNS = [
    "Model",
    "Train Acc (%)",
    "Val Acc (%)",
    "Train - Val gap (pp)",
    "Val Acc vs baseline (pp)",
    "Params (M)",
    "Runs",
]


@dataclass
class RunRow:
    """One training run, reduced to what the table needs."""

    run_id: str
    model: str
    name: str  # display name, the table's row key
    train_acc: float  # fractions in [0, 1]
    val_acc: float
    params_total: int
    depth: int = 34
    hparams: dict[str, str] = field(default_factory=dict)
    seed: str = ""


@dataclass
class TableRow:
    model: str
    name: str
    runs: int
    train_acc_mean: float
    train_acc_std: float | None
    val_acc_mean: float
    val_acc_std: float | None
    gap_mean: float
    gap_std: float | None
    val_acc_vs_baseline: float | None
    p_value: float | None
    params_m: float
    is_baseline: bool = False


@dataclass
class Fetched:
    rows: list[RunRow]
    left_out: Counter  # reason -> count


def fetch_runs(
    experiment: str,
    parent: str | None = None,
    filter_string: str | None = None,
    select: str = "last",
    include_unfinished: bool = False,
) -> Fetched:
    """The runs to compare, as rows, and how many were left out for which reason."""
    if parent and not re.fullmatch(r"[\w-]+", parent):
        raise ZarError(f"bad --parent {parent!r}: a run id is letters, digits, '-' and '_'")
    tracking.check_reachable()
    experiment_id = tracking.get_experiment_id(experiment, create=False)
    clauses = [tracking.children_filter(parent)] if parent else []
    if filter_string:
        clauses.append(filter_string)
    rows, left_out = [], Counter()
    for run in tracking.search_runs(experiment_id, " and ".join(clauses), user_filter=filter_string):
        if tracking.TAG_MODEL not in run.data.tags:
            continue  # a study parent or a run of another tool
        row = run_row(run, select, include_unfinished)
        if isinstance(row, RunRow):
            rows.append(row)
        else:
            left_out[row] += 1
    return Fetched(rows, left_out)


def run_row(run, select: str = "last", include_unfinished: bool = False) -> RunRow | str:
    """One training run as a row of the table, or why it is left out."""
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    if run.info.status != tracking.FINISHED and not include_unfinished:
        return run.info.status
    train_key, val_key = ("train_acc", "val_acc") if select == "last" else ("train_acc_at_best", "best_val_acc")
    if train_key not in metrics or val_key not in metrics:
        return "no metrics yet"
    hparams = {k: _canonical(k, params.get(k, "")) for k in GUARDED}
    hparams["split_fingerprint"] = tags.get(tracking.TAG_FINGERPRINT, "")
    model = tags[tracking.TAG_MODEL]
    return RunRow(
        run.info.run_id,
        model,
        tags.get(tracking.TAG_DISPLAY, model),
        metrics[train_key],
        metrics[val_key],
        int(metrics.get("params_total", 0)),
        int(params.get("depth", 34) or 34),
        hparams,
        params.get("seed", ""),
    )


def require_rows(fetched: Fetched, experiment: str, parent: str | None, filter_string: str | None) -> None:
    """No row to compare is a mistake: say where zar looked and what it left out."""
    if not fetched.rows:
        raise ZarError(
            f"no finished zar runs in experiment '{experiment}'"
            + (f" under parent {parent}" if parent else "")
            + (f" matching {filter_string!r}" if filter_string else "")
            + (f" ({describe_usage(0, fetched.left_out)})" if fetched.left_out else "")
        )


def check_comparable(rows: list[RunRow], strict: bool) -> list[str]:
    """Why the table may mislead, as warnings; with ``strict`` the first reason refuses the table."""
    warnings = []
    differing = differing_hparams(rows)
    if differing:
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in differing.items())
        if strict:
            raise ZarError(f"runs are not comparable, they differ in {detail}")
        warnings.append(f"runs differ in more than model and seed: {detail}")
    repeated = repeated_seeds(rows)
    if repeated:
        message = f"runs repeat a seed, so they are not independent samples: {', '.join(repeated)}"
        if strict:
            raise ZarError(message)
        warnings.append(f"{message} (pick them apart with --parent or --filter)")
    return warnings


def keep_in_env_run(text: str, fmt: str) -> None:
    """Under ``mlflow run -e compare``, the table is kept in the run MLflow made for it."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return
    run = runs.start(tracking.DEFAULT_EXPERIMENT, "compare")  # adopts MLflow's run
    with runs.closing(run.info.run_id, {tracking.TAG_COMPARE: "1"}):
        tracking.log_text(run.info.run_id, text, f"comparison.{EXTENSIONS[fmt]}")


def _canonical(key: str, value: str) -> str:
    """One spelling per number: 'mlflow run -P lr=1e-3' logs '1e-3' where zar logs '0.001'."""
    if FIELD_TYPES.get(key) == "float":
        try:
            return str(float(value))
        except ValueError:
            pass
    return value


def differing_hparams(rows: list[RunRow]) -> dict[str, list[str]]:
    """Hyperparameters that are not the same across all runs: the table would mislead."""
    out = {}
    for key in GUARDED:
        values = sorted({r.hparams.get(key, "") for r in rows})
        if len(values) > 1:
            out[key] = values
    return out


def repeated_seeds(rows: list[RunRow]) -> list[str]:
    """Rows holding several runs of one seed: same config, same seed, so not independent samples."""
    counts = Counter((r.name, r.seed) for r in rows if r.seed)
    return [f"{name} seed {seed} x{n}" for (name, seed), n in counts.items() if n > 1]


def _order(model: str) -> int:
    order = list(VARIANTS)
    return order.index(model) if model in order else len(order)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def build_table(rows: list[RunRow], baseline: str = "resnet") -> list[TableRow]:
    """One row per architecture, in the study's order; accuracies in percent."""
    if baseline not in VARIANTS:
        raise ZarError(f"unknown baseline {baseline!r}; valid: {', '.join(VARIANTS)}")
    if not rows:
        raise ZarError("no runs to compare")
    groups: dict[str, list[RunRow]] = {}
    for r in sorted(rows, key=lambda r: (_order(r.model), r.depth, r.name)):
        groups.setdefault(r.name, []).append(r)
    base_name = next((name for name, g in groups.items() if g[0].model == baseline), None)
    if base_name is None:
        present = ", ".join(dict.fromkeys(r.model for r in rows))
        raise ZarError(f"baseline {baseline!r} has no runs in this table; models present: {present} (pass --baseline)")
    base_val = [100 * r.val_acc for r in groups[base_name]]

    table = []
    for name, g in groups.items():
        train = [100 * r.train_acc for r in g]
        val = [100 * r.val_acc for r in g]
        gap = [t - v for t, v in zip(train, val)]
        (tm, ts), (vm, vs), (gm, gs) = _mean_std(train), _mean_std(val), _mean_std(gap)
        is_base = name == base_name
        delta = None if is_base else vm - statistics.fmean(base_val)
        p = None
        # Two constant samples make t infinite: no evidence either way, so no p-value.
        if not is_base and len(val) >= 2 and len(base_val) >= 2 and (vs or statistics.stdev(base_val)):
            with warnings.catch_warnings():  # nearly equal samples: scipy warns, the p-value stands
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(stats.ttest_ind(val, base_val, equal_var=False).pvalue)
            p = None if math.isnan(p) else p  # identical, constant samples have no test
        table.append(
            TableRow(
                g[0].model,
                name,
                len(g),
                tm,
                ts,
                vm,
                vs,
                gm,
                gs,
                delta,
                p,
                statistics.fmean(r.params_total for r in g) / 1e6,
                is_base,
            )
        )
    return table


def _pm(mean: float, std: float | None, pm: str = "±", signed: bool = False) -> str:
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if std is None else f"{text} {pm} {std:.2f}"


def _delta(row: TableRow) -> str:
    if row.is_baseline:
        return "baseline"
    text = f"{row.val_acc_vs_baseline:+.2f}"
    if row.p_value is None:
        return text
    return f"{text} (p<0.001)" if row.p_value < 0.001 else f"{text} (p={row.p_value:.3f})"


def _cells(row: TableRow, pm: str = "±") -> list[str]:
    return [
        row.name,
        _pm(row.train_acc_mean, row.train_acc_std, pm),
        _pm(row.val_acc_mean, row.val_acc_std, pm),
        _pm(row.gap_mean, row.gap_std, pm, signed=True),
        _delta(row),
        f"{row.params_m:.2f}",
        str(row.runs),
    ]


def render(table: list[TableRow], fmt: str = "markdown") -> str:
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "| --- | " + " | ".join([":-:"] * (len(COLUMNS) - 1)) + " |"]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in table]
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(asdict(table[0])), lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(r) for r in table)
        return buf.getvalue()
    if fmt == "json":
        return json.dumps([asdict(r) for r in table], indent=2) + "\n"
    if fmt == "latex":
        lines = [
            r"\begin{tabular}{l" + "r" * (len(COLUMNS) - 1) + "}",
            r"\hline",
            " & ".join(c.translate(LATEX_ESCAPES) for c in COLUMNS) + r" \\",
            r"\hline",
        ]
        lines += [" & ".join(c.translate(LATEX_ESCAPES) for c in _cells(r)) + r" \\" for r in table]
        lines += [r"\hline", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ZarError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def describe_usage(used: int, left_out: Counter) -> str:
    if not left_out:
        return f"{used} runs used, none left out."
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(left_out.items()))
    return (
        f"{used} runs used, {sum(left_out.values())} left out ({reasons}; --include-unfinished counts unfinished runs)."
    )
