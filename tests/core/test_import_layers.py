"""The house rules of docs/architecture.md ("Layers"), checked on the source: no import cycle between synth7t's
modules and no import from a higher layer.

The imports are read with :mod:`ast` from every ``.py`` file under ``src/synth7t`` (nothing is imported), including
those inside functions (a lazy import is still a dependency) and excluding ``if TYPE_CHECKING:`` blocks. An import
of ``a.b.c`` is an edge to the most specific module of that name (``from synth7t.dataset import context`` is an
edge to ``synth7t.dataset.context``, ``from synth7t.inference import Predictor`` one to the package
``synth7t.inference``). Module names given as strings to ``importlib`` (the lazy exports of ``synth7t/__init__.py``
and ``synth7t/evaluation/__init__.py``) are not seen.

A new module must be given a layer in :data:`LAYERS` *and* in docs/architecture.md; the last test checks that the
two name the same files.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "synth7t"

# layer -> the modules and packages in it (names relative to synth7t; a package covers all its modules);
# the same lists as docs/architecture.md, "Layers (who may import whom)"
LAYERS: dict[int, tuple[str, ...]] = {
    1: ("", "errors", "io", "manifest", "intensity", "progress", "templating", "devices", "parallel", "torchfile"),
    2: ("preprocess",),
    3: ("dataset",),
    4: ("nn", "config", "presets"),
    5: ("model_folder", "thesis"),
    6: ("training", "tuning"),
    7: ("inference", "cohortqc"),
    8: ("evaluation",),
    9: ("cli", "pipeline_demo", "demo", "transfer"),
}


# ---------------------------------------------------------------------------------------------------------
# the checker (a plain function of a folder, so that the tests below can run it on a made-up package too)


def module_files(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for the package folder ``root`` (its ``__init__.py`` is the package name)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` read from the source of the package folder ``root``."""
    files = module_files(root)
    top = root.name

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        edges: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = mod.split(".") if is_package else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    name = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    name = node.module or ""
                if name.split(".")[0] != top:
                    continue
                for alias in node.names:
                    edges.add(f"{name}.{alias.name}" if f"{name}.{alias.name}" in files else resolve(name))
        edges.discard(None)
        edges.discard(mod)
        graph[mod] = edges  # type: ignore[assignment]
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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


def layer_of(module: str, top: str, layers: dict[int, tuple[str, ...]]) -> int | None:
    """The layer of ``module`` (dotted, starting with ``top``): that of the longest entry of ``layers`` covering it."""
    rel = module[len(top) + 1:] if module != top else ""
    best, best_len = None, -1
    for layer, names in layers.items():
        for name in names:
            covers = rel == name if name == "" else rel == name or rel.startswith(name + ".")
            if covers and len(name) > best_len:
                best, best_len = layer, len(name)
    return best


def layer_violations(root: Path, layers: dict[int, tuple[str, ...]]) -> list[str]:
    """Every problem, one line each: a cycle, a module without a layer, an import from a higher layer."""
    graph = import_graph(root)
    top = root.name
    problems = [f"import cycle: {' <-> '.join(c)}" for c in find_cycles(graph)]
    level = {m: layer_of(m, top, layers) for m in graph}
    problems += [f"{m}: no layer (add it to LAYERS and to docs/architecture.md)" for m, n in level.items() if n is None]
    for mod, targets in sorted(graph.items()):
        for target in sorted(targets):
            if level[mod] is not None and level[target] is not None and level[target] > level[mod]:
                problems.append(f"{mod} (layer {level[mod]}) imports {target} (layer {level[target]})")
    return problems


# ---------------------------------------------------------------------------------------------------------
# synth7t itself


def test_synth7t_has_no_import_cycle_and_no_upward_import():
    problems = layer_violations(PACKAGE, LAYERS)
    assert not problems, "\n".join(problems)


def test_the_graph_sees_lazy_relative_and_package_imports():
    graph = import_graph(PACKAGE)
    assert "synth7t.inference.prefetch" in graph["synth7t.inference.cohort"]  # a module-level import
    assert "synth7t.inference.bids" in graph["synth7t.inference.cohort"]  # inside a function
    assert "synth7t.dataset.context" in graph["synth7t.dataset.pack"]  # `from synth7t.dataset import context`
    assert "synth7t" in graph["synth7t.model_folder"]  # `from synth7t import __version__`
    assert layer_of("synth7t.inference.bids", "synth7t", LAYERS) == 7
    assert layer_of("synth7t", "synth7t", LAYERS) == 1


def test_layers_match_docs_architecture():
    """Each layer's entries are named in that layer's item of docs/architecture.md (and no module is listed
    twice), so the map in this test and the page a reader follows cannot drift apart."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    items = dict(re.findall(r"^(\d)\. (.*?)(?=^\d\. |\Z)", section, flags=re.M | re.S))
    assert sorted(int(k) for k in items) == sorted(LAYERS)
    for layer, names in LAYERS.items():
        for name in names:
            if not name:
                continue
            spelled = f"`{name}/`" if (PACKAGE / name).is_dir() else f"`{name}.py`"
            assert spelled in items[str(layer)], f"docs/architecture.md layer {layer} does not name {spelled}"
    flat = [n for names in LAYERS.values() for n in names]
    assert len(flat) == len(set(flat))


# ---------------------------------------------------------------------------------------------------------
# the checker catches what it is for (a made-up package: two layers)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, source in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return root


TOY_LAYERS = {1: ("", "low"), 2: ("high",)}


def test_checker_passes_a_clean_package(tmp_path):
    root = _package(tmp_path, {"low.py": "import os\n", "high/__init__.py": "from pkg.low import x\n",
                               "high/part.py": "from . import other\n", "high/other.py": "from pkg import low\n"})
    assert layer_violations(root, TOY_LAYERS) == []


def test_checker_fails_on_a_deliberate_upward_import(tmp_path):
    """The test above would fail if, say, synth7t/preprocess/ imported synth7t/inference/: here low imports high
    inside a function (a lazy upward import is still one)."""
    root = _package(tmp_path, {"low.py": "def f():\n    from pkg.high import part\n    return part\n",
                               "high/__init__.py": "", "high/part.py": "import pkg.low\n"})
    problems = layer_violations(root, TOY_LAYERS)
    assert "pkg.low (layer 1) imports pkg.high.part (layer 2)" in problems
    assert "import cycle: pkg.high.part <-> pkg.low" in problems


def test_checker_fails_on_a_cycle_within_a_layer_and_on_an_unmapped_module(tmp_path):
    root = _package(tmp_path, {"low.py": "from .lower import y\n", "lower.py": "from pkg.low import x\n"})
    problems = layer_violations(root, {1: ("", "low"), 2: ()})
    assert "import cycle: pkg.low <-> pkg.lower" in problems
    assert any(p.startswith("pkg.lower: no layer") for p in problems)


def test_type_checking_imports_are_not_dependencies(tmp_path):
    root = _package(tmp_path, {"low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.high\n",
                               "high.py": "import pkg.low\n"})
    assert layer_violations(root, TOY_LAYERS) == []


@pytest.mark.parametrize("module, layer", [("pkg.high.part", 2), ("pkg.high", 2), ("pkg.low", 1), ("pkg", 1),
                                           ("pkg.lowly", None), ("pkg.other", None)])
def test_layer_of_covers_a_package_and_its_modules(module, layer):
    assert layer_of(module, "pkg", TOY_LAYERS) == layer
