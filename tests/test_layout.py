"""The code's layout as the README states it: imports go one way (pilot and data import no file of
the project, model only those two, fed only those three, no tool imports train.py but the Flower
app's two entry points), the import graph has no circle, and both engines implement fed.Engine's
calls with its parameters. Read from the source (every import, at the top or inside a function)."""

import ast
import inspect
import os

import pytest

import fed
from tools import engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["pilot", "data", "model", "fed", "train"]
TOOLS = sorted(f"tools.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py") and f != "__init__.py")
ENTRY_POINTS = {"tools.flower_app", "tools.flower_local"}   # run on their own, may build through train.py


def _imports(module: str) -> set[str]:
    """The project modules `module` imports, anywhere in its file."""
    tree = ast.parse(open(os.path.join(ROOT, module.replace(".", "/") + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"tools.{a.name}" for a in node.names} if node.module == "tools" else {node.module}
    return found & set(CORE + TOOLS)


GRAPH = {m: _imports(m) for m in CORE + TOOLS}


def test_the_core_imports_only_files_below_it():
    assert GRAPH["pilot"] == set() and GRAPH["data"] == set()
    assert GRAPH["model"] == {"data", "pilot"}
    assert GRAPH["fed"] == {"data", "model", "pilot"}


def test_no_tool_imports_train_but_the_flower_entry_points():
    assert {m for m in TOOLS if "train" in GRAPH[m]} <= ENTRY_POINTS
    assert all(not GRAPH[m] & ENTRY_POINTS for m in CORE + TOOLS if m not in ENTRY_POINTS)


def test_the_import_graph_has_no_circle():
    def reach(m, seen):
        for n in GRAPH[m]:
            if n not in seen:
                seen.add(n)
                reach(n, seen)
        return seen
    assert [m for m in GRAPH if m in reach(m, set())] == []


def _engines():
    out = [engine.InProcess]
    try:
        from tools import flower_app
        out.append(flower_app.GridNodes)
    except ImportError:   # flwr is an optional extra; CI installs it
        pass
    return out


@pytest.mark.parametrize("name", ["local_round", "deliver", "taken"])
def test_both_engines_implement_the_engine_calls_with_its_parameters(name):
    want = list(inspect.signature(getattr(fed.Engine, name)).parameters)
    engines = _engines()
    assert len(engines) == 2 or not os.environ.get("CI"), "flwr is not installed: pip install -r requirements-flower.txt"
    for cls in engines:
        assert list(inspect.signature(getattr(cls, name)).parameters) == want, cls.__name__
