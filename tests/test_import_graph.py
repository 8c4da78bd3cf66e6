"""The house's floors (docs/DESIGN.md, "Layout"): anfast's import graph has no cycle, no
module imports a floor above its own, and nothing inside anfast/ imports the package's
``__init__`` (the public API is for users, not for the floors beneath it).

The graph is read from the source (every ``import`` statement at any depth, function-level
imports included), so it holds whatever a test run happens to import. Run it alone with
``python -m pytest tests/test_import_graph.py -q``; a failure names the modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "anfast"

# Lowest first. A module may import its own floor and the floors below it.
FLOORS = (
    ("anfast._version", "anfast.ops", "anfast.triton"),
    ("anfast.nn",),
    ("anfast.models", "anfast.data", "anfast.adjoin", "anfast.export", "anfast.profile", "anfast.loss",
     "anfast.streams"),
    ("anfast.runs",),
    ("anfast.train",),
    ("anfast.dan",),
    ("anfast.cli", "anfast.__main__"),
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the anfast modules it imports (``from pkg import name`` counts as importing
    ``pkg.name`` where that is a module, else ``pkg``)."""
    modules = _modules()

    def known(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(known(alias.name) for alias in node.names if alias.name.split(".")[0] == "anfast")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                if base.split(".")[0] != "anfast":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    imported.add(full if full in modules else known(base))
        graph[name] = imported - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floor(module: str) -> int:
    for level, names in enumerate(FLOORS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return level
    raise AssertionError(f"{module} is on no floor; add it to FLOORS in {__file__}")


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_is_read_from_every_import_statement(graph):
    # A reader that missed function-level or relative imports would pass anything: the graph
    # must hold edges known from the source, a module-level and a function-level one.
    assert "anfast.ops.backend" in graph["anfast.ops.tuning"]
    assert "anfast.train.loop" in graph["anfast.cli.train"]  # imported inside run_train
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_anfast_has_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_module_imports_a_floor_above_its_own(graph):
    upward = [f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
              for module, targets in sorted(graph.items()) if module != "anfast"
              for target in sorted(targets) if target != "anfast" and floor(target) > floor(module)]
    assert upward == []


def test_nothing_inside_anfast_imports_the_package_init(graph):
    assert sorted(module for module, targets in graph.items() if "anfast" in targets) == []


def test_import_anfast_reaches_every_subpackage_and_loads_the_lazy_ones_on_first_use():
    """docs/data.md's ``anfast.data.builtin_dataset()`` after ``import anfast`` works (it raised
    AttributeError: anfast.data was never imported), while ``import anfast`` still leaves the
    data stack and the trainer unloaded; a name that is no subpackage is an AttributeError."""
    import subprocess
    import sys

    packages = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file())
    script = (
        "import sys, anfast\n"
        "print(sorted(m for m in ('anfast.data', 'anfast.train', 'anfast.dan') if m in sys.modules))\n"
        f"print(sum(getattr(anfast, p).__name__ == 'anfast.' + p for p in {packages!r}))\n"
        "print(anfast.data.builtin_dataset.__module__, 'data' in dir(anfast))\n"
        "try:\n    anfast.no_such_subpackage\nexcept AttributeError as error:\n    print(error)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "[]", str(len(packages)), "anfast.data.builtin True",
        "module 'anfast' has no attribute 'no_such_subpackage'",
    ]
