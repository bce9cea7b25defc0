"""The package's import graph has no cycle: data flows one way.

    cli -> (explain | bench | train) -> (minilm_trace, module_kinds, models, trace)
        -> modules -> functional (and ring) -> engines

Every module under src/selfattn is parsed with `ast` (nothing is imported), and each
``import selfattn...`` / ``from selfattn... import ...`` in it becomes an edge, wherever it
stands: at the top, inside a function (a "late" import hides a cycle, it does not break it),
or under ``if TYPE_CHECKING:``. ``from selfattn.pkg import name`` points at the submodule
``selfattn.pkg.name`` where there is one, else at ``selfattn.pkg`` itself. The implicit import of
a parent package's ``__init__`` is not an edge: every module would otherwise depend on
``selfattn/__init__.py``, which re-exports the public API.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import selfattn

ROOT = Path(selfattn.__file__).resolve().parent  # src/selfattn


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(tree: ast.AST, name: str, path: Path, modules: set[str]) -> set[str]:
    """The selfattn modules that a module's imports name, relative imports resolved."""
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..y import z
                anchor = package_of(name, path).split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # a submodule where there is one, else the module itself
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else resolve(base, modules))
    return {target for target in found if target is not None and target != name}


def resolve(dotted: str, modules: set[str]) -> str | None:
    """The longest prefix of ``dotted`` that is one of our modules (None: not ours)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    """{module: the selfattn modules it imports}, for every module under src/selfattn."""
    paths = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    modules = set(paths)
    return {
        name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), name, path, modules)
        for name, path in paths.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle through each strongly connected component's first module."""
    return [_a_cycle(graph, component) for component in tangles(graph)]


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    members, start = set(component), component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in {component}")  # pragma: no cover


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    found = [
        f"{' -> '.join(_a_cycle(graph, members))}   (in a tangle of: {', '.join(members)})"
        for members in tangles(graph)
    ]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_cycle_finder_finds_cycles_and_nothing_else():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    two = cycles({"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"x", "a"}})
    assert two == [["a", "b", "a"], ["x", "y", "x"]]


def test_late_imports_inside_functions_are_edges():
    graph = import_graph()
    assert "selfattn.explain.html" in graph["selfattn.explain.run"]  # imported inside run_explain
    assert "selfattn.explain.cli" in graph["selfattn.cli"]  # imported inside build_parser


def test_the_modules_do_not_load_the_ring():
    """``import selfattn`` and the chapter's modules load no ring attention (and so, where
    ``import torch`` alone does not, no torch.distributed): the ring is imported only by a
    `MultiHeadAttention` given a ``context_parallel_group``."""
    code = (
        "import sys, torch\n"
        "torch_loads_it = 'torch.distributed' in sys.modules\n"
        "import selfattn.modules.causal_multihead\n"
        "from selfattn import MultiHeadAttention\n"
        "mha = MultiHeadAttention(8, 8, 8, 0.0, 2).eval()\n"
        "with torch.no_grad():\n"
        "    mha(torch.randn(1, 3, 8), use_cache=True)\n"
        "ring = sorted(m for m in sys.modules if m.startswith('selfattn.ring'))\n"
        "assert not ring, ring\n"
        "assert torch_loads_it or 'torch.distributed' not in sys.modules\n"
        "print('torch_loads_distributed', torch_loads_it)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
