"""The code's boundaries, read from its imports with ``ast``: folder rules, not lists of file names.

- MLflow is imported only under zar/tracking/; click only under zar/cli/.
- What learns (zar/learn/) knows nothing of runs: it imports only itself and the torch-free core.
- No zar module imports another's private names, and no two zar modules import each other,
  directly or round a longer loop (imports inside functions count: they hide a cycle, not break it).
- No module is longer than a reader can hold: MAX_LINES.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from zar.variants import VARIANTS

ZAR = Path(__file__).resolve().parents[1] / "zar"
MODULES = sorted(ZAR.rglob("*.py"))
MLFLOW_FOLDER = ZAR / "tracking"  # the one boundary to MLflow
CLI_FOLDER = ZAR / "cli"  # the one place that speaks click
LEARN_FOLDER = ZAR / "learn"
CORE = {"zar.config", "zar.errors", "zar.checks", "zar.variants"}  # what every part may read
MAX_LINES = 600
# zar.tracking.X reads zar.tracking.client.X (the package loads it on first use, unseen by ast).
PACKAGE_STANDS_FOR = {"zar.tracking": "zar.tracking.client"}


def name_of(path: Path) -> str:
    parts = path.relative_to(ZAR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {name_of(p): p for p in MODULES}


def ids(paths):
    return [str(p.relative_to(ZAR.parent)) for p in paths]


def imported(path: Path) -> set[str]:
    """Top-level packages a module imports, anywhere in it (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = name_of(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def zar_imports(path: Path) -> set[str]:
    """The zar modules a module imports, anywhere in it: ``from . import x`` names module x where x is one."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in NAMES}
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(path, node)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in NAMES else module)
    found = {PACKAGE_STANDS_FOR.get(m, m) for m in found if m in NAMES}
    return found - {name_of(path), "zar"}


def private_imports(path: Path) -> list[str]:
    """Names starting with '_' that a module takes from another zar module."""
    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level >= 1
        for alias in node.names
        if alias.name.startswith("_")
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("path", MODULES, ids=ids(MODULES))
def test_only_the_tracking_folder_imports_mlflow(path):
    if MLFLOW_FOLDER not in path.parents:
        assert "mlflow" not in imported(path), f"{path.name} imports mlflow; call zar.tracking instead"


@pytest.mark.parametrize("path", MODULES, ids=ids(MODULES))
def test_only_the_cli_folder_imports_click(path):
    if CLI_FOLDER not in path.parents:
        assert "click" not in imported(path), f"{path.name} imports click; raise a zar.errors exception instead"


LEARN = [p for p in MODULES if LEARN_FOLDER in p.parents]


@pytest.mark.parametrize("path", LEARN, ids=ids(LEARN))
def test_what_learns_imports_nothing_of_runs_tables_or_the_cli(path):
    outside = {m for m in zar_imports(path) if not m.startswith("zar.learn") and m not in CORE}
    assert outside == set(), f"{path.name} imports {', '.join(sorted(outside))}; return numbers to zar.training instead"


@pytest.mark.parametrize("path", MODULES, ids=ids(MODULES))
def test_no_module_imports_another_modules_private_names(path):
    assert private_imports(path) == []


@pytest.mark.parametrize("path", MODULES, ids=ids(MODULES))
def test_no_module_is_longer_than_a_reader_can_hold(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it where it does two jobs"


def test_no_import_cycle_between_zar_modules():
    graph = {name: zar_imports(path) for name, path in NAMES.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_resolves_relative_and_function_level_imports(tmp_path):
    assert "zar.tracking.client" in zar_imports(ZAR / "training.py")  # from . import tracking
    assert "zar.tracking.runs" in zar_imports(ZAR / "training.py")  # from .tracking import runs
    assert "zar.errors" in zar_imports(ZAR / "tracking" / "runs.py")  # from ..errors import ...
    assert "zar.training" in zar_imports(ZAR / "cli" / "make_runs.py")  # from .. import training, in a command


def test_mlproject_main_trains_every_architecture_by_default():
    spec = yaml.safe_load((ZAR.parent / "MLproject").read_text())
    assert spec["entry_points"]["main"]["parameters"]["models"]["default"] == ",".join(VARIANTS)
    assert set(VARIANTS) <= set(spec["entry_points"])
