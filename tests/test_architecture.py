"""The package's import graph: one-way dependencies between packages and no import circle between modules.

Reads every `import` / `from ... import` in slimformer/ (function-level imports included) with `ast`, so a
lazy import cannot hide an upward edge or a loop. The order is the one docs/ARCHITECTURE.md draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "slimformer"

# Lowest first. A module may import from its own package or from any lower layer, never from a higher one;
# packages that share a layer are peers and may import each other only in the order they are listed.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("fileio", "schema", "threads", "progress"),
    ("data",),
    ("models",),
    ("compression",),
    ("spaces",),
    ("export",),
    ("hardware_profiles",),
    ("evaluators",),
    ("recovery",),
    ("search",),
    ("api",),
    ("cli_errors",),
    ("cli_profiles",),
    ("cli",),
    ("__init__",),
)


def _module_name(path: Path) -> str:
    parts = ["slimformer", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the slimformer modules it imports (resolved to the deepest existing module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _rank(top: str) -> tuple[int, int]:
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i, layer.index(top)
    raise KeyError(top)


def test_every_module_has_a_layer() -> None:
    unknown = sorted({_top(m) for m in _modules()} - {t for layer in LAYERS for t in layer})
    assert not unknown, f"add these to LAYERS (and to docs/ARCHITECTURE.md): {unknown}"


def test_no_upward_import_between_packages() -> None:
    bad = []
    for m, targets in import_graph().items():
        for t in targets:
            a, b = _top(m), _top(t)
            if a != b and _rank(b) > _rank(a):
                bad.append(f"{m} -> {t}")
    assert not bad, "upward imports (see the order in docs/ARCHITECTURE.md):\n" + "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_modules() -> None:
    cycles = _cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("edge", [("slimformer.compression.plan", "slimformer.search.runner")])
def test_the_checker_sees_an_upward_edge(edge: tuple[str, str]) -> None:
    """The rule itself can fail: a compression module importing search is ranked upward."""
    low, high = edge
    assert _rank(_top(high)) > _rank(_top(low))
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
