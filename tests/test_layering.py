"""The package's import graph: no circles, no import from a layer above (docs/method.md, README "Layout").

Edges are read with ``ast`` from every module under ``src/codsr`` (function-level imports count too:
a lazy import is still a dependency). A package's ``__init__`` re-exporting its own sub-modules is
not an edge (it is the package's table of contents).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = _resolve(name, mods) if name.startswith("codsr") else None
                if target is None or target == mod or (is_pkg and target.startswith(mod + ".")):
                    continue
                if mods[target].name == "__init__.py":  # importing a package = its public names
                    continue
                edges[mod].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _graph()


def test_the_graph_is_read(graph):
    # A known edge and a known non-edge: the reader works on this tree.
    assert "codsr.model.codsr" in graph["codsr.pipeline.pipeline"]
    assert "codsr.pipeline.pipeline" not in graph["codsr.model.codsr"]


def test_no_import_circle(graph):
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "lower, upper",
    [
        ("codsr.model", "codsr.pipeline"),  # the model knows nothing of tiling or images
        ("codsr.model", "codsr.testing"),  # test builders never leak into the model
        ("codsr.pipeline", "codsr.cli"),
        ("codsr.pipeline", "codsr.batch"),
        ("codsr.pipeline", "codsr.testing"),
        ("codsr.training", "codsr.cli"),
        ("codsr.training", "codsr.testing"),
    ],
)
def test_no_import_from_a_layer_above(graph, lower, upper):
    bad = sorted(
        f"{m} → {t}" for m, ts in graph.items() if m.startswith(lower) for t in ts if t.startswith(upper)
    )
    assert bad == []


@pytest.mark.parametrize("ground", ["codsr.hostmem", "codsr.atomic", "codsr.precision", "codsr.seeding"])
def test_ground_floor_helpers_import_nothing_of_codsr(graph, ground):
    assert graph[ground] == set()


def test_training_entry_point_lives_in_training():
    assert not (SRC / "codsr" / "train.py").exists()
    assert (SRC / "codsr" / "training" / "run.py").exists()
