"""The code's boundaries, read from its imports with ``ast``: MLflow behind zar.tracking, click in the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from zar.variants import VARIANTS

ZAR = Path(__file__).resolve().parents[1] / "zar"
MODULES = sorted(ZAR.glob("*.py"))
MLFLOW_MODULES = {"tracking.py"}  # the one boundary to MLflow
CLICK_FREE = {
    "config.py",
    "data.py",
    "models.py",
    "engine.py",
    "errors.py",
    "checks.py",
    "variants.py",
    "imagecache.py",
    "runs.py",
    "tracking.py",
}


def imported(path: Path) -> set[str]:
    """Top-level packages a module imports, anywhere in it (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def private_imports(path: Path) -> list[str]:
    """Names starting with '_' that a module takes from another zar module."""
    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
        if alias.name.startswith("_")
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_only_the_tracking_module_imports_mlflow(path):
    if path.name not in MLFLOW_MODULES:
        assert "mlflow" not in imported(path), f"{path.name} imports mlflow; call zar.tracking instead"


@pytest.mark.parametrize("path", sorted(p for p in MODULES if p.name in CLICK_FREE), ids=lambda p: p.name)
def test_core_modules_do_not_import_click(path):
    assert "click" not in imported(path), f"{path.name} imports click; raise a zar.errors exception instead"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_imports_another_modules_private_names(path):
    assert private_imports(path) == []


def test_mlproject_main_trains_every_architecture_by_default():
    spec = yaml.safe_load((ZAR.parent / "MLproject").read_text())
    assert spec["entry_points"]["main"]["parameters"]["models"]["default"] == ",".join(VARIANTS)
    assert set(VARIANTS) <= set(spec["entry_points"])
