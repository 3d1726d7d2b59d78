"""User mistakes are refused before torch or MLflow is imported: one line, exit code 2, no wait.

Each case runs ``python -m zar`` in a fresh process (an in-process CliRunner would see the modules
other tests imported). A ``-c`` wrapper runs zar exactly as ``-m`` does and, at exit, prints which of
torch and mlflow were ever imported; stdout carries nothing else for these commands.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "mlflow")
WRAPPER = f"""
import atexit, runpy, sys
atexit.register(lambda: print("heavy imported:", ",".join(m for m in {HEAVY!r} if m in sys.modules)))
runpy.run_module("zar", run_name="__main__", alter_sys=True)
"""
NO_FOLDER = "no_such_folder"

MISTAKES = {
    "unknown command": (["nope"], "No such command 'nope'"),
    "unknown model": (["train", "--model", "nope"], "unknown model 'nope'; valid: plain, resnet, se, mish, se_mish"),
    "bad config value": (["train", "--lr", "-1"], "config key 'lr' must be > 0 and finite, got -1.0"),
    "out of range": (["train", "--val-ratio", "1.5"], "config key 'val_ratio' must be between 0 and 1"),
    "bad option type": (["train", "--epochs", "x"], "'x' is not a valid integer"),
    "bad choice": (["train", "--optimizer", "lion"], "'lion' is not one of 'adamw', 'adam', 'sgd'"),
    "unknown option": (["train", "--bogus", "1"], "No such option '--bogus'. (see 'zar train --help')"),
    "missing params file": (["train", "--params", "missing.yaml"], "cannot read params file missing.yaml"),
    "unknown key in params file": (["train", "--params", "bogus.yaml"], "unknown config key 'bogus' in bogus.yaml"),
    "malformed params file": (["train", "--params", "broken.yaml"], "malformed YAML in broken.yaml line"),
    "missing data folder": (["train", "--data", NO_FOLDER], f"data folder {NO_FOLDER} does not exist"),
    "data path is a file": (["train", "--data", "bogus.yaml"], "data path bogus.yaml is a file"),
    "resume with options": (["train", "--resume", "abc", "--epochs", "3"], "drop --epochs"),
    "study unknown model": (["study", "--models", "resnet,nope"], "unknown model 'nope'"),
    "study no models": (["study", "--models", ","], "needs at least one model"),
    "study bad seeds list": (["study", "--seeds", "1,x"], "expected a comma-separated list of ints"),
    "study negative seed": (["study", "--seeds", "1,-2"], "config key 'seed' must be between 0 and 4294967295, got -2"),
    "study baseline not trained": (
        ["study", "--models", "resnet,se", "--baseline", "plain"],
        "baseline 'plain' is not among --models resnet,se",
    ),
    "study bad config value": (["study", "--epochs", "0"], "config key 'epochs' must be >= 1, got 0"),
    "study missing data folder": (["study", "--data", NO_FOLDER], f"data folder {NO_FOLDER} does not exist"),
    "compare bad format": (["compare", "--format", "xml"], "'xml' is not one of"),
    "compare bad select": (["compare", "--select", "worst"], "'worst' is not one of 'last', 'best'"),
    "compare output folder missing": (
        ["compare", "--output", f"{NO_FOLDER}/table.md"],
        f"folder {NO_FOLDER} does not exist",
    ),
    "runs mark-failed alone": (["runs", "--mark-failed"], "--mark-failed goes with --stale"),
}


def run_zar(args: list[str], cwd) -> subprocess.CompletedProcess:
    """``python -m zar ARGS`` in a bare folder with its own store, reporting the heavy imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"  # nothing may reach the user's store
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def heavy_imported(proc: subprocess.CompletedProcess) -> str:
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("heavy imported:"), proc.stdout
    return last.removeprefix("heavy imported:").strip()


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "bogus.yaml").write_text("bogus: 1\n")
    (tmp_path / "broken.yaml").write_text("lr: 0.1\nepochs: [1, 2\n")
    return tmp_path


@pytest.mark.parametrize("case", list(MISTAKES))
def test_mistake_is_one_line_exit_2_without_torch_or_mlflow(workdir, case):
    args, message = MISTAKES[case]
    proc = run_zar(args, workdir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert heavy_imported(proc) == "", f"imported before refusing: {heavy_imported(proc)}"
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()


@pytest.mark.parametrize(
    "args", [["--help"], ["train", "--help"], ["study", "--help"], ["compare", "--help"], ["runs", "--help"], []]
)
def test_help_imports_neither_torch_nor_mlflow(workdir, args):
    proc = run_zar(args, workdir)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: zar" in proc.stdout
    assert heavy_imported(proc) == ""
