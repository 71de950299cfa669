"""tn_ray's import graph (issue 22): every folder on its floor, no import running up, no circle.

The floors, lowest first, are written once (:data:`FLOORS`). A module may import from its own
floor or a lower one, whether the import is at module level or inside a function (a
function-local import is an import all the same: it only runs later). Relative imports are
resolved, and ``"tn_ray.x.y:attr"`` strings (the sweep registry's lazy targets) count as imports.
There is no allow-list: a new folder must be given its floor here.
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tn_ray"

# lowest first; "" is the floor of the top-level files (errors, config, storage, cluster, testing, provenance)
FLOORS = [
    "",
    "data",
    "prompts",
    "rewards",
    "textnorm",
    "scoring",
    "diffusion",
    "analysis",
    "training",
    "reward_learning",
    "sweep",
    "labeling",
    "experiments",
    "serve",
    "commands",
    "cli",
]
RANK = {name: i for i, name in enumerate(FLOORS)}
TARGET = re.compile(r"^(tn_ray(?:\.\w+)+):\w+$")  # "tn_ray.sweep.trainables.rwr:RWR"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    where: str  # path:line
    local: bool  # inside a function or class body


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_names()


def resolve(name: str) -> str | None:
    """The tn_ray module ``name`` is or lies in (``tn_ray.a.b.attr`` -> ``tn_ray.a.b``); None outside tn_ray."""
    if name != "tn_ray" and not name.startswith("tn_ray."):
        return None
    while name not in MODULES:
        name = name.rpartition(".")[0]
        if not name:
            return None
    return name


def floor(module: str) -> str:
    """``tn_ray.training.rwr`` -> ``training``; a top-level file is on floor "" except ``cli``."""
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    is_package = MODULES[module].name == "__init__.py"
    if len(parts) == 2 and not is_package:
        return "cli" if parts[1] == "cli" else ""
    return parts[1]


def imports_of(module: str) -> list[Edge]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges: list[Edge] = []

    def add(name: str | None, node: ast.AST, local: bool) -> None:
        target = resolve(name) if name else None
        if target is not None and target != module:
            edges.append(Edge(module, target, f"{path.relative_to(REPO)}:{node.lineno}", local))

    def visit(node: ast.AST, local: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, local)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:  # `from tn_ray.x import y`: y may be a module of its own
                add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin, node, local)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and TARGET.match(node.value):
            add(TARGET.match(node.value).group(1), node, True)
        inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return list(dict.fromkeys(edges))  # `from m import a, b` of one module: one edge


EDGES = [edge for module in MODULES for edge in imports_of(module)]


def upward(edges: list[Edge]) -> list[str]:
    """Imports that run against FLOORS (or from / into a folder FLOORS does not name)."""
    bad = []
    for e in edges:
        src, dst = floor(e.source), floor(e.target)
        if src not in RANK or dst not in RANK:
            bad.append(f"{e.where}: {e.source} -> {e.target}: folder '{src if src not in RANK else dst}' has no floor")
        elif RANK[dst] > RANK[src]:
            bad.append(f"{e.where}: {e.source} ({src or 'top level'}) imports {e.target} ({dst}), a higher floor")
    return bad


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_folder_has_a_floor():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(FLOORS), f"folders without a floor in FLOORS: {sorted(folders - set(FLOORS))}"


def test_no_import_runs_up_the_floors():
    bad = upward(EDGES)
    assert not bad, f"{len(bad)} imports against the floors {FLOORS}:\n" + "\n".join(bad)


def test_no_circle_of_modules():
    found = cycles(EDGES)
    detail = []
    for component in found:
        members = set(component)
        detail.append(
            " <-> ".join(component)
            + ": "
            + ", ".join(
                f"{e.where} ({e.source} -> {e.target})" for e in EDGES if e.source in members and e.target in members
            )
        )
    assert not found, f"{len(found)} circles:\n" + "\n".join(detail)


def test_function_local_imports_are_counted():
    """A figure, not a limit: how many tn_ray imports hide inside functions (printed with -s)."""
    local = [e for e in EDGES if e.local]
    print(
        f"\ntn_ray import edges (importing line -> tn_ray module): {len(EDGES)} ({len(EDGES) - len(local)} at module "
        "level, "
        f"{len(local)} function-local or lazy strings) "
        f"in {len(MODULES)} modules"
    )
    assert EDGES and len(local) <= len(EDGES)


def test_training_knows_nothing_about_tune_and_no_private_ray_import():
    """training/ never imports Ray Tune (sweep/trainables/ adapts it); no module imports Ray's private API."""
    bad = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if floor(module) == "training" and (name == "ray.tune" or name.startswith("ray.tune.")):
                    bad.append(f"{where}: {name}")
                if name.startswith("ray.") and any(part.startswith("_") for part in name.split(".")):
                    bad.append(f"{where}: {name} (private)")
    assert not bad, bad


def test_every_tn_ray_import_names_an_existing_module():
    """A moved module leaves no import of its old path behind (tn_ray, tests and benchmarks; strings included)."""
    missing = []
    for root in ("tn_ray", "tests", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and TARGET.match(node.value):
                    names = [TARGET.match(node.value).group(1)]
                missing += [
                    f"{path.relative_to(REPO)}:{node.lineno}: {n}"
                    for n in names
                    if (n == "tn_ray" or n.startswith("tn_ray.")) and n not in MODULES
                ]
    assert not missing, missing


# the checker itself, on hand-made graphs
def _edge(a: str, b: str) -> Edge:
    return Edge(a, b, "x.py:1", False)


def test_checker_finds_a_circle_and_ignores_a_chain():
    assert cycles([_edge("a", "b"), _edge("b", "c"), _edge("c", "a"), _edge("c", "d")]) == [["a", "b", "c"]]
    assert cycles([_edge("a", "b"), _edge("b", "c"), _edge("a", "c")]) == []


@pytest.mark.parametrize(
    ("source", "target", "up"),
    [
        ("tn_ray.training.rwr", "tn_ray.sweep.registry", True),
        ("tn_ray.sweep.registry", "tn_ray.training.rwr", False),
        ("tn_ray.errors", "tn_ray.data.tia2", True),
        ("tn_ray.cli", "tn_ray.commands.rwr", False),
        ("tn_ray.commands.rwr", "tn_ray.cli", True),
        ("tn_ray.data.tia2", "tn_ray.config", False),
    ],
)
def test_checker_ranks_floors(source, target, up):
    assert bool(upward([_edge(source, target)])) is up


def test_checker_resolves_relative_and_string_imports(tmp_path):
    assert resolve("tn_ray.training.rwr.RwrMethod") == "tn_ray.training.rwr" and resolve("ray.tune") is None
    edges = {(e.target, e.local) for e in imports_of("tn_ray.sweep.registry")}
    assert ("tn_ray.sweep.trainables.rwr", True) in edges  # the registry's "module:attr" string
