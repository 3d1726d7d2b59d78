"""zar compare: the table as pure functions, then end to end on the runs of real studies."""

import csv
import io
import json
import re
from dataclasses import asdict

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from zar.analysis.fetch import RunRow
from zar.analysis.grouping import differing_hparams, repeated_seeds
from zar.analysis.render import COLUMNS, render
from zar.analysis.table import build_table
from zar.errors import UserError

from helpers import HEADER, children, invoke

# --- build_table and render on hand-made runs --------------------------------------------------------


def row(model, name, train, val, params=1_000_000, depth=34, **hparams):
    return RunRow(f"{name}-{train}-{val}", model, name, train, val, params, depth, {"lr": "0.001", **hparams})


# Two seeds of three architectures, accuracies as fractions.
RUNS = [
    row("se", "SE-ResNet-34", 0.95, 0.81, params=21_500_000),
    row("resnet", "ResNet-34", 0.90, 0.80, params=21_300_000),
    row("plain", "Plain-34", 0.70, 0.60, params=21_000_000),
    row("resnet", "ResNet-34", 0.94, 0.84, params=21_300_000),
    row("se", "SE-ResNet-34", 0.97, 0.89, params=21_500_000),
    row("plain", "Plain-34", 0.76, 0.61, params=21_000_000),
]


def by_name(table):
    return {r.name: r for r in table}


def test_table_means_stds_counts_and_gap_in_percent():
    rows = by_name(build_table(RUNS))
    se = rows["SE-ResNet-34"]
    assert se.runs == 2
    assert se.train_eval_acc_mean == pytest.approx(96.0)
    assert se.val_acc_mean == pytest.approx(85.0)
    assert se.train_eval_acc_std == pytest.approx(np.std([95, 97], ddof=1))  # sample std: sqrt(2) here
    assert se.val_acc_std == pytest.approx(np.std([81, 89], ddof=1))
    assert se.gap_mean == pytest.approx(11.0)  # (95 - 81 + 97 - 89) / 2
    assert se.gap_std == pytest.approx(np.std([14, 8], ddof=1))
    assert se.params_m == pytest.approx(21.5)
    assert rows["Plain-34"].gap_mean == pytest.approx(12.5)


def test_difference_to_baseline_in_points_with_welch_ci_and_no_p_value_from_two_runs():
    rows = by_name(build_table(RUNS, baseline="resnet"))
    base = rows["ResNet-34"]
    assert base.is_baseline and base.val_acc_vs_baseline is None and base.p_value is None
    for name, val in (("SE-ResNet-34", [81, 89]), ("Plain-34", [60, 61])):
        assert rows[name].val_acc_vs_baseline == pytest.approx(np.mean(val) - 82.0)
        ci = stats.ttest_ind(val, [80, 84], equal_var=False).confidence_interval(0.95)
        assert (rows[name].ci_low, rows[name].ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert rows[name].p_value is None and rows[name].p_adjusted is None  # 2 runs a side: no p-value
    assert sum(r.is_baseline for r in rows.values()) == 1


# A third seed of each: enough runs for a p-value.
RUNS3 = RUNS + [
    row("se", "SE-ResNet-34", 0.96, 0.86, params=21_500_000),
    row("resnet", "ResNet-34", 0.92, 0.83, params=21_300_000),
    row("plain", "Plain-34", 0.73, 0.62, params=21_000_000),
]


def test_difference_to_baseline_in_points_with_welch_p_value():
    rows = by_name(build_table(RUNS3, baseline="resnet"))
    assert rows["ResNet-34"].p_value is None
    for name, val in (("SE-ResNet-34", [81, 89, 86]), ("Plain-34", [60, 61, 62])):
        assert rows[name].val_acc_vs_baseline == pytest.approx(np.mean(val) - np.mean([80, 84, 83]))
        expected = stats.ttest_ind(val, [80, 84, 83], equal_var=False).pvalue
        assert rows[name].p_value == pytest.approx(expected)
        assert rows[name].comparisons == 2


def test_another_baseline_moves_the_differences():
    rows = by_name(build_table(RUNS, baseline="plain"))
    assert rows["Plain-34"].is_baseline and rows["Plain-34"].val_acc_vs_baseline is None
    assert rows["ResNet-34"].val_acc_vs_baseline == pytest.approx(82.0 - 60.5)


def test_single_runs_have_no_std_and_no_test():
    table = build_table([row("resnet", "ResNet-34", 0.9, 0.8), row("mish", "Mish-ResNet-34", 0.9, 0.85)])
    mish = by_name(table)["Mish-ResNet-34"]
    assert mish.runs == 1 and mish.val_acc_std is None and mish.gap_std is None
    assert mish.val_acc_vs_baseline == pytest.approx(5.0) and mish.p_value is None
    assert "| Mish-ResNet-34 | 90.00 | 85.00 | +5.00 | +5.00 | 1.00 | 1 |" in render(table)


def test_identical_constant_samples_have_no_p_value():
    runs = [row(m, m, 0.5, 0.5) for m in ("resnet", "resnet", "se", "se")]
    se = by_name(build_table(runs))["se"]
    assert se.val_acc_vs_baseline == 0 and se.val_acc_std == 0 and se.p_value is None


def test_rows_follow_the_study_order_then_others():
    names = ["ConvNeXt", "SE-Mish-ResNet-18", "Mish-ResNet-18", "SE-ResNet-18", "ResNet-34", "ResNet-18", "Plain-18"]
    models = ["convnext", "se_mish", "mish", "se", "resnet", "resnet", "plain"]
    depths = [18, 18, 18, 18, 34, 18, 18]
    runs = [row(m, n, 0.9, 0.8, depth=d) for m, n, d in zip(models, names, depths)]
    table = build_table(runs)
    assert [r.name for r in table] == [
        "Plain-18",
        "ResNet-18",
        "ResNet-34",
        "SE-ResNet-18",
        "Mish-ResNet-18",
        "SE-Mish-ResNet-18",
        "ConvNeXt",
    ]
    assert by_name(table)["ResNet-18"].is_baseline  # the first row of the baseline's architecture


def test_unknown_baseline_lists_the_valid_names():
    with pytest.raises(UserError, match=r"unknown baseline 'resnext'; valid: plain, resnet, se, mish, se_mish$"):
        build_table(RUNS, baseline="resnext")


def test_baseline_without_runs_is_an_error():
    with pytest.raises(UserError, match="baseline 'mish' has no runs in this table; models present: "):
        build_table(RUNS, baseline="mish")


def test_no_runs_is_an_error():
    with pytest.raises(UserError, match="no runs to compare"):
        build_table([])


def test_markdown_has_the_study_columns_and_cells():
    lines = render(build_table(RUNS)).splitlines()
    assert lines[0] == (
        "| Model | Train Acc, eval mode (%) | Val Acc (%) | Train - Val gap, eval mode (pp) "
        "| Val Acc vs baseline (pp) [95% CI] (p) | Params (M) | Runs | Verdict |"
    )
    assert lines[0] == HEADER
    assert lines[1].count("|") == len(COLUMNS) + 1
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| Plain-34", "| ResNet-34", "| SE-ResNet-34"]
    ci = stats.ttest_ind([81, 89], [80, 84], equal_var=False).confidence_interval(0.95)
    assert lines[4] == (
        f"| SE-ResNet-34 | 96.00 ± 1.41 | 85.00 ± 5.66 | +11.00 ± 4.24 | +3.00 [{ci.low:+.2f}, {ci.high:+.2f}] "
        "| 21.50 | 2 | undecided (~36 seeds) |"  # a t-test's 80% power at d = 3 / sqrt((5.66² + 2.83²) / 2)
    )
    assert "| ResNet-34 | 92.00 ± 2.83 | 82.00 ± 2.83 | +10.00 ± 0.00 | baseline | 21.30 | 2 | - |" in lines


def test_markdown_marks_small_p_values():
    runs = [row("resnet", "ResNet-34", 0.9, v) for v in (0.800, 0.801, 0.802)]
    runs += [row("se", "SE-ResNet-34", 0.9, v) for v in (0.900, 0.901, 0.902)]
    assert re.search(r"\| \+10\.00 \[\+9\.\d\d, \+10\.\d\d\] \(p<0\.001\) \|", render(build_table(runs)))


def test_csv_parses_to_the_table_numbers():
    table = build_table(RUNS)
    parsed = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    assert len(parsed) == len(table)
    for got, want in zip(parsed, table):
        want = asdict(want)
        assert got["name"] == want["name"] and int(got["runs"]) == want["runs"]
        for key in ("train_eval_acc_mean", "train_eval_acc_std", "val_acc_mean", "val_acc_std", "gap_mean", "params_m"):
            assert float(got[key]) == want[key], key
        assert (got["val_acc_vs_baseline"] == "") == (want["val_acc_vs_baseline"] is None)
        if want["p_value"] is not None:
            assert float(got["p_value"]) == want["p_value"]


def test_json_parses_to_the_table():
    table = build_table(RUNS)
    # Every field but the run ids, which the table keeps for zar report.
    assert json.loads(render(table, "json")) == [{k: v for k, v in asdict(r).items() if k != "run_ids"} for r in table]


def test_latex_is_a_tabular_with_escaped_text():
    runs = RUNS + [row("my_net", "my_net", 0.9, 0.8), row("rd", "R&D #1", 0.9, 0.8)]
    text = render(build_table(runs), "latex")
    assert text.startswith(r"\begin{tabular}{lrrrrrrr}") and text.count(r"\end{tabular}") == 1
    notes = text.split("\\end{tabular}\n")[1]  # the notes, in a group of small type after the tabular
    assert notes.startswith(r"\par{\footnotesize") and notes.rstrip().endswith("}") and "runs per side" in notes
    assert r"Train Acc, eval mode (\%)" in text and r"$\pm$" in text and r"my\_net" in text and r"R\&D \#1" in text
    assert "±" not in text and "%" not in text.replace(r"\%", "")
    rows = [line for line in text.splitlines() if line.endswith(r" \\")]
    assert len(rows) == 1 + len(build_table(runs))
    assert all(line.count(" & ") == len(COLUMNS) - 1 for line in rows)


def test_latex_keeps_the_less_than_sign():
    runs = [row("resnet", "ResNet-34", 0.9, v) for v in (0.800, 0.801, 0.802)]
    runs += [row("se", "SE-ResNet-34", 0.9, v) for v in (0.900, 0.901, 0.902)]
    assert "(p$<$0.001)" in render(build_table(runs), "latex")  # a bare < prints as an inverted ! in LaTeX


def test_unknown_format_is_an_error():
    with pytest.raises(UserError, match="unknown format 'html'"):
        render(build_table(RUNS), "html")


def test_differing_hparams_names_the_keys_and_their_values():
    assert differing_hparams(RUNS) == {}
    runs = RUNS + [row("resnet", "ResNet-34", 0.9, 0.8, lr="0.01", seed="7")]
    assert differing_hparams(runs) == {"lr": ["0.001", "0.01"]}  # the seed may differ
    runs.append(row("resnet", "ResNet-34", 0.9, 0.8, split_fingerprint="abc"))
    assert differing_hparams(runs) == {"lr": ["0.001", "0.01"], "split_fingerprint": ["", "abc"]}


# --- end to end: a real study (conftest's ``study``), read back by zar compare ---------------------------


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on nearly equal accuracies
def test_compare_parent_numbers_are_those_mlflow_recorded(in_study):
    result = invoke("compare", "--parent", in_study.parent_id, "--format", "json")
    assert result.exit_code == 0, result.output
    assert result.stderr == "4 runs used, none left out.\n"  # no warning: the runs differ only in model and seed
    table = json.loads(result.stdout)

    recorded = {}
    for kid in children(in_study.parent_id):
        m = kid.data.metrics
        train = 100 * m["train_eval_acc"] if "train_eval_acc" in m else None  # None: an older zar's runs
        recorded.setdefault(kid.data.tags["zar.model"], []).append((train, 100 * m["val_acc"], m["params_total"]))
    assert [r["model"] for r in table] == ["plain", "resnet"]
    assert [r["name"] for r in table] == ["Plain-18", "ResNet-18"]
    base_val = np.array([v for _, v, _ in recorded["resnet"]])
    for r in table:
        train, val, params = zip(*recorded[r["model"]])
        val, params = np.array(val), np.array(params)
        assert (r["select"], r["train_metric"], r["val_metric"]) == ("last", "train_eval_acc", "val_acc")
        assert r["runs"] == 2
        if None in train:  # never train_acc (train mode) in its place
            assert r["train_eval_acc_mean"] is None and r["gap_mean"] is None
        else:
            train = np.array(train)
            assert r["train_eval_acc_mean"] == pytest.approx(train.mean())
            assert r["train_eval_acc_std"] == pytest.approx(train.std(ddof=1), abs=1e-9)
            assert r["gap_mean"] == pytest.approx((train - val).mean(), abs=1e-9)
        assert r["val_acc_mean"] == pytest.approx(val.mean())
        assert r["val_acc_std"] == pytest.approx(val.std(ddof=1), abs=1e-9)
        assert r["params_m"] == pytest.approx(params.mean() / 1e6)
        assert r["is_baseline"] == (r["model"] == "resnet")
        if r["model"] == "plain":
            assert r["baseline"] == "ResNet-18"
            assert r["val_acc_vs_baseline"] == pytest.approx(val.mean() - base_val.mean(), abs=1e-9)
            assert r["p_value"] is None  # 2 runs a side
            if val.std() or base_val.std():
                ci = stats.ttest_ind(val, base_val, equal_var=False).confidence_interval(0.95)
                assert (r["ci_low"], r["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
            else:
                assert r["ci_low"] is None and r["ci_high"] is None
    assert table[0]["params_m"] != table[1]["params_m"]  # a plain net has no projection shortcuts


def parse(fmt: str, text: str):
    if fmt == "markdown":
        lines = text.splitlines()
        assert lines[0] == HEADER and lines[-1] == "4 runs used, none left out."
        return [line.split(" | ")[0].lstrip("| ") for line in lines[2:] if line.startswith("|")]
    if fmt == "csv":
        return [r["name"] for r in csv.DictReader(io.StringIO(text))]
    if fmt == "json":
        return [r["name"] for r in json.loads(text)]
    assert text.startswith(r"\begin{tabular}") and r"\end{tabular}" in text
    return [line.split(" & ")[0] for line in text.splitlines() if line.endswith(r" \\")][1:]


@pytest.mark.parametrize("fmt", ["markdown", "csv", "json", "latex"])
def test_compare_every_format(in_study, fmt):
    result = invoke("compare", "--parent", in_study.parent_id, "--format", fmt)
    assert result.exit_code == 0, result.output
    assert parse(fmt, result.stdout) == ["Plain-18", "ResNet-18"]


def test_compare_output_file(in_study):
    result = invoke("compare", "--parent", in_study.parent_id, "--format", "csv", "--output", "table.csv")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "Wrote table.csv" in result.stderr
    assert parse("csv", (in_study.folder / "table.csv").read_text()) == ["Plain-18", "ResNet-18"]


def test_compare_warns_when_runs_differ_in_more_than_model_and_seed(in_study):
    result = invoke("compare")  # the whole experiment: the study's runs and the one with lr 0.01
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning")]
    assert warnings == [
        "Warning: runs differ in more than model and seed: lr: 0.001, 0.01 (split into rows named by lr)"
    ]
    rows = [line.split(" | ")[0] for line in result.stdout.splitlines()[2:] if line.startswith("| ")]
    assert rows == ["| Plain-18 (lr=0.001)", "| ResNet-18 (lr=0.001)", "| ResNet-18 (lr=0.01)"]  # never averaged
    assert result.stdout.rstrip().endswith("5 runs used, none left out.")


def test_compare_strict_refuses_runs_that_differ(in_study):
    result = invoke("compare", "--strict")
    assert result.exit_code != 0
    assert result.stdout == ""
    assert result.stderr == "Error: runs are not comparable, they differ in lr: 0.001, 0.01\n"


def test_compare_filter_narrows_the_runs(in_study):
    result = invoke("compare", "--strict", "--filter", "params.lr = '0.01'", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [(r["name"], r["runs"]) for r in json.loads(result.stdout)] == [("ResNet-18", 1)]
    assert result.stderr == "1 runs used, none left out.\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment", "nope"], "no MLflow experiment named 'nope'"),
        (["--baseline", "resnext"], "unknown baseline 'resnext'; valid: plain, resnet, se, mish, se_mish"),
        (["--baseline", "se"], "baseline 'se' has no runs in this table; models present: "),
        (["--filter", "params.lr = 0.01"], "bad --filter 'params.lr = 0.01': Expected a quoted string value"),
        (["--filter", "nonsense"], "bad --filter 'nonsense'"),
        (["--parent", "0123"], "no finished zar runs in experiment 'zar' under parent 0123"),
        (["--parent", "a'b"], 'bad --parent "a\'b": a run id is'),
        (["--filter", "params.lr = '0.5'"], "no finished zar runs in experiment 'zar' matching"),
    ],
)
def test_compare_mistakes_are_one_line_and_non_zero(in_study, args, message):
    result = invoke("compare", *(["--parent", in_study.parent_id] if "--baseline" in args else []), *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_compare_empty_experiment_is_an_error(store):
    MlflowClient().create_experiment("empty")
    result = invoke("compare", "--experiment", "empty")
    assert result.exit_code == 2
    assert result.output == "Error: no finished zar runs in experiment 'empty'\n"


# --- runs written through MLflow's client: how other tools may spell the same values ---------------------


def logged_run(client, experiment_id, model, train_acc, val_acc, status="FINISHED", **params):
    run_id = client.create_run(experiment_id).info.run_id
    for key, value in {
        "lr": "0.001",
        "weight_decay": "0.0001",
        "epochs": "1",
        "data": "synthetic",
        "dataset": "synthetic",
        "num_classes": "4",
        **params,
    }.items():
        client.log_param(run_id, key, value)
    client.set_tag(run_id, "zar.model", model)
    client.set_tag(run_id, "zar.split_fingerprint", "f" * 16)
    client.log_metric(run_id, "train_acc", train_acc)
    client.log_metric(run_id, "val_acc", val_acc)
    client.set_terminated(run_id, status)
    return run_id


def test_equal_numbers_spelled_differently_are_not_a_difference(store):
    client = MlflowClient()
    exp = client.create_experiment("spelled")
    logged_run(client, exp, "resnet", 0.9, 0.8)
    logged_run(client, exp, "resnet", 0.9, 0.8, lr="1e-3", weight_decay="1e-4")  # as 'mlflow run -P' logs them
    result = invoke("compare", "--experiment", "spelled", "--strict")
    assert result.exit_code == 0, result.output
    logged_run(client, exp, "plain", 0.9, 0.8, lr="1e-2")
    result = invoke("compare", "--experiment", "spelled", "--strict")
    assert result.exit_code == 2
    assert "they differ in lr: 0.001, 0.01" in result.stderr


def test_runs_still_running_or_killed_are_counted_as_left_out(store):
    client = MlflowClient()
    exp = client.create_experiment("mixed")
    logged_run(client, exp, "resnet", 0.9, 0.8)
    logged_run(client, exp, "resnet", 0.9, 0.6, status="KILLED")
    logged_run(client, exp, "resnet", 0.9, 0.7, status="RUNNING")
    result = invoke("compare", "--experiment", "mixed", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["val_acc_mean"] == pytest.approx(80.0)
    assert result.stderr == (
        "1 runs used, 2 left out (1 KILLED, 1 RUNNING; --include-unfinished counts unfinished runs).\n"
    )
    result = invoke("compare", "--experiment", "mixed", "--format", "json", "--include-unfinished")
    assert json.loads(result.stdout)[0]["val_acc_mean"] == pytest.approx(70.0)


# --- a study whose child failed --------------------------------------------------------------------------


def test_compare_leaves_the_failed_run_out_unless_asked(in_failed_study):
    pid = in_failed_study.parent_id
    result = invoke("compare", "--parent", pid)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| ResNet-18"]
    assert "1 runs used, 1 left out (1 FAILED; --include-unfinished counts unfinished runs)." in result.stdout

    result = invoke("compare", "--parent", pid, "--include-unfinished", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [(r["name"], r["runs"]) for r in json.loads(result.stdout)] == [("Plain-18", 1), ("ResNet-18", 1)]
    assert result.stderr == "2 runs used, none left out.\n"


# --- seeds ---------------------------------------------------------------------------------------------


def test_repeated_seeds_are_named():
    rows = [
        row("resnet", "ResNet-34", 0.9, 0.8),
        row("resnet", "ResNet-34", 0.9, 0.8),
        row("se", "SE-ResNet-34", 0.91, 0.82),
    ]
    rows[0].seed = rows[1].seed = "42"
    rows[2].seed = "42"
    assert repeated_seeds(rows) == ["ResNet-34 seed 42 x2"]
    rows[1].seed = "43"
    assert repeated_seeds(rows) == []
