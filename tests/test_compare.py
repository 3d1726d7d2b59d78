"""zar compare and zar study: the table as pure functions, then end to end on real runs."""

import csv
import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from scipy import stats

import zar.train
from conftest import TINY
from zar.cli import cli
from zar.compare import COLUMNS, RunRow, build_table, differing_hparams, render, repeated_seeds
from zar.errors import ZarError

HEADER = "| " + " | ".join(COLUMNS) + " |"


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
    assert se.train_acc_mean == pytest.approx(96.0)
    assert se.val_acc_mean == pytest.approx(85.0)
    assert se.train_acc_std == pytest.approx(np.std([95, 97], ddof=1))  # sample std: sqrt(2) here
    assert se.val_acc_std == pytest.approx(np.std([81, 89], ddof=1))
    assert se.gap_mean == pytest.approx(11.0)  # (95 - 81 + 97 - 89) / 2
    assert se.gap_std == pytest.approx(np.std([14, 8], ddof=1))
    assert se.params_m == pytest.approx(21.5)
    assert rows["Plain-34"].gap_mean == pytest.approx(12.5)


def test_difference_to_baseline_in_points_with_welch_p_value():
    rows = by_name(build_table(RUNS, baseline="resnet"))
    base = rows["ResNet-34"]
    assert base.is_baseline and base.val_acc_vs_baseline is None and base.p_value is None
    for name, val in (("SE-ResNet-34", [81, 89]), ("Plain-34", [60, 61])):
        assert rows[name].val_acc_vs_baseline == pytest.approx(np.mean(val) - 82.0)
        expected = stats.ttest_ind(val, [80, 84], equal_var=False).pvalue
        assert rows[name].p_value == pytest.approx(expected)
    assert sum(r.is_baseline for r in rows.values()) == 1


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
    assert [r.name for r in table] == ["Plain-18", "ResNet-18", "ResNet-34", "SE-ResNet-18", "Mish-ResNet-18",
                                       "SE-Mish-ResNet-18", "ConvNeXt"]
    assert by_name(table)["ResNet-18"].is_baseline  # the first row of the baseline's architecture


def test_unknown_baseline_lists_the_valid_names():
    with pytest.raises(ZarError, match=r"unknown baseline 'resnext'; valid: plain, resnet, se, mish, se_mish$"):
        build_table(RUNS, baseline="resnext")


def test_baseline_without_runs_is_an_error():
    with pytest.raises(ZarError, match="baseline 'mish' has no runs in this table; models present: "):
        build_table(RUNS, baseline="mish")


def test_no_runs_is_an_error():
    with pytest.raises(ZarError, match="no runs to compare"):
        build_table([])


def test_markdown_has_the_study_columns_and_cells():
    lines = render(build_table(RUNS)).splitlines()
    assert lines[0] == ("| Model | Train Acc (%) | Val Acc (%) | Train - Val gap (pp) | Val Acc vs baseline (pp) "
                        "| Params (M) | Runs |")
    assert lines[0] == HEADER
    assert lines[1].count("|") == len(COLUMNS) + 1
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| Plain-34", "| ResNet-34", "| SE-ResNet-34"]
    p = stats.ttest_ind([81, 89], [80, 84], equal_var=False).pvalue
    assert lines[4] == (f"| SE-ResNet-34 | 96.00 ± 1.41 | 85.00 ± 5.66 | +11.00 ± 4.24 | +3.00 (p={p:.3f}) "
                        "| 21.50 | 2 |")
    assert "| ResNet-34 | 92.00 ± 2.83 | 82.00 ± 2.83 | +10.00 ± 0.00 | baseline | 21.30 | 2 |" in lines


def test_markdown_marks_small_p_values():
    runs = [row("resnet", "ResNet-34", 0.9, v) for v in (0.800, 0.801, 0.802)]
    runs += [row("se", "SE-ResNet-34", 0.9, v) for v in (0.900, 0.901, 0.902)]
    assert "+10.00 (p<0.001)" in render(build_table(runs))


def test_csv_parses_to_the_table_numbers():
    table = build_table(RUNS)
    parsed = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    assert len(parsed) == len(table)
    for got, want in zip(parsed, table):
        want = asdict(want)
        assert got["name"] == want["name"] and int(got["runs"]) == want["runs"]
        for key in ("train_acc_mean", "train_acc_std", "val_acc_mean", "val_acc_std", "gap_mean", "params_m"):
            assert float(got[key]) == want[key], key
        assert (got["val_acc_vs_baseline"] == "") == (want["val_acc_vs_baseline"] is None)
        if want["p_value"] is not None:
            assert float(got["p_value"]) == want["p_value"]


def test_json_parses_to_the_table():
    table = build_table(RUNS)
    assert json.loads(render(table, "json")) == [asdict(r) for r in table]


def test_latex_is_a_tabular_with_escaped_text():
    runs = RUNS + [row("my_net", "my_net", 0.9, 0.8), row("rd", "R&D #1", 0.9, 0.8)]
    text = render(build_table(runs), "latex")
    assert text.startswith(r"\begin{tabular}{lrrrrrr}") and text.rstrip().endswith(r"\end{tabular}")
    assert r"Train Acc (\%)" in text and r"$\pm$" in text and r"my\_net" in text and r"R\&D \#1" in text
    assert "±" not in text and "%" not in text.replace(r"\%", "")
    rows = [line for line in text.splitlines() if line.endswith(r" \\")]
    assert len(rows) == 1 + len(build_table(runs))
    assert all(line.count(" & ") == len(COLUMNS) - 1 for line in rows)


def test_latex_keeps_the_less_than_sign():
    runs = [row("resnet", "ResNet-34", 0.9, v) for v in (0.800, 0.801, 0.802)]
    runs += [row("se", "SE-ResNet-34", 0.9, v) for v in (0.900, 0.901, 0.902)]
    assert "(p$<$0.001)" in render(build_table(runs), "latex")  # a bare < prints as an inverted ! in LaTeX


def test_unknown_format_is_an_error():
    with pytest.raises(ZarError, match="unknown format 'html'"):
        render(build_table(RUNS), "html")


def test_differing_hparams_names_the_keys_and_their_values():
    assert differing_hparams(RUNS) == {}
    runs = RUNS + [row("resnet", "ResNet-34", 0.9, 0.8, lr="0.01", seed="7")]
    assert differing_hparams(runs) == {"lr": ["0.001", "0.01"]}  # the seed may differ
    runs.append(row("resnet", "ResNet-34", 0.9, 0.8, split_fingerprint="abc"))
    assert differing_hparams(runs) == {"lr": ["0.001", "0.01"], "split_fingerprint": ["", "abc"]}


# --- end to end: one real study, read back by zar compare ---------------------------------------------

def use_store(mp: pytest.MonkeyPatch, folder: Path, uri: str) -> None:
    """As conftest's ``store`` fixture: this folder, this tracking URI, no run inherited from the shell."""
    mp.chdir(folder)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)


def leave_store() -> None:
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def new_store(tmp_path_factory, empty_store, name: str) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp(name)
    shutil.copy(empty_store, folder / "mlflow.db")
    return folder, f"sqlite:///{folder / 'mlflow.db'}"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="zar")


def runs_of(experiment="zar", filter_string=""):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string)


def children(parent_id: str, experiment="zar"):
    return runs_of(experiment, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def study_parent(experiment="zar"):
    parents = runs_of(experiment, "tags.`zar.study` = '1'")
    assert len(parents) == 1, parents
    return parents[0]


@dataclass
class Study:
    folder: Path
    uri: str
    output: str
    exit_code: int
    parent_id: str
    lr_run_id: str | None = None


@pytest.fixture(scope="module")
def study(tmp_path_factory, empty_store) -> Study:
    """``zar study`` over plain and resnet with two seeds, and one resnet run with another lr beside it."""
    folder, uri = new_store(tmp_path_factory, empty_store, "study")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, folder, uri)
        try:
            result = invoke("study", "--models", "plain,resnet", "--seeds", "1,2", *TINY)
            assert result.exit_code == 0, result.output
            parent_id = study_parent().info.run_id
            other = invoke("train", "--model", "resnet", *TINY, "--lr", "0.01")
            assert other.exit_code == 0, other.output
            lr_run_id = runs_of(filter_string="params.lr = '0.01'")[0].info.run_id
        finally:
            leave_store()
    return Study(folder, uri, result.output, result.exit_code, parent_id, lr_run_id)


def entered(study: Study, monkeypatch):
    """Point MLflow at a module-scoped study's store for one test."""
    use_store(monkeypatch, study.folder, study.uri)
    yield study
    leave_store()


@pytest.fixture
def in_study(study, monkeypatch) -> Study:
    yield from entered(study, monkeypatch)


def test_study_is_one_parent_with_a_nested_run_per_model_and_seed(in_study):
    client = MlflowClient()
    parent = client.get_run(in_study.parent_id)
    assert parent.info.status == "FINISHED"
    assert "zar.model" not in parent.data.tags and parent.data.params["models"] == "plain,resnet"
    kids = children(in_study.parent_id)
    assert len(kids) == 4
    assert all(k.info.status == "FINISHED" for k in kids)
    assert sorted((k.data.tags["zar.model"], k.data.params["seed"]) for k in kids) == [
        ("plain", "1"), ("plain", "2"), ("resnet", "1"), ("resnet", "2")]
    assert in_study.lr_run_id not in {k.info.run_id for k in kids}
    assert f"/runs/{in_study.parent_id}" in in_study.output


def test_study_parent_keeps_the_table_and_two_charts(in_study):
    client = MlflowClient()
    pid = in_study.parent_id
    names = {a.path for a in client.list_artifacts(pid)}
    assert {"comparison.md", "comparison.csv"} <= names
    charts = sorted(n for n in names if n.endswith(".png"))
    assert charts == ["final_val_acc.png", "val_acc_per_epoch.png"]
    for chart in charts:
        assert Path(client.download_artifacts(pid, chart)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(client.download_artifacts(pid, "comparison.md")).read_text().splitlines()
    assert md[0] == HEADER
    assert [line.split(" | ")[0] for line in md[2:4]] == ["| Plain-18", "| ResNet-18"]
    assert md[-1] == "4 runs used, none left out."
    assert HEADER in in_study.output  # the study prints the table too

    table = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(pid, "comparison.csv")).read_text())))
    cli_json = json.loads(invoke("compare", "--parent", pid, "--format", "json").stdout)
    assert [r["name"] for r in table] == [r["name"] for r in cli_json]
    for got, want in zip(table, cli_json):
        assert float(got["val_acc_mean"]) == want["val_acc_mean"]


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on nearly equal accuracies
def test_compare_parent_numbers_are_those_mlflow_recorded(in_study):
    result = invoke("compare", "--parent", in_study.parent_id, "--format", "json")
    assert result.exit_code == 0, result.output
    assert result.stderr == "4 runs used, none left out.\n"  # no warning: the runs differ only in model and seed
    table = json.loads(result.stdout)

    recorded = {}
    for kid in children(in_study.parent_id):
        m = kid.data.metrics
        recorded.setdefault(kid.data.tags["zar.model"], []).append(
            (100 * m["train_acc"], 100 * m["val_acc"], m["params_total"]))
    assert [r["model"] for r in table] == ["plain", "resnet"]
    assert [r["name"] for r in table] == ["Plain-18", "ResNet-18"]
    base_val = [v for _, v, _ in recorded["resnet"]]
    for r in table:
        train, val, params = (np.array(x) for x in zip(*recorded[r["model"]]))
        assert r["runs"] == 2
        assert r["train_acc_mean"] == pytest.approx(train.mean())
        assert r["train_acc_std"] == pytest.approx(train.std(ddof=1), abs=1e-9)
        assert r["val_acc_mean"] == pytest.approx(val.mean())
        assert r["val_acc_std"] == pytest.approx(val.std(ddof=1), abs=1e-9)
        assert r["gap_mean"] == pytest.approx((train - val).mean(), abs=1e-9)
        assert r["params_m"] == pytest.approx(params.mean() / 1e6)
        assert r["is_baseline"] == (r["model"] == "resnet")
        if r["model"] == "plain":
            assert r["val_acc_vs_baseline"] == pytest.approx(val.mean() - np.mean(base_val), abs=1e-9)
            p = stats.ttest_ind(val, base_val, equal_var=False).pvalue
            assert r["p_value"] == (None if np.isnan(p) else pytest.approx(p))
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
    assert text.startswith(r"\begin{tabular}") and text.rstrip().endswith(r"\end{tabular}")
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
    assert warnings == ["Warning: runs differ in more than model and seed: lr: 0.001, 0.01"]
    assert "| ResNet-18 |" in result.stdout and result.stdout.rstrip().endswith("5 runs used, none left out.")


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


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "no MLflow experiment named 'nope'"),
    (["--baseline", "resnext"], "unknown baseline 'resnext'; valid: plain, resnet, se, mish, se_mish"),
    (["--baseline", "se"], "baseline 'se' has no runs in this table; models present: "),
    (["--filter", "params.lr = 0.01"], "bad --filter 'params.lr = 0.01': Expected a quoted string value"),
    (["--filter", "nonsense"], "bad --filter 'nonsense'"),
    (["--parent", "0123"], "no finished zar runs in experiment 'zar' under parent 0123"),
    (["--parent", "a'b"], "bad --parent \"a'b\": a run id is"),
    (["--filter", "params.lr = '0.5'"], "no finished zar runs in experiment 'zar' matching"),
])
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
    for key, value in {"lr": "0.001", "weight_decay": "0.0001", "epochs": "1", "data": "synthetic",
                       "dataset": "synthetic", "num_classes": "4", **params}.items():
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
    assert result.stderr == ("1 runs used, 2 left out (1 KILLED, 1 RUNNING; "
                             "--include-unfinished counts unfinished runs).\n")
    result = invoke("compare", "--experiment", "mixed", "--format", "json", "--include-unfinished")
    assert json.loads(result.stdout)[0]["val_acc_mean"] == pytest.approx(70.0)


# --- a study whose child fails --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def failed_study(tmp_path_factory, empty_store) -> Study:
    """``zar study`` over plain and resnet where plain's run fails after its epoch (its results cannot be saved)."""
    folder, uri = new_store(tmp_path_factory, empty_store, "failed")
    log_results = zar.train._log_results

    def failing_for_plain(*args, **kwargs):
        if mlflow.active_run().info.run_name.startswith("plain-"):
            raise OSError(28, "No space left on device")
        return log_results(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, folder, uri)
        mp.setattr(zar.train, "_log_results", failing_for_plain)
        try:
            result = invoke("study", "--models", "plain,resnet", "--seeds", "1", *TINY)
            parent_id = study_parent().info.run_id
        finally:
            leave_store()
    return Study(folder, uri, result.output, result.exit_code, parent_id)


@pytest.fixture
def in_failed_study(failed_study, monkeypatch) -> Study:
    yield from entered(failed_study, monkeypatch)


def test_study_goes_on_past_a_failed_child_and_ends_failed(in_failed_study):
    s = in_failed_study
    assert s.exit_code == 1
    assert s.output.splitlines()[-1] == ("Error: 1 of 2 runs failed: plain seed 1: "
                                         "OSError: [Errno 28] No space left on device")
    kids = {k.data.tags["zar.model"]: k for k in children(s.parent_id)}
    assert kids["plain"].info.status == "FAILED"
    assert "No space left on device" in kids["plain"].data.tags["zar.error"]
    assert kids["resnet"].info.status == "FINISHED"
    parent = MlflowClient().get_run(s.parent_id)
    assert parent.info.status == "FAILED"
    assert "1 of 2 runs failed: plain seed 1: OSError" in parent.data.tags["zar.error"]


def test_failed_study_keeps_the_table_of_what_finished(in_failed_study):
    md = Path(MlflowClient().download_artifacts(in_failed_study.parent_id, "comparison.md")).read_text()
    assert "| ResNet-18 |" in md and "Plain-18" not in md
    assert md.splitlines()[-1] == "1 runs used, 1 left out (1 FAILED; --include-unfinished counts unfinished runs)."


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


# --- a study inside 'mlflow run': MLflow made the parent run ------------------------------------------------

def test_study_nests_its_runs_under_the_run_mlflow_run_created(store, monkeypatch):
    client = MlflowClient()
    env_run = client.create_run(client.create_experiment("zar")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", env_run)

    def no_model(*args, **kwargs):  # the child fails at once: what matters here is where its run lives
        raise RuntimeError("no model today")

    monkeypatch.setattr(zar.train, "build_model", no_model)
    result = invoke("study", "--models", "resnet", "--seeds", "3", *TINY)
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "Error: 1 of 1 runs failed: resnet seed 3: RuntimeError: no model today"
    parent = client.get_run(env_run)
    assert parent.data.tags["zar.study"] == "1" and "zar.model" not in parent.data.tags
    assert parent.info.status == "FAILED" and "1 of 1 runs failed" in parent.data.tags["zar.error"]
    kids = children(env_run)
    assert [(k.data.tags["zar.model"], k.info.status) for k in kids] == [("resnet", "FAILED")]
    assert len(runs_of()) == 2


def test_repeated_seeds_are_named():
    rows = [row("resnet", "ResNet-34", 0.9, 0.8), row("resnet", "ResNet-34", 0.9, 0.8),
            row("se", "SE-ResNet-34", 0.91, 0.82)]
    rows[0].seed = rows[1].seed = "42"
    rows[2].seed = "42"
    assert repeated_seeds(rows) == ["ResNet-34 seed 42 x2"]
    rows[1].seed = "43"
    assert repeated_seeds(rows) == []
