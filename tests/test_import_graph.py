"""The import graph of ``dosegym/``: no circle, no import against the layer order, no
``_private`` name imported across packages (``../shared/DESIGN.md``, "The way data flows").

Every module is read with ``ast``. An edge is any ``import`` / ``from ... import`` (at module
level, inside functions, under ``TYPE_CHECKING``: all count), and any string constant that is
exactly a dotted module name of the package below the root, or ``module:attribute`` (what
``importlib.import_module`` tables such as ``dosegym.data.io._FORMATS`` and the Gymnasium
entry points of ``dosegym.envs`` name), except a string naming a package the module lies in
(``importlib.resources.files("dosegym.scorecards")``: a resource anchor, imported already).

Layers, lowest first: ``data``; ``scorecards`` and ``diffusion`` (siblings: neither imports
the other); ``envs``; the package root ``dosegym/__init__.py`` (it registers the envs);
``agents``; ``bench`` and ``report`` (siblings); ``cli``. ``dosegym.errors`` and
``dosegym._version`` are leaves anyone may import. "Across packages" means between two of
these top-level parts.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "dosegym"

#: Rank of each top-level part of ``dosegym`` ("" is the package root); a module may import
#: its own part or a part of lower rank. Leaves (rank -1) import nothing of the package.
LAYERS: dict[str, int] = {
    "errors": -1,
    "_version": -1,
    "data": 0,
    "scorecards": 1,
    "diffusion": 1,
    "envs": 2,
    "": 3,
    "agents": 4,
    "bench": 5,
    "report": 5,
    "cli": 6,
}

#: Known violations, each with the reason it stays; empty: the graph is clean.
KNOWN_VIOLATIONS: set[str] = set()


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (module names) at ``line``; ``names``: what it takes."""

    source: str
    target: str
    line: int
    names: tuple[str, ...] = ()


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Every module (and package ``__init__``) under ``root``, by dotted name."""
    return {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest prefix of ``name`` that is a module (``None`` outside the package)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, path: Path, modules: Mapping[str, Path], package: str) -> list[Edge]:
    """The edges out of module ``name`` (see the module docstring)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    edges: list[Edge] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    edges.append(Edge(name, target, node.lineno, (alias.name,)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                absolute = ".".join([*base, *([node.module] if node.module else [])])
            else:
                absolute = node.module or ""
            if not (absolute == package or absolute.startswith(package + ".")):
                continue
            for alias in node.names:
                sub = f"{absolute}.{alias.name}"
                if sub in modules:  # from pkg import submodule
                    edges.append(Edge(name, sub, node.lineno, ()))
                else:
                    target = _resolve(absolute, modules)
                    if target:
                        edges.append(Edge(name, target, node.lineno, (alias.name,)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.split(":", 1)[0] if node.value.count(":") == 1 else node.value
            ancestor = name == text or name.startswith(text + ".")  # e.g. resources.files(own package)
            if text.startswith(package + ".") and text in modules and not ancestor:
                attr = node.value.split(":", 1)[1] if ":" in node.value else None
                edges.append(Edge(name, text, node.lineno, (attr,) if attr else ()))
    return [e for e in edges if e.target != name]


def import_graph(root: Path, package: str) -> dict[str, list[Edge]]:
    """Module name -> its edges, for every module under ``root`` (the folder of ``package``)."""
    modules = modules_of(root, package)
    return {name: imports_of(name, path, modules, package) for name, path in modules.items()}


def part_of(module: str, package: str) -> str:
    """The top-level part of ``module`` (``""`` for the package root)."""
    rest = module[len(package) + 1 :] if module != package else ""
    return rest.split(".", 1)[0]


def cycles(graph: Mapping[str, list[Edge]]) -> list[list[str]]:
    """Circles of modules (``[a, b, ..., a]``, starting at the smallest name): per strongly
    connected group (Tarjan), a shortest circle through each member, without repeats."""
    succ = {m: sorted({e.target for e in edges if e.target in graph}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
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
                groups.append(sorted(group))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    found: list[list[str]] = []
    for group in groups:
        for start in group:
            circle = _circle_in(start, group, succ)[:-1]
            k = circle.index(min(circle))
            circle = [*circle[k:], *circle[:k], min(circle)]
            if circle not in found:
                found.append(circle)
    return found


def _circle_in(start: str, group: list[str], succ: Mapping[str, list[str]]) -> list[str]:
    """A shortest circle through ``start`` within ``group`` (breadth-first)."""
    members = set(group)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in succ[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in parent and w != start:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in the strongly connected group {group}")


def layer_violations(graph: Mapping[str, list[Edge]], package: str, layers: Mapping[str, int]) -> list[str]:
    """``"a -> b (line n): part x (rank i) imports part y (rank j)"`` for every upward or sideways edge."""
    out = []
    for edges in graph.values():
        for e in edges:
            src, dst = part_of(e.source, package), part_of(e.target, package)
            if src == dst:
                continue
            if src not in layers or dst not in layers:
                missing = src if src not in layers else dst
                out.append(f"{e.source} -> {e.target} (line {e.line}): part {missing!r} has no layer")
            elif layers[src] <= layers[dst] or layers[src] < 0:
                what, whom = src or "the package root", dst or "the package root"
                out.append(
                    f"{e.source} -> {e.target} (line {e.line}): {what} (layer {layers[src]}) "
                    f"must not import {whom} (layer {layers[dst]})"
                )
    return sorted(out)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_violations(
    graph: Mapping[str, list[Edge]], package: str, leaves: Iterable[str] = ()
) -> list[str]:
    """Edges across top-level parts that take a ``_private`` module or name (``leaves``: the
    parts whose own private-looking name is public, e.g. ``_version``)."""
    out = []
    for edges in graph.values():
        for e in edges:
            src, dst = part_of(e.source, package), part_of(e.target, package)
            if src == dst:
                continue
            parts = e.target.split(".")[1:]
            if parts and parts[0] in leaves:
                parts = parts[1:]
            private = [p for p in parts if _private(p)] + [n for n in e.names if _private(n.split(".")[-1])]
            if private:
                out.append(
                    f"{e.source} -> {e.target} (line {e.line}): private {', '.join(private)} across packages"
                )
    return sorted(out)


def check(root: Path, package: str, layers: Mapping[str, int]) -> list[str]:
    """Every problem of the package at ``root``: circles, then layer and privacy violations."""
    graph = import_graph(root, package)
    found = [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    found += layer_violations(graph, package, layers)
    found += private_violations(graph, package, leaves=[p for p, r in layers.items() if r < 0])
    return found


def _without_lines(problem: str) -> str:
    """A problem without its line numbers, so that the allow-list survives edits above them."""
    return re.sub(r" \(line \d+\)", "", problem)


# --------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------
def test_dosegym_import_graph_is_clean():
    found = {_without_lines(p) for p in check(PACKAGE_DIR, "dosegym", LAYERS)}
    new = sorted(found - KNOWN_VIOLATIONS)
    fixed = sorted(KNOWN_VIOLATIONS - found)
    assert not new, "import-graph problems:\n" + "\n".join(new)
    assert not fixed, "fixed, remove from KNOWN_VIOLATIONS:\n" + "\n".join(fixed)


def test_every_top_level_part_has_a_layer():
    parts = {part_of(m, "dosegym") for m in modules_of(PACKAGE_DIR, "dosegym")}
    assert parts <= set(LAYERS), f"parts without a layer: {sorted(parts - set(LAYERS))}"


def test_graph_sees_imports_inside_functions_and_string_tables():
    graph = import_graph(PACKAGE_DIR, "dosegym")
    io_targets = {e.target for e in graph["dosegym.data.io"]}
    assert {"dosegym.data.openkbp", "dosegym.data.phantoms", "dosegym.data.dicom"} <= io_targets
    env_targets = {e.target for e in graph["dosegym.envs"]}
    assert {"dosegym.envs.denoise", "dosegym.envs.guided", "dosegym.envs.bandit"} <= env_targets
    assert "dosegym.envs" in {e.target for e in graph["dosegym"]}


# --------------------------------------------------------------------------------------
# The checker on planted faults
# --------------------------------------------------------------------------------------
def _fake_package(root: Path, files: Mapping[str, str]) -> Path:
    pkg = root / "fake"
    for rel, text in {"__init__.py": "", "data/__init__.py": "", "envs/__init__.py": "", **files}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


FAKE_LAYERS = {"errors": -1, "data": 0, "envs": 2, "": 3}


def test_clean_fake_package_passes(tmp_path):
    pkg = _fake_package(
        tmp_path,
        {
            "errors.py": "",
            "data/a.py": "from fake.errors import E\n",
            "envs/b.py": "import fake.data.a\nfrom . import c\n",
            "envs/c.py": "from fake.data import a\n",
        },
    )
    assert check(pkg, "fake", FAKE_LAYERS) == []


def test_planted_circle_is_named(tmp_path):
    pkg = _fake_package(
        tmp_path,
        {
            "data/a.py": "from fake.data.b import x\n",
            "data/b.py": "def f():\n    from fake.data import c\n",
            "data/c.py": "import importlib\nM = importlib.import_module('fake.data.a')\n",
        },
    )
    assert check(pkg, "fake", FAKE_LAYERS) == [
        "import circle: fake.data.a -> fake.data.b -> fake.data.c -> fake.data.a"
    ]


def test_planted_upward_import_is_named(tmp_path):
    pkg = _fake_package(
        tmp_path,
        {
            "data/a.py": "def f():\n    from fake.envs.b import run\n",
            "envs/b.py": "run = 1\n",
            "errors.py": "import fake\n",
        },
    )
    problems = check(pkg, "fake", FAKE_LAYERS)
    assert problems == [
        "fake.data.a -> fake.envs.b (line 2): data (layer 0) must not import envs (layer 2)",
        "fake.errors -> fake (line 1): errors (layer -1) must not import the package root (layer 3)",
    ]


def test_planted_private_import_across_packages_is_named(tmp_path):
    pkg = _fake_package(
        tmp_path,
        {
            "data/_helpers.py": "x = 1\n",
            "data/io.py": "from fake.data._helpers import x\n_probe = 1\n",
            "envs/b.py": "from fake.data.io import _probe\nfrom fake.data._helpers import x\n",
        },
    )
    assert check(pkg, "fake", FAKE_LAYERS) == [
        "fake.envs.b -> fake.data._helpers (line 2): private _helpers across packages",
        "fake.envs.b -> fake.data.io (line 1): private _probe across packages",
    ]


@pytest.mark.parametrize(
    "source, target",
    [
        ("from .c import y\n", "fake.envs.c"),
        ("from .. import data\n", "fake.data"),
        ("from ..data import a\n", "fake.data.a"),
    ],
)
def test_relative_imports_resolve(tmp_path, source, target):
    pkg = _fake_package(tmp_path, {"envs/b.py": source, "envs/c.py": "", "data/a.py": ""})
    graph = import_graph(pkg, "fake")
    assert [e.target for e in graph["fake.envs.b"]] == [target]
