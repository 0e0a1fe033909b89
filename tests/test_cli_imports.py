"""`hcnr_cli` has no import cycle: every import between its modules (top level or inside a
function) goes one way, main -> sub-command modules -> common, and each module imports
alone in a fresh interpreter without pulling in `hcnr_cli.main`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hcnr_cli"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement anywhere
    in the module (function-level imports make cycles too)."""
    name = package.name
    modules = {path.stem for path in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == name:
                        edges.add(parts[1] if len(parts) > 1 else "__init__")
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    base = node.module or ""
                elif node.level == 0 and (node.module or "").split(".")[0] == name:
                    base = (node.module or "").partition(".")[2]
                else:
                    continue
                if base:
                    edges.add(base.split(".")[0])
                else:  # `from hcnr_cli import x`: x is a module, or a name of __init__
                    for alias in node.names:
                        edges.add(alias.name if alias.name in modules else "__init__")
        graph[path.stem] = edges - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path that ends where it starts; None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_hcnr_cli_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"main", "common", "jobs_cmd"} <= set(graph)
    assert find_cycle(graph) is None
    assert not any("main" in edges for edges in graph.values())  # nothing imports main
    assert graph["common"] == set()  # the shared helpers import no sibling


def test_the_check_finds_a_function_level_cycle(tmp_path: Path):
    package = tmp_path / "hcnr_cli"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text("from hcnr_cli import sub_cmd\n")
    (package / "sub_cmd.py").write_text("def f():\n    from hcnr_cli.main import g\n")
    (package / "other.py").write_text("from .sub_cmd import f\n")
    assert find_cycle(import_graph(package)) == ["main", "sub_cmd", "main"]
    (package / "sub_cmd.py").write_text("def f():\n    from . import main\n")
    assert find_cycle(import_graph(package)) == ["main", "sub_cmd", "main"]


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str):
    code = (
        f"import sys, hcnr_cli.{module}\n"
        f"assert {module!r} == 'main' or 'hcnr_cli.main' not in sys.modules, "
        "'imports hcnr_cli.main'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
