"""zar compare's numbers mean what their headers say: like-for-like train accuracy, --select best
marked optimistic, rows that never average different settings, Welch CIs and Holm-adjusted p-values,
and runs with a non-finite accuracy left out. Runs are read back from a real SQLite store where
the path through MLflow matters; the statistics are checked on hand-made rows."""

import csv
import io
import itertools
import json
import math
import re
import statistics

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from zar.analysis.fetch import RunRow, fetch_runs
from zar.analysis.grouping import check_comparable, repeated_seeds
from zar.analysis.render import COLUMNS, columns, render
from zar.analysis.stats import holm, welch
from zar.analysis.table import build_table
from zar.errors import UserError
from zar.variants import VARIANTS

from helpers import invoke

SEEDS = itertools.count(1)


def log_run(client, experiment_id, model, val_acc, train_eval_acc=None, depth=34, tags=None, **extra):
    """A FINISHED run as zar logs it: params, tags, and the metrics given (fractions).

    ``train_eval_acc=None`` is a run of a zar older than that metric; ``extra`` holds more
    metrics (names ending in ``_acc`` or ``_best`` or ``params_total``) or params.
    """
    run_id = client.create_run(experiment_id).info.run_id
    params = {"lr": "0.001", "epochs": "1", "data": "synthetic", "dataset": "synthetic", "num_classes": "4"}
    params.update(depth=str(depth), seed=str(next(SEEDS)))
    metrics = {"train_acc": 0.99, "val_acc": val_acc, "params_total": 21_000_000.0}
    if train_eval_acc is not None:
        metrics["train_eval_acc"] = train_eval_acc
    for key, value in extra.items():
        (metrics if isinstance(value, float) else params)[key] = value
    all_tags = {
        "zar.model": model,
        "zar.display_name": VARIANTS[model].display_name(depth),
        "zar.split_fingerprint": "f" * 16,
        **(tags or {}),
    }
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 1) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in all_tags.items()],
    )
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture
def client(store):
    return MlflowClient()


def new_experiment(client, name="zar"):
    return client.create_experiment(name)


def by_name(table):
    return {r.name: r for r in table}


def strict_json(text: str):
    """JSON as other tools read it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def markdown_rows(text: str) -> list[list[str]]:
    return [line.strip("| ").split(" | ") for line in text.splitlines()[2:] if line.startswith("| ")]


# --- 1. the train column is measured like the val column ---------------------------------------------


def test_train_column_is_train_eval_acc_measured_like_val_acc(client):
    exp = new_experiment(client)
    for train_eval, val in ((0.80, 0.75), (0.84, 0.77)):
        log_run(client, exp, "resnet", val, train_eval)  # train_acc (train mode) is 0.99: not shown
    fetched = fetch_runs("zar")
    assert sorted(r.train_eval_acc for r in fetched.rows) == [0.80, 0.84]
    table = build_table(fetched.rows)
    (resnet,) = table
    assert resnet.train_eval_acc_mean == pytest.approx(82.0) and resnet.gap_mean == pytest.approx(6.0)
    text = render(table)
    header = text.splitlines()[0]
    assert "| Train Acc, eval mode (%) |" in header and "| Train - Val gap, eval mode (pp) |" in header
    assert markdown_rows(text)[0][:4] == ["ResNet-34", "82.00 ± 2.83", "76.00 ± 1.41", "+6.00 ± 1.41"]
    assert "99.00" not in text


def test_select_best_reads_train_eval_acc_at_best(client):
    exp = new_experiment(client)
    log_run(
        client,
        exp,
        "resnet",
        0.5,
        0.6,
        best_val_acc=0.72,
        train_acc_at_best=0.99,
        train_eval_acc_at_best=0.70,
        best_epoch=1.0,
    )
    (row,) = fetch_runs("zar", select="best").rows
    assert (row.train_eval_acc, row.val_acc, row.select) == (0.70, 0.72, "best")
    (table_row,) = build_table([row])
    assert table_row.train_eval_acc_mean == pytest.approx(70.0) and table_row.gap_mean == pytest.approx(-2.0)
    assert (table_row.train_metric, table_row.val_metric) == ("train_eval_acc_at_best", "best_val_acc")


def test_runs_of_an_older_zar_show_na_never_their_train_mode_accuracy(client):
    """A row with any run lacking train_eval_acc shows n/a, not a mean of the others nor train_acc."""
    exp = new_experiment(client)
    for val in (0.80, 0.82):
        log_run(client, exp, "resnet", val, train_eval_acc=val + 0.05)
    log_run(client, exp, "plain", 0.60)  # logged before zar measured train_eval_acc
    log_run(client, exp, "plain", 0.62, train_eval_acc=0.65)
    table = build_table(fetch_runs("zar").rows)
    plain = by_name(table)["Plain-34"]
    assert plain.train_eval_acc_mean is None and plain.gap_mean is None and plain.gap_std is None
    assert plain.val_acc_mean == pytest.approx(61.0) and plain.runs == 2  # the val column keeps every run
    assert plain.note == "no train_eval_acc in 1 of 2 runs"
    text = render(table)
    assert markdown_rows(text)[0][:4] == ["Plain-34", "n/a", "61.00 ± 1.41", "n/a"]
    assert (
        "n/a: some runs of Plain-34 were logged before zar measured train_eval_acc (train accuracy in eval mode); "
        "their train-mode train_acc would not compare like with val_acc, so the row shows no train accuracy."
    ) in text.splitlines()
    assert "99.00" not in text
    parsed = strict_json(render(table, "json"))
    assert parsed[0]["train_eval_acc_mean"] is None and parsed[1]["train_eval_acc_mean"] == pytest.approx(86.0)


# --- 2. --select best says what it is -----------------------------------------------------------------


def test_select_best_headers_and_note_say_optimistic(client):
    exp = new_experiment(client)
    for model in ("resnet", "se"):
        log_run(
            client,
            exp,
            model,
            0.5,
            0.6,
            best_val_acc=0.8,
            train_eval_acc_at_best=0.85,
            train_acc_at_best=0.9,
        )
    result = invoke("compare", "--select", "best")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "| Model | Train Acc at best epoch, eval mode (%) | Best-epoch Val Acc (%), optimistic "
        "| Train - Val gap at best epoch, eval mode (pp) "
        "| Best-epoch Val Acc vs baseline (pp) [95% CI] (p), optimistic | Params (M) | Runs | Verdict |"
    )
    assert lines[0] == "| " + " | ".join(columns("best")) + " |"
    assert (
        "optimistic: --select best reports each run's epoch of highest val_acc (best_val_acc), chosen on the "
        "validation set itself, so these val accuracies and their differences lean high; --select last does not choose."
    ) in lines
    rows = markdown_rows(result.stdout)
    assert rows[1][:4] == ["SE-ResNet-34", "85.00", "80.00", "+5.00"]

    parsed = strict_json(invoke("compare", "--select", "best", "--format", "json").stdout)
    assert {(r["select"], r["train_metric"], r["val_metric"]) for r in parsed} == {
        ("best", "train_eval_acc_at_best", "best_val_acc")
    }
    latex = invoke("compare", "--select", "best", "--format", "latex").stdout
    assert r"Best-epoch Val Acc (\%), optimistic" in latex
    notes = latex.split(r"\end{tabular}")[1]
    assert (
        notes.startswith("\n\\par{\\footnotesize\noptimistic: -{}-select best reports") and "best\\_val\\_acc" in notes
    )

    last = invoke("compare").stdout
    assert "optimistic" not in last and last.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"


def test_csv_names_the_select_and_metrics_in_every_row():
    rows = [RunRow(f"r{i}", "resnet", "ResNet-34", 0.9, 0.8, 1, select="best") for i in range(2)]
    parsed = list(csv.DictReader(io.StringIO(render(build_table(rows), "csv"))))
    assert [(r["select"], r["train_metric"], r["val_metric"]) for r in parsed] == [
        ("best", "train_eval_acc_at_best", "best_val_acc")
    ]


def test_runs_read_with_different_selects_are_not_one_table():
    rows = [RunRow("a", "resnet", "ResNet-34", 0.9, 0.8, 1), RunRow("b", "se", "SE", 0.9, 0.8, 1, select="best")]
    with pytest.raises(UserError, match="runs read with different --select: best, last"):
        build_table(rows)


# --- 3. rows never average runs that differ in a setting; each meets its own baseline ---------------------


def row(model, val, depth=34, seed="", **hparams):
    name = VARIANTS[model].display_name(depth)
    return RunRow(f"{name}-{val}", model, name, val + 0.05, val, 1_000_000, depth, {"lr": "0.001", **hparams}, seed)


def test_runs_that_differ_in_a_setting_get_rows_of_their_own_and_their_own_baseline():
    runs = [row("resnet", v) for v in (0.80, 0.82)] + [row("resnet", v, lr="0.01") for v in (0.60, 0.62)]
    runs += [row("plain", v) for v in (0.70, 0.74)] + [row("plain", 0.50, lr="0.01"), row("se", 0.9, lr="0.1")]
    table = build_table(runs)
    assert [(r.name, r.runs) for r in table] == [
        ("Plain-34 (lr=0.001)", 2),
        ("Plain-34 (lr=0.01)", 1),
        ("ResNet-34 (lr=0.001)", 2),
        ("ResNet-34 (lr=0.01)", 2),
        ("SE-ResNet-34 (lr=0.1)", 1),
    ]
    rows = by_name(table)
    assert rows["ResNet-34 (lr=0.01)"].val_acc_mean == pytest.approx(61.0)  # never averaged with lr=0.001
    assert rows["ResNet-34 (lr=0.001)"].is_baseline and rows["ResNet-34 (lr=0.01)"].is_baseline
    assert rows["Plain-34 (lr=0.001)"].baseline == "ResNet-34 (lr=0.001)"
    assert rows["Plain-34 (lr=0.001)"].val_acc_vs_baseline == pytest.approx(72.0 - 81.0)
    assert rows["Plain-34 (lr=0.01)"].baseline == "ResNet-34 (lr=0.01)"
    assert rows["Plain-34 (lr=0.01)"].val_acc_vs_baseline == pytest.approx(50.0 - 61.0)
    se = rows["SE-ResNet-34 (lr=0.1)"]
    assert se.baseline is None and se.val_acc_vs_baseline is None and se.p_value is None
    text = render(table)
    assert markdown_rows(text)[-1][4] == "no baseline with these settings"
    assert (
        "Runs differ in lr: a row averages only runs with the same settings, "
        "and is compared to the resnet row of the same depth and settings."
    ) in text.splitlines()


def test_each_row_meets_the_baseline_of_its_depth():
    runs = [row("resnet", 0.80, 18), row("resnet", 0.70, 34), row("plain", 0.75, 18), row("plain", 0.60, 34)]
    rows = by_name(build_table(runs))
    assert rows["Plain-18"].baseline == "ResNet-18" and rows["Plain-18"].val_acc_vs_baseline == pytest.approx(-5.0)
    assert rows["Plain-34"].baseline == "ResNet-34" and rows["Plain-34"].val_acc_vs_baseline == pytest.approx(-10.0)


def test_only_the_settings_that_differ_name_the_rows():
    runs = [row("resnet", 0.8, epochs="3"), row("resnet", 0.8, lr="0.01", epochs="3", batch_size="64")]
    assert [r.name for r in build_table(runs)] == [  # epochs is the same in both: not named
        "ResNet-34 (lr=0.001, batch_size=unrecorded)",
        "ResNet-34 (lr=0.01, batch_size=64)",
    ]


def test_the_data_fingerprint_splits_rows_and_strict_refuses(client):
    exp = new_experiment(client)
    for fingerprint, val in (("aaaa", 0.8), ("aaaa", 0.82), ("bbbb", 0.6)):
        log_run(client, exp, "resnet", val, val, tags={"zar.data_fingerprint": fingerprint})
    strict = invoke("compare", "--strict")
    assert strict.exit_code == 2 and strict.stdout == ""
    assert strict.stderr == "Error: runs are not comparable, they differ in data_fingerprint: aaaa, bbbb\n"
    loose = invoke("compare", "--format", "json")
    assert loose.exit_code == 0, loose.output
    assert [(r["name"], r["runs"]) for r in strict_json(loose.stdout)] == [
        ("ResNet-34 (data_fingerprint=aaaa)", 2),
        ("ResNet-34 (data_fingerprint=bbbb)", 1),
    ]
    assert loose.stderr.splitlines()[0] == (
        "Warning: runs differ in more than model and seed: data_fingerprint: aaaa, bbbb "
        "(split into rows named by data_fingerprint)"
    )


def test_a_seed_repeats_only_within_a_row():
    runs = [row("resnet", 0.8, seed="42"), row("resnet", 0.6, seed="42", lr="0.01")]
    assert repeated_seeds(runs) == [] and check_comparable(runs, strict=False)[0].startswith("runs differ in")
    runs.append(row("resnet", 0.7, seed="42", lr="0.01"))
    assert repeated_seeds(runs) == ["ResNet-34 (lr=0.01) seed 42 x2"]
    with pytest.raises(UserError, match="runs are not comparable, they differ in lr: 0.001, 0.01$"):
        check_comparable(runs, strict=True)


# --- 4. a difference comes with its Welch 95% CI, and p-values adjusted for the table -------------------


def welch_by_hand(a, b):
    """The textbook Welch interval: se from both variances, Welch–Satterthwaite degrees of freedom."""
    va, vb, na, nb = statistics.variance(a), statistics.variance(b), len(a), len(b)
    se2 = va / na + vb / nb
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    d = statistics.fmean(a) - statistics.fmean(b)
    return d - half, d + half


@pytest.mark.parametrize(
    "a, b",
    [
        ([81.0, 89.0, 86.0], [80.0, 84.0, 83.0]),
        ([60.0, 61.0, 62.0, 59.5], [80.0, 84.0, 70.0]),
        ([1.0, 2.0], [5.0, 5.5]),
    ],
)
def test_welch_ci_is_the_welch_satterthwaite_interval(a, b):
    low, high, p = welch(a, b)
    assert (low, high) == pytest.approx(welch_by_hand(a, b))
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (low, high) == pytest.approx((ci.low, ci.high))
    if min(len(a), len(b)) >= 3:
        assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    else:
        assert p is None


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])  # 0.04 x 1 < 0.03 x 2
    assert holm([0.5, 0.4]) == [0.8, 0.8]  # 0.5 x 1 would undercut 0.4 x 2: kept monotone
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def three_seeds(model, vals):
    return [row(model, v) for v in vals]


def test_table_p_values_are_holm_adjusted_and_the_note_says_so():
    base, se, plain, mish = [0.80, 0.82, 0.81], [0.86, 0.85, 0.88], [0.60, 0.65, 0.62], [0.80, 0.83, 0.82]
    runs = three_seeds("resnet", base) + three_seeds("se", se) + three_seeds("plain", plain)
    runs += three_seeds("mish", mish)
    table = build_table(runs)
    rows = by_name(table)
    pct = lambda v: [100 * x for x in v]
    raw = {
        name: stats.ttest_ind(pct(v), pct(base), equal_var=False).pvalue
        for name, v in (("Plain-34", plain), ("SE-ResNet-34", se), ("Mish-ResNet-34", mish))
    }
    adjusted = dict(zip(raw, holm(list(raw.values()))))
    for name in raw:
        assert rows[name].p_value == pytest.approx(raw[name]) and rows[name].p_adjusted == pytest.approx(adjusted[name])
        assert rows[name].comparisons == 3
    assert any(rows[name].p_adjusted > rows[name].p_value for name in raw)
    text = render(table)
    mish_row = rows["Mish-ResNet-34"]
    cell = (
        f"{mish_row.val_acc_vs_baseline:+.2f} [{mish_row.ci_low:+.2f}, {mish_row.ci_high:+.2f}] "
        f"(p={adjusted['Mish-ResNet-34']:.3f})"
    )
    assert markdown_rows(text)[-1][4] == cell  # the adjusted p, not the raw one
    assert re.fullmatch(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \(p=0\.\d{3}\)", cell)
    assert "p: Welch t-test, Holm-adjusted for 3 comparisons." in text.splitlines()
    assert (
        "[95% CI]: Welch t interval (Welch–Satterthwaite df) of each difference, "
        "not adjusted for the number of comparisons."
    ) in text.splitlines()
    assert "runs per side" not in text

    parsed = strict_json(render(table, "json"))
    got = {r["name"]: r for r in parsed}["Mish-ResNet-34"]
    assert got["p_value"] == pytest.approx(raw["Mish-ResNet-34"])
    assert got["p_adjusted"] == pytest.approx(adjusted["Mish-ResNet-34"])
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((mish_row.ci_low, mish_row.ci_high))
    header = next(csv.reader(io.StringIO(render(table, "csv"))))
    assert {"ci_low", "ci_high", "p_value", "p_adjusted"} <= set(header)


def test_one_test_is_one_comparison():
    runs = three_seeds("resnet", [0.80, 0.82, 0.81]) + three_seeds("se", [0.86, 0.85, 0.88])
    assert "p: Welch t-test, Holm-adjusted for 1 comparison." in render(build_table(runs)).splitlines()


def test_two_runs_a_side_show_the_wide_ci_but_no_p_value():
    """Our choice: with 2 runs a side the Welch CI is valid, only wide (df near 1-2), so it is shown;
    a p-value is not (fewer than 3 runs), and the note says why."""
    runs = three_seeds("resnet", [0.80, 0.84]) + three_seeds("se", [0.85, 0.87]) + [row("plain", 0.6)]
    runs += three_seeds("mish", [0.83, 0.84, 0.86])
    table = build_table(runs)
    se = by_name(table)["SE-ResNet-34"]
    assert se.p_value is None and se.p_adjusted is None
    low, high = welch_by_hand([85.0, 87.0], [80.0, 84.0])
    assert (se.ci_low, se.ci_high) == pytest.approx((low, high))
    assert high - low > 20  # honest: two runs a side know little
    assert by_name(table)["Plain-34"].ci_low is None  # one run: no spread, no interval
    text = render(table)
    assert markdown_rows(text)[2][4] == f"{se.val_acc_vs_baseline:+.2f} [{low:+.2f}, {high:+.2f}]"
    assert "p-values need at least 3 runs per side: none for Plain-34, SE-ResNet-34, Mish-ResNet-34." in text
    assert "p: Welch" not in text


def test_constant_samples_have_neither_ci_nor_p_value():
    runs = three_seeds("resnet", [0.5] * 3) + three_seeds("se", [0.6] * 3)
    se = by_name(build_table(runs))["SE-ResNet-34"]
    assert se.val_acc_vs_baseline == pytest.approx(10.0)
    assert se.ci_low is None and se.p_value is None
    assert "No p-value for SE-ResNet-34: neither side's val accuracy varies across its runs." in render(
        build_table(runs)
    )


# --- 5. a non-finite accuracy leaves its run out, with the reason ----------------------------------------


def test_runs_with_a_non_finite_accuracy_are_left_out_with_the_reason(client):
    exp = new_experiment(client)
    for val in (0.80, 0.82):
        log_run(client, exp, "resnet", val, val)
    log_run(client, exp, "resnet", math.nan, 0.9)  # diverged, yet FINISHED
    log_run(client, exp, "resnet", 0.81, math.inf)  # MLflow's SQL store keeps inf as the largest float
    log_run(client, exp, "resnet", -math.inf, 0.9)
    log_run(client, exp, "resnet", 81.0, 0.9)  # in percent, by hand
    fetched = fetch_runs("zar")
    assert len(fetched.rows) == 2
    assert fetched.left_out == {
        "non-finite val_acc": 2,
        "non-finite train_eval_acc": 1,
        "val_acc outside [0, 1]": 1,
    }
    (resnet,) = build_table(fetched.rows)
    assert resnet.val_acc_mean == pytest.approx(81.0) and resnet.train_eval_acc_mean == pytest.approx(81.0)

    result = invoke("compare", "--format", "json")
    assert result.exit_code == 0, result.output
    assert strict_json(result.stdout)[0]["val_acc_mean"] == pytest.approx(81.0)
    assert result.stderr == (
        "2 runs used, 4 left out (1 non-finite train_eval_acc, 2 non-finite val_acc, 1 val_acc outside [0, 1]).\n"
    )


def test_select_best_leaves_out_a_non_finite_best_val_acc(client):
    exp = new_experiment(client)
    log_run(client, exp, "resnet", 0.8, 0.8, best_val_acc=0.8, train_eval_acc_at_best=0.8)
    log_run(client, exp, "resnet", 0.8, 0.8, best_val_acc=math.nan, train_eval_acc_at_best=0.8)
    assert fetch_runs("zar", select="best").left_out == {"non-finite best_val_acc": 1}


def test_a_non_finite_parameter_count_is_na_not_a_crash(client):
    exp = new_experiment(client)
    log_run(client, exp, "resnet", 0.8, 0.8, params_total=math.nan)
    result = invoke("compare")
    assert result.exit_code == 0, result.output
    assert markdown_rows(result.stdout)[0][-3:] == ["n/a", "1", "-"]


def test_a_key_an_older_run_did_not_record_counts_as_its_default(client):
    """Runs from before `scheduler` existed trained without one: one row with new runs at the default."""
    exp = new_experiment(client)
    log_run(client, exp, "resnet", 0.90, train_eval_acc=0.95)
    log_run(client, exp, "resnet", 0.92, train_eval_acc=0.96, scheduler="none", label_smoothing="0.0")
    log_run(client, exp, "resnet", 0.50, train_eval_acc=0.55, scheduler="cosine")
    result = invoke("compare")
    assert result.exit_code == 0, result.output
    rows = [r[0] for r in markdown_rows(result.stdout)]
    assert rows == ["ResNet-34 (scheduler=cosine)", "ResNet-34 (scheduler=none)"]
    assert "| ResNet-34 (scheduler=none) | 95.50 ± 0.71 | 91.00 ± 1.41 |" in result.stdout


def test_a_baseline_with_rows_at_several_se_ratios_is_refused_not_picked_at_random():
    """Every SE row was marked 'baseline' and ResNet compared to whichever came last."""
    rows = [row("resnet", 0.80, seed=s) for s in "12"]
    for ratio, val in ((4, 0.82), (16, 0.83)):
        name = VARIANTS["se"].display_name(34, ratio)
        rows += [RunRow(f"{name}-{s}", "se", name, val, val, 1, 34, {"lr": "0.001"}, s) for s in "12"]
    with pytest.raises(UserError, match=r"baseline se has more than one row of the same settings \(SE-ResNet-34"):
        build_table(rows, "se")
    assert {r.name: r.is_baseline for r in build_table(rows, "resnet")} == {
        "ResNet-34": True,
        "SE-ResNet-34 (r=4)": False,
        "SE-ResNet-34": False,
    }
