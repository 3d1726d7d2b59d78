"""zar sweep: Optuna studies per architecture, trials as child runs, pruning, failures, continuing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

import zar.sweep as sweep_module
from zar.analysis.trials import BestTrial, BestTrials
from zar.config import TrainConfig, load_config
from zar.space import dims_for, load_space, parse_space
from zar.sweep import grid_points

from helpers import ROOT, TINY, children, default_sigint, epochs, invoke, runs_of, zar_subprocess

TWO_EPOCHS = epochs(2)
# lr 1e-7 learns nothing in 2 epochs: below the median of a finished lr 1e-3 trial, so pruned after
# epoch 1; lr 1e30 makes the loss inf in its first batches: diverged, so FAILED.
PRUNE_AND_FAIL = {"lr": {"choice": [1.0e-3, 1.0e-7, 1.0e30]}}


def write_space(folder: Path, space: dict) -> str:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def sweep_parent(experiment="zar"):
    (parent,) = runs_of(experiment, "tags.`zar.sweep` = '1'")
    return parent


def trial_runs(parent_id: str):
    return [r for r in children(parent_id) if "zar.trial" in r.data.tags]


def optuna_study(folder: Path, parent, model: str) -> optuna.Study:
    name = json.loads(parent.data.params["optuna_studies"])[model]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")


def test_sweep_records_each_trial_prunes_fails_and_reports_the_best(store, tmp_path):
    space = write_space(tmp_path, PRUNE_AND_FAIL)
    result = invoke(
        "sweep", "--models", "resnet", "--space", space, "--trials", "3", "--method", "grid",
        "--startup-trials", "1", "--seed", "5", *TWO_EPOCHS,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    parent = sweep_parent()
    assert parent.info.status == "FINISHED"
    assert parent.data.params["trials"] == "3" and parent.data.params["method"] == "grid"
    study = optuna_study(tmp_path, parent, "resnet")
    by_number = {t.number: t for t in study.trials}
    assert sorted(by_number) == [0, 1, 2]

    runs = {int(r.data.tags["zar.trial"]): r for r in trial_runs(parent.info.run_id)}
    assert sorted(runs) == [0, 1, 2]  # one nested run per trial
    states = {}
    for number, run in runs.items():
        trial = by_number[number]
        assert run.data.tags["zar.optuna_study"] == study.study_name
        assert float(run.data.params["lr"]) == trial.params["lr"]
        states[trial.params["lr"]] = (trial.state.name, run.info.status, run.data.tags.get("zar.pruned"))
    # The order of the grid is the seeded sampler's: this seed runs lr 1e-3 before lr 1e-7.
    assert states[1e-3] == ("COMPLETE", "FINISHED", None)
    assert states[1e-7] == ("PRUNED", "KILLED", "epoch 1")
    assert states[1e30][:2] == ("FAIL", "FAILED")
    assert "diverged" in runs[next(n for n, t in by_number.items() if t.params["lr"] == 1e30)].data.tags["zar.error"]

    best = by_number[next(n for n, t in by_number.items() if t.params["lr"] == 1e-3)]
    assert best.value == pytest.approx(runs[best.number].data.metrics["val_acc"])
    printed = result.output[result.output.index("| Model | Best trial") :].split("\n\n")[0]
    row = printed.splitlines()[2].split(" | ")
    assert row[1:4] == [str(best.number), f"{100 * best.value:.2f}", "0.001"] and "1 / 1 / 1" in row[4]
    # zar compare prints the same table from the runs, and the parent keeps it.
    again = invoke("compare", "--parent", parent.info.run_id, "--select", "best-trial")
    assert again.exit_code == 0, again.output
    assert printed in again.output
    artifact = Path(MlflowClient().download_artifacts(parent.info.run_id, "best_trials.md", str(tmp_path)))
    assert printed in artifact.read_text()
    assert parent.data.metrics["best_trial_val_acc.resnet"] == pytest.approx(best.value)
    # Without --seeds there is no table of re-runs: compare says where the best trials are.
    plain = invoke("compare", "--parent", parent.info.run_id)
    assert plain.exit_code == 2 and "--select best-trial" in plain.output
    # What optuna-dashboard reads, through Optuna's public API: the objective's name and the way back to MLflow.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.study_name == study.study_name and parent.data.tags["zar.sweep_key"] in summary.study_name
    assert optuna.load_study(study_name=summary.study_name, storage=storage).metric_names == ["val_acc"]
    exp_id, run_id = parent.info.experiment_id, parent.info.run_id
    assert summary.user_attrs == {
        "mlflow_experiment": "zar",
        "mlflow_experiment_id": exp_id,
        "mlflow_run_id": run_id,
        "mlflow_run_url": f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning",
        "zar_sweep_key": parent.data.tags["zar.sweep_key"],
    }


def test_seeds_train_each_best_configuration_again_for_mean_and_std(store, tmp_path):
    space = write_space(tmp_path, {"lr": {"log_uniform": [1.0e-4, 1.0e-2]}, "se_reduction": {"choice": [4, 8]}})
    result = invoke("sweep", "--models", "se", "--space", space, "--trials", "1", "--seeds", "1,2", *TINY)
    assert result.exit_code == 0, result.output
    parent = sweep_parent()
    kids = children(parent.info.run_id)
    (best,) = [r for r in kids if "zar.trial" in r.data.tags]
    reruns = [r for r in kids if "zar.rerun_of" in r.data.tags]
    assert sorted(r.data.params["seed"] for r in reruns) == ["1", "2"]
    for r in reruns:  # the best trial's exact configuration, another seed
        assert r.data.params["lr"] == best.data.params["lr"]
        assert r.data.params["se_reduction"] == best.data.params["se_reduction"]
    assert set(optuna_study(tmp_path, parent, "se").trials[0].params) == {"lr", "se_reduction"}

    table = invoke("compare", "--parent", parent.info.run_id)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    head = next(line for line in lines if line.startswith("| Model"))
    row = next(line for line in lines if line.startswith("| SE-ResNet-18"))
    cells = dict(zip(head.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert "±" in row and cells["Runs"] == "2"  # mean ± std of the two seeds
    assert "Each architecture at its own best trial's lr" in table.output
    assert table.output.split("\n\n")[0] in result.output  # what the sweep printed at its end


def test_a_key_that_does_not_change_an_architecture_is_not_searched_for_it():
    space = parse_space({"lr": {"choice": [0.1]}, "se_reduction": {"choice": [4, 8]}}, TrainConfig())
    assert [d.key for d in dims_for(space, "resnet")] == ["lr"]
    assert [d.key for d in dims_for(space, "se_mish")] == ["lr", "se_reduction"]
    points = grid_points(dims_for(space, "se"), seed=5)
    assert points == grid_points(dims_for(space, "se"), seed=5)  # seeded: a rerun tries the same order
    assert sorted(p["se_reduction"] for p in points) == [4, 8] and all(p["lr"] == 0.1 for p in points)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"lr": {"log_uniform": [0, 0.1]}}, "lr: log_uniform needs low > 0"),
        ({"lr": {"normal": [0, 1]}}, "lr must be one of {log_uniform: [...]}"),
        ({"batch_size": {"uniform": [8, 64]}}, "batch_size is a int key: uniform is for float keys; use choice"),
        ({"batch_size": {"choice": [16, 0]}}, "batch_size: 0 is no valid value (config key 'batch_size' must be >= 1"),
        ({"seed": {"choice": [1, 2]}}, "seed cannot be searched: the trials share one seed; pass --seeds"),
        ({"lrr": {"choice": [1]}}, "unknown config key 'lrr'"),
        ({"lr": {"uniform": [0.1, 0.01]}}, "lr: uniform needs low < high"),
        ([1, 2], "must map config keys to distributions"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key_before_any_run(store, tmp_path, space, message):
    result = invoke("sweep", "--space", write_space(tmp_path, space), *TINY)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "optuna.db").exists() and not runs_of_any()


def runs_of_any():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_grid_needs_choices_and_enough_points(store, tmp_path):
    ranged = invoke("sweep", "--space", write_space(tmp_path, {"lr": {"uniform": [0.1, 0.2]}}), "--method", "grid")
    assert ranged.exit_code == 2 and "--method grid needs every key of the space as a choice; lr" in ranged.output
    space = write_space(tmp_path, {"lr": {"choice": [0.1, 0.2]}})
    few = invoke("sweep", "--space", space, "--method", "grid", "--trials", "3")
    assert few.exit_code == 2 and "the grid has 2 points for plain; pass --trials 2" in few.output
    both = invoke("sweep", "--space", space, "--lr", "0.1")
    assert both.exit_code == 2 and "--lr and the space both set lr" in both.output


def test_the_shipped_space_is_valid_for_the_study():
    space = load_space(ROOT / "params" / "sweep-space.yaml", load_config(ROOT / "params" / "default.yaml"))
    assert {d.key for d in space} >= {"lr", "weight_decay", "batch_size", "se_reduction"}
    assert TrainConfig().lr == 1e-3 and next(d for d in space if d.key == "lr").values == (1e-4, 1e-2)


# --- interrupted, then run again -------------------------------------------------------------------------


@pytest.mark.slow
def test_an_interrupted_sweep_continues_where_it_stopped_and_runs_nothing_twice(store, tmp_path):
    space = write_space(tmp_path, {"lr": {"log_uniform": [1.0e-4, 1.0e-2]}, "batch_size": {"choice": [16, 32]}})
    args = ["sweep", "--models", "resnet,se", "--space", space, "--trials", "3", *TWO_EPOCHS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "zar", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,
    )
    lines = []
    for line in proc.stdout:  # interrupt the third trial (resnet's second) in its second epoch
        lines.append(line)
        if line.startswith("[resnet trial 1] epoch   1/2"):
            time.sleep(0.2)
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    output = "".join(lines) + out
    assert proc.returncode == 130, output
    first = sweep_parent()
    assert first.info.status == "KILLED"
    before = {
        (r.data.tags["zar.model"], int(r.data.tags["zar.trial"])): r.info.status for r in trial_runs(first.info.run_id)
    }
    finished_before = {k for k, s in before.items() if s == "FINISHED"}
    assert len(finished_before) >= 2 and "KILLED" in before.values()

    again = zar_subprocess(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Continuing sweep run {first.info.run_id}" in again.stdout
    parent = sweep_parent()  # found again, not duplicated
    assert parent.info.run_id == first.info.run_id and parent.info.status == "FINISHED"
    after = trial_runs(parent.info.run_id)
    keys = Counter((r.data.tags["zar.model"], int(r.data.tags["zar.trial"])) for r in after)
    assert all(n == 1 for n in keys.values())  # one run per trial number
    for model in ("resnet", "se"):
        study = optuna_study(tmp_path, parent, model)
        done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(done) == 3, [(t.number, t.state.name) for t in study.trials]
        ran = [r for r in after if r.data.tags["zar.model"] == model and r.info.status in ("FINISHED",)]
        pruned = [r for r in after if r.data.tags["zar.model"] == model and "zar.pruned" in r.data.tags]
        assert len(ran) + len(pruned) == 3  # the trial count adds up
    # The trials finished before the interrupt were not trained again.
    for key in finished_before:
        assert keys[key] == 1
    assert not [r for r in after if r.info.status == "RUNNING"]
    interrupted = [r for r in after if r.info.status == "KILLED" and "zar.pruned" not in r.data.tags]
    assert len(interrupted) == 1  # the one interrupted trial, replaced by a new one
    assert zar_subprocess("compare", "--parent", parent.info.run_id, "--select", "best-trial").stdout in again.stdout


def test_the_best_trial_table_says_which_key_an_architecture_does_not_search():
    rows = [
        BestTrial("resnet", "ResNet-34", "s-resnet", trial=0, params={"lr": "0.001"}),
        BestTrial("se", "SE-ResNet-34 (r=8)", "s-se", trial=1, params={"lr": "0.002", "se_reduction": "8"}),
    ]
    notes = BestTrials("p", ["lr", "se_reduction"], 2, "tpe", "42", rows).notes
    assert "-: se_reduction does not change ResNet-34, so its study does not search it." in notes
    assert not [n for n in notes if "SE-ResNet-34" in n]


def test_grid_workers_never_take_a_point_another_holds_before_it_suggests():
    # Two workers ask in turn before either has suggested its values: their params are still empty.
    study = optuna.create_study(direction="maximize")
    points = [{"lr": 0.1}, {"lr": 0.01}, {"lr": 0.001}]
    taken = [sweep_module._next_trial(study, 3, points) for _ in range(3)]
    assert [study.trials[t.number].system_attrs["fixed_params"] for t in taken] == points
    assert sweep_module._next_trial(study, 3, points) is None  # the grid is spent
