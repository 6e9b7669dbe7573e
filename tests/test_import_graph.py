"""Clarion's own modules (project, notifications, workers, channels_app) import one another
without a circle: the graph of their module-level imports is acyclic, and the counters module
that every layer writes to imports none of them, not even inside a function.

`python -m tests.test_import_graph` prints the cycles of both graphs: module-level imports only,
and every import including those deferred into functions (acceptable, but each is a circle
that a module-level import would close)."""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("project", "notifications", "workers", "channels_app")
# Written to by every layer, so it must import nothing of theirs (CONVENTIONS.md).
COUNTERS_MODULE = "notifications.metrics"

Graph = dict[str, set[str]]


def clarion_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of Clarion's own packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(
    nodes: Iterable[ast.AST], *, module_level_only: bool
) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: class bodies and `if`/`try`
    blocks do, function bodies and `if TYPE_CHECKING:` blocks do not."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif module_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif module_level_only and isinstance(node, ast.Lambda):
            continue
        elif module_level_only and isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_statements(node.orelse, module_level_only=True)
        else:
            yield from _import_statements(
                ast.iter_child_nodes(node), module_level_only=module_level_only
            )


def _resolve(name: str, modules: Collection[str]) -> str | None:
    """The module of ours that importing `name` loads (its nearest known ancestor), if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(
    source: str,
    *,
    module: str,
    is_package: bool,
    modules: Collection[str],
    module_level_only: bool,
) -> set[str]:
    """The modules of ours that `module`'s source imports. `from package import name` points at
    package.name when that is a module, else at the package."""
    found = set()
    tree = ast.parse(source)
    for statement in _import_statements(tree.body, module_level_only=module_level_only):
        if isinstance(statement, ast.Import):
            targets = [_resolve(alias.name, modules) for alias in statement.names]
        else:
            base = statement.module or ""
            if statement.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (statement.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [
                f"{base}.{alias.name}"
                if f"{base}.{alias.name}" in modules
                else _resolve(base, modules)
                for alias in statement.names
            ]
        found.update(target for target in targets if target)
    found.discard(module)
    return found


def import_graph(*, module_level_only: bool, root: Path = ROOT) -> Graph:
    modules = clarion_modules(root)
    return {
        module: imports_of(
            path.read_text(),
            module=module,
            is_package=path.name == "__init__.py",
            modules=modules,
            module_level_only=module_level_only,
        )
        for module, path in modules.items()
    }


def _components(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def cycles(graph: Graph) -> list[list[str]]:
    """One shortest cycle through the first module of each circle, as a path that ends where
    it starts; empty when the graph is acyclic."""
    found = []
    for component in _components(graph):
        members = set(component)
        start = component[0]
        came_from: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in came_from:
            following = []
            for node in frontier:
                for successor in sorted(graph[node] & members):
                    if successor not in came_from:
                        came_from[successor] = node
                        following.append(successor)
            frontier = following
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(came_from[path[-1]])
        found.append(path[::-1])
    return found


def describe(found: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in found)


# --- Tests ----------------------------------------------------------------------------------


def test_module_level_imports_form_no_cycle() -> None:
    found = cycles(import_graph(module_level_only=True))
    assert found == [], "module-level import cycles:\n" + describe(found)


def test_the_counters_module_imports_nothing_of_clarion() -> None:
    graph = import_graph(module_level_only=False)
    assert graph[COUNTERS_MODULE] == set()


def test_the_graph_holds_the_imports_it_should() -> None:
    # Known edges, so that an empty cycle list cannot come from a graph that missed them.
    graph = import_graph(module_level_only=True)
    assert len(graph) == len(clarion_modules())
    assert {"notifications.metrics", "workers.selectors"} <= graph["notifications.metrics_scrape"]
    assert graph["project"] == {"project.celery"}
    assert "notifications.metrics_scrape" in graph["project.urls"]


def test_imports_of_skips_function_bodies_and_type_checking_blocks() -> None:
    source = (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "from notifications import metrics\n"
        "from . import models\n"
        "from .api.views import ERRORS\n"
        "import workers.retry as retry\n"
        "if TYPE_CHECKING:\n"
        "    from workers import services\n"
        "else:\n"
        "    from workers import selectors\n"
        "try:\n"
        "    from channels_app import tokens\n"
        "except ImportError:\n"
        "    pass\n"
        "def f():\n"
        "    from project.celery import app\n"
        "class C:\n"
        "    from project import urls\n"
    )
    modules = {
        "notifications",
        "notifications.metrics",
        "notifications.models",
        "notifications.api",
        "notifications.api.views",
        "notifications.scrape",
        "workers",
        "workers.retry",
        "workers.services",
        "workers.selectors",
        "channels_app.tokens",
        "project",
        "project.celery",
        "project.urls",
    }

    def imports(*, module_level_only: bool) -> set[str]:
        return imports_of(
            source,
            module="notifications.scrape",
            is_package=False,
            modules=modules,
            module_level_only=module_level_only,
        )

    assert imports(module_level_only=True) == {
        "notifications.metrics",
        "notifications.models",
        "notifications.api.views",
        "workers.retry",
        "workers.selectors",
        "channels_app.tokens",
        "project.urls",
    }
    assert imports(module_level_only=False) == {
        "notifications.metrics",
        "notifications.models",
        "notifications.api.views",
        "workers.retry",
        "workers.services",
        "workers.selectors",
        "channels_app.tokens",
        "project.celery",
        "project.urls",
    }


def test_cycles_are_reported_as_paths() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":
    for module_level_only, title in ((True, "module-level imports"), (False, "all imports")):
        graph = import_graph(module_level_only=module_level_only)
        found = cycles(graph)
        print(f"{title}: {len(found)} circle(s)")
        for cycle, component in zip(found, _components(graph), strict=True):
            print(f"  {' -> '.join(cycle)}  (circle of {', '.join(component)})")
