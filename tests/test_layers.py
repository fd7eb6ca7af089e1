"""The import contract: cli → server → core → leaves, nothing imports upward, no import cycle, and the
two libraries orion wraps imported by one package each (``llama_cpp`` by ``engine/``, ``huggingface_hub``
by ``hub``).

The graph counts every import statement, at module level or inside a function (a lazy import is still
an import: a cycle through one is a cycle); ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orion_cli"

# The layers, top first. A module may import its own layer (without a cycle) and any layer below.
LEAVES = {"orion_cli", "orion_cli.__main__", "orion_cli._fs", "orion_cli._proc", "orion_cli._yaml", "orion_cli._net",
          "orion_cli._debug", "orion_cli._once", "orion_cli.messages", "orion_cli.errors", "orion_cli.units", "orion_cli.paths", "orion_cli.quant_types",
          "orion_cli.gguf_files", "orion_cli._text", "orion_cli.limits"}


def layer_of(module: str) -> int:
    if module == "orion_cli.__main__" or module.startswith("orion_cli.cli"):
        return 3
    if module.startswith("orion_cli.server"):
        return 2
    if module in LEAVES:
        return 0
    return 1  # the core


LAYER_NAMES = {3: "cli", 2: "server", 1: "core", 0: "leaves"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imports among orion_cli's modules, other top-level packages each module imports)."""
    mods = _modules()
    internal: dict[str, set[str]] = {m: set() for m in mods}
    external: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "orion_cli":
                    while target not in mods and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != module:
                        internal[module].add(target)
                else:
                    external[module].add(target.split(".")[0])
    return internal, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH, EXTERNAL = import_graph()


def test_the_graph_sees_lazy_imports():
    """The contract is only as good as the graph: a function-level import must be in it."""
    assert "orion_cli.engine.decoder" in GRAPH["orion_cli.engine.model"]
    assert "llama_cpp" in EXTERNAL["orion_cli.engine.sampling"]  # imported inside sampler_chain alone
    assert len(GRAPH) > 60


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_upward():
    upward = sorted(f"{m} ({LAYER_NAMES[layer_of(m)]}) imports {t} ({LAYER_NAMES[layer_of(t)]})"
                    for m, targets in GRAPH.items() for t in targets if layer_of(t) > layer_of(m))
    assert upward == []


@pytest.mark.parametrize("library, owner", [("llama_cpp", "orion_cli.engine"), ("huggingface_hub", "orion_cli.hub")])
def test_one_package_imports_each_wrapped_library(library, owner):
    importers = sorted(m for m, libs in EXTERNAL.items() if library in libs)
    assert importers and all(m == owner or m.startswith(owner + ".") for m in importers), importers


def test_the_server_and_cli_are_above_the_core():
    assert layer_of("orion_cli.cli.run") > layer_of("orion_cli.server.app") > layer_of("orion_cli.manager") \
        > layer_of("orion_cli.errors")


def test_no_module_over_500_lines():
    """A module past ~500 lines holds two jobs (STYLE.md)."""
    long = sorted(f"{m}: {n} lines" for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 520)
    assert long == []
