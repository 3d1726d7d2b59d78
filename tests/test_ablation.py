"""Ablations: ``zar study --vary KEY=V1,V2`` makes a child per value and seed, every combination is
checked before any run, and ``zar compare --group-by KEY`` gives a row per value, labelled by it."""

import csv
import io
import json

import pytest
from mlflow.tracking import MlflowClient

from zar.ablation import combinations, describe, parse_vary, plan
from zar.analysis.fetch import RunRow
from zar.analysis.grouping import check_comparable
from zar.analysis.render import render
from zar.analysis.table import build_table
from zar.config import ConfigError, TrainConfig
from zar.errors import UserError
from zar.variants import VARIANTS

from helpers import TINY, invoke, runs_of
from helpers import all_runs as runs
from helpers import children as children_of

# --- --vary as data ----------------------------------------------------------------------------------


def test_vary_reads_each_value_as_its_keys_type_and_makes_a_grid():
    vary = parse_vary(["se_reduction=2,4", "lr=0.1,1e-3;skip-bad-images=true"])
    assert vary == {"se_reduction": [2, 4], "lr": [0.1, 0.001], "skip_bad_images": [True]}
    assert describe(vary) == "se_reduction=2,4;lr=0.1,0.001;skip_bad_images=True"
    assert parse_vary([describe(vary)]) == vary  # the study run's param reads back
    assert len(combinations(vary)) == 4 and combinations({}) == [{}]
    assert parse_vary([""]) == {}  # what 'mlflow run' passes when nothing varies


def test_each_child_is_the_config_with_its_values():
    kids = plan(["se", "resnet"], [1, 2], TrainConfig(), parse_vary(["se_reduction=4,8"]))
    assert [k.label for k in kids] == [
        f"{m} se_reduction={r} seed {s}" for m in ("se", "resnet") for r in (4, 8) for s in (1, 2)
    ]
    assert [(k.cfg.se_reduction, k.cfg.seed) for k in kids[:4]] == [(4, 1), (4, 2), (8, 1), (8, 2)]
    assert plan(["se"], [1], TrainConfig(), {})[0].label == "se seed 1"  # no ablation: as before


@pytest.mark.parametrize(
    "specs, message",
    [
        (["bogus=1,2"], "--vary: unknown config key 'bogus'; valid: lr, "),
        (["seed=1,2"], "--vary seed: vary the seed with --seeds, not --vary"),
        (["model=se,resnet"], "--vary model: vary the model with --models, not --vary"),
        (["se_reduction"], "--vary takes KEY=V1,V2,..., got 'se_reduction'"),
        (["se_reduction=4,x"], "--vary se_reduction: 'x' is not an int"),
        (["lr=0.1,fast"], "--vary lr: 'fast' is not a float"),
        (["se_reduction=4,,8"], "--vary se_reduction: an empty value in '4,,8'"),
        (["lr=0.001,1e-3"], "--vary lr names 0.001 more than once"),
        (["lr=0.1", "lr=0.2"], "--vary names lr twice"),
    ],
)
def test_bad_vary_is_a_config_error(specs, message):
    with pytest.raises(ConfigError) as e:
        parse_vary(specs)
    assert str(e.value).startswith(message), str(e.value)


def test_a_value_the_config_refuses_is_named_with_its_combination():
    with pytest.raises(ConfigError, match=r"^--vary se_reduction=0: config key 'se_reduction' must be between 1"):
        plan(["se"], [1], TrainConfig(), parse_vary(["se_reduction=4,0"]))


# --- compare --group-by on hand-made runs ------------------------------------------------------------


def run(model, val, r=16, seed="1", lr="0.001", params=1_000_000):
    name = VARIANTS[model].display_name(34, r)
    all_params = {"se_reduction": str(r), "seed": seed, "lr": lr}
    return RunRow(f"{model}{r}-{val}", model, name, val, val, params, 34, {"lr": lr}, seed, all_params=all_params)


ABLATION = [
    run("se", v, r, seed, params=1_000_000 + 1000 * r) for r in (32, 4, 16) for v, seed in ((0.8, "1"), (0.9, "2"))
]


def names(table):
    return [r.name for r in table]


def test_group_by_gives_a_row_per_value_in_numeric_order_named_once():
    table = build_table(ABLATION, None, group_by=["se_reduction"])
    assert names(table) == [f"SE-ResNet-34 (se_reduction={r})" for r in (4, 16, 32)]  # never '(r=4) (se_...)'
    assert [r.runs for r in table] == [2, 2, 2] and [r.group for r in table][0] == {"se_reduction": "4"}
    assert len({r.params_m for r in table}) == 3
    # No resnet here: no row is compared, and the table says so rather than refusing.
    text = render(table)
    assert [line.split(" | ")[4] for line in text.splitlines()[2:5]] == ["-"] * 3
    assert any(
        line.startswith("-: no row is compared to a baseline, as this table has no resnet runs")
        for line in text.splitlines()
    )
    assert check_comparable(ABLATION, strict=True, group_by=["se_reduction"]) == []


def test_without_group_by_the_display_names_still_sort_as_numbers():
    assert names(build_table(ABLATION, None)) == ["SE-ResNet-34 (r=4)", "SE-ResNet-34", "SE-ResNet-34 (r=32)"]


def test_baseline_value_compares_each_row_with_its_own_architecture_at_that_value():
    table = build_table(ABLATION, None, baseline_value={"se_reduction": "16"})
    rows = {r.name: r for r in table}
    assert rows["SE-ResNet-34 (se_reduction=16)"].is_baseline
    assert rows["SE-ResNet-34 (se_reduction=4)"].baseline == "SE-ResNet-34 (se_reduction=16)"
    assert rows["SE-ResNet-34 (se_reduction=4)"].val_acc_vs_baseline == pytest.approx(0.0)
    assert "compared to the row of the same architecture with se_reduction=16" in render(table)
    with pytest.raises(UserError, match=r"--baseline-value se_reduction=8: no run has it; values present: 4, 16, 32$"):
        build_table(ABLATION, None, baseline_value={"se_reduction": "8"})


def test_with_resnet_each_value_meets_resnet_at_the_same_value():
    rows = ABLATION + [run("resnet", 0.7, r) for r in (4, 16, 32)]
    table = {r.name: r for r in build_table(rows, None, group_by=["se_reduction"])}
    se4 = table["SE-ResNet-34 (se_reduction=4)"]
    assert se4.baseline == "ResNet-34 (se_reduction=4)" and se4.val_acc_vs_baseline == pytest.approx(15.0)


def test_group_by_a_guarded_key_is_no_warning_and_orders_by_number():
    rows = [run("resnet", 0.8, lr=lr) for lr in ("0.01", "1e-05", "0.001")]
    for r in rows:
        r.hparams["lr"] = str(float(r.hparams["lr"]))
    assert check_comparable(rows, strict=True, group_by=["lr"]) == []
    assert check_comparable(rows, strict=False)[0].startswith("runs differ in more than model and seed: lr")
    table = build_table(rows, None, group_by=["lr"])
    assert names(table) == ["ResNet-34 (lr=1e-05)", "ResNet-34 (lr=0.001)", "ResNet-34 (lr=0.01)"]
    parsed = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    assert [r["lr"] for r in parsed] == ["1e-05", "0.001", "0.01"]  # a column of its own


def test_group_by_several_keys_and_unknown_keys():
    table = build_table(ABLATION, None, group_by=["se_reduction", "seed"])
    assert names(table)[:2] == ["SE-ResNet-34 (se_reduction=4, seed=1)", "SE-ResNet-34 (se_reduction=4, seed=2)"]
    with pytest.raises(UserError, match="--group-by nope: no run in this table records a param 'nope'"):
        build_table(ABLATION, None, group_by=["nope"])
    with pytest.raises(UserError, match="--group-by model: rows are one per architecture already"):
        build_table(ABLATION, None, group_by=["model"])


# --- end to end: zar study --vary, then zar compare --group-by ----------------------------------------


@pytest.mark.slow  # ~20 s: a whole subprocess run; make test-slow (and CI) runs it
def test_ablation_study_trains_a_child_per_value_and_seed_and_groups_its_table(store):
    result = invoke("study", "--models", "se", "--vary", "se_reduction=8,2", "--seeds", "1,2", *TINY)
    assert result.exit_code == 0, result.output
    (parent,) = runs_of(filter_string="tags.`zar.study` = '1'")
    assert parent.data.params["vary"] == "se_reduction=8,2" and "se_reduction" not in parent.data.params
    kids = children_of(parent.info.run_id)
    assert sorted((k.data.params["se_reduction"], k.data.params["seed"]) for k in kids) == [
        ("2", "1"),
        ("2", "2"),
        ("8", "1"),
        ("8", "2"),
    ]
    assert {k.info.status for k in kids} == {"FINISHED"}
    # The study's own table is grouped by the varied key, and says that nothing is compared.
    printed = [line for line in result.output.splitlines() if line.startswith("| SE-ResNet-18")]
    assert [line.split(" | ")[0] for line in printed] == [
        "| SE-ResNet-18 (se_reduction=2)",
        "| SE-ResNet-18 (se_reduction=8)",
    ]
    assert all(line.split(" | ")[4] == "-" for line in printed)
    metrics = MlflowClient().get_run(parent.info.run_id).data.metrics
    assert metrics["runs.se.se_reduction_2"] == 2 and "val_acc_mean.se.se_reduction_8" in metrics

    grouped = invoke("compare", "--group-by", "se_reduction", "--format", "json")
    assert grouped.exit_code == 0, grouped.output
    assert "Warning" not in grouped.stderr
    table = json.loads(grouped.stdout)
    assert [(r["name"], r["runs"]) for r in table] == [
        ("SE-ResNet-18 (se_reduction=2)", 2),
        ("SE-ResNet-18 (se_reduction=8)", 2),
    ]
    assert table[0]["params_m"] != table[1]["params_m"]  # SE's two layers shrink as r grows
    study_table = invoke("compare", "--parent", parent.info.run_id)  # grouped by what the study varied
    assert [line.split(" | ")[0] for line in study_table.stdout.splitlines() if line.startswith("| SE")] == [
        "| SE-ResNet-18 (se_reduction=2)",
        "| SE-ResNet-18 (se_reduction=8)",
    ]
    by_value = invoke("compare", "--baseline-value", "se_reduction=8")
    assert by_value.exit_code == 0, by_value.output
    assert "| SE-ResNet-18 (se_reduction=8) |" in by_value.stdout and "| baseline |" in by_value.stdout
    both = invoke("compare", "--baseline", "se", "--baseline-value", "se_reduction=8")
    assert both.exit_code == 2 and "pass one" in both.stderr


@pytest.mark.slow
def test_ablation_with_jobs_gives_each_child_its_config_through_its_params_file(store):
    result = invoke("study", "--models", "se", "--vary", "se_reduction=2,4", "--jobs", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert "[se se_reduction=2 seed 42] epoch   1/1" in result.output
    assert "[se se_reduction=4 seed 42] epoch   1/1" in result.output
    kids = [r for r in runs() if "zar.model" in r.data.tags]
    assert sorted(k.data.params["se_reduction"] for k in kids) == ["2", "4"]
    assert {k.info.status for k in kids} == {"FINISHED"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vary", "se_reduction=4,0"], "--vary se_reduction=0: config key 'se_reduction' must be between 1 and 64"),
        (["--vary", "bogus=1"], "--vary: unknown config key 'bogus'"),
        (["--vary", "seed=1,2"], "vary the seed with --seeds"),
        (["--vary", "se_reduction=4", "--se-reduction", "8"], "--se-reduction and --vary se_reduction both set"),
        (["--vary", "data=synthetic,no_such_folder"], "data folder no_such_folder does not exist"),
        # where auto picks fp32 (as it does without native bf16), the two values would train each run
        # twice and average it as two samples
        (["--vary", "precision=fp32,auto"], "--vary: precision=fp32 and precision=auto train the same run here"),
    ],
)
def test_a_bad_vary_is_one_line_exit_2_and_no_run(store, args, message, monkeypatch):
    monkeypatch.setattr("zar.learn.engine.native_bf16", lambda device: False)  # auto is fp32, whatever the CPU
    tiny = TINY[2:] if any(a.startswith("data=") for a in args) else TINY  # TINY without its --data synthetic
    if any(a.startswith("precision=") for a in args):  # TINY without its --precision fp32
        tiny = [a for i, a in enumerate(tiny) if a != "--precision" and (i == 0 or tiny[i - 1] != "--precision")]
    result = invoke("study", "--models", "se", *tiny, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert runs() == []
