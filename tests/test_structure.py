"""The package's shape: no import circle, and the library never imports ``data_tools`` (only the
command line does, to build missing shards and for ``conure data``).

Modules are cut where the concern changes, not at a line count: a module that needs another's
underscore names belongs with it. About 500 lines is a guide for one reader, not a rule."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "conure_dist"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: pathlib.Path, typing_only_too: bool = False) -> list[str]:
    """Every module named by an import, lazy ones too; those only for type checkers
    (``if TYPE_CHECKING:``) when ``typing_only_too``."""
    tree = ast.parse(path.read_text())
    typing_only = (
        set()
        if typing_only_too
        else {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for sub in ast.walk(node)
        }
    )
    names = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _graph(typing_only_too: bool = True) -> dict[str, set[str]]:
    """Which modules each module imports; type-only imports count (a cycle through them is still
    two modules that cannot be read apart)."""
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    return {m: {o for n in _imports(p, typing_only_too) if (o := owner(n)) and o != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = _graph()
    assert "conure_dist.train.context" in graph["conure_dist.train.loop"]  # the graph sees real imports
    assert _cycles(graph) == []


def test_the_graph_sees_imports_only_for_type_checkers(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a.b import C\nimport d\n")
    assert _imports(module) == ["typing", "typing.TYPE_CHECKING", "d"]
    assert sorted(_imports(module, typing_only_too=True)) == ["a.b", "a.b.C", "d", "typing", "typing.TYPE_CHECKING"]


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_but_the_command_line_imports_data_tools():
    users = [m for m, p in _modules().items() if any(n.split(".")[0] == "data_tools" for n in _imports(p))]
    assert users == ["conure_dist.cli"]


@pytest.mark.slow
def test_training_serving_and_the_harness_load_no_data_tools_module():
    """Lazy imports too: what these modules load when imported, in a fresh interpreter."""
    modules = [
        "conure_dist.train.loop",
        "conure_dist.train.context",
        "conure_dist.serving.inference",
        "conure_dist.experiment.harness",
    ]
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'data_tools'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_no_module_imports_another_modules_private_names():
    """Inside the package and ``data_tools``: ``from x import _name`` means x and the importer are one."""
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "data_tools").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in ("conure_dist", "data_tools")
            ):
                found += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert found == []
