"""Clarion's own modules import one another in one direction (docs/architecture.md):

    core  <  notifications  <  channels_app  <  workers  <  the top

`core` (Redis access, the token bucket, the database clock, caches, logs, metrics, the outbox
wake signal) imports no Clarion module, not even inside a function. An app imports `core`,
its own modules and the apps below it. The top (the API, the admin, the WebSocket consumer
and routing, management commands, project's settings/urls/asgi) may import any app; the
apps may import `project.celery` (the Celery app) and no other part of `project`, which is
wiring. Every import counts, those inside functions and `if TYPE_CHECKING:` blocks too. No
module imports another module's private (underscore) names. No two modules import each other,
directly or round a circle, counting the imports inside functions too.

`python -m tests.test_import_graph` prints the cycles of both graphs: module-level imports only,
and every import including those deferred into functions (acceptable, but each is a circle
that a module-level import would close)."""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "project", "notifications", "workers", "channels_app")
# The apps from the bottom up; a module imports its own layer and those below.
LAYERS = ("core", "notifications", "channels_app", "workers")
# On top: may import any app.
TOP = (
    "notifications.api",
    "notifications.admin",
    "notifications.admin_views",
    "notifications.management",
    "notifications.metrics_scrape",
    "workers.admin",
    "workers.management",
    "channels_app.consumers",
    # The consumer's batched writer of acks and reads (inbox transitions, workers).
    "channels_app.inbox_writer",
    "channels_app.routing",
    "channels_app.views",
    "project",
)
# What the apps may import of `project`: the Celery app (to publish tasks by name).
WIRING_FOR_APPS = ("project.celery",)
# Written to by every layer, so it must import nothing of theirs (CONVENTIONS.md).
COUNTERS_MODULE = "core.metrics"

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


def _under(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> int:
    """0 for core, then one per app from the bottom up; the top is above them all."""
    if _under(module, TOP) and not _under(module, WIRING_FOR_APPS):
        return len(LAYERS)
    if _under(module, WIRING_FOR_APPS):
        return 1  # the apps import it; it imports them only inside worker signal receivers
    return LAYERS.index(module.split(".")[0])


def upward_imports(graph: Graph) -> set[tuple[str, str]]:
    """(importer, imported) pairs where a module imports one from a higher layer. The Celery
    app's worker signal receivers (which import workers) are wiring, run only in a worker."""
    return {
        (module, target)
        for module, targets in graph.items()
        if not _under(module, WIRING_FOR_APPS)
        for target in targets
        if layer_of(target) > layer_of(module)
    }


def private_imports(root: Path = ROOT) -> set[tuple[str, str, str]]:
    """(importer, module, name) for every `from module import _name` between two modules."""
    found = set()
    for module, path in clarion_modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.add((module, node.module, alias.name))
    return found


# --- Tests ----------------------------------------------------------------------------------


def test_module_level_imports_form_no_cycle() -> None:
    found = cycles(import_graph(module_level_only=True))
    assert found == [], "module-level import cycles:\n" + describe(found)


def test_the_counters_module_imports_nothing_of_clarion() -> None:
    graph = import_graph(module_level_only=False)
    assert graph[COUNTERS_MODULE] == set()


def test_core_imports_no_app() -> None:
    graph = import_graph(module_level_only=False)
    core = {module: targets for module, targets in graph.items() if _under(module, ("core",))}
    assert len(core) >= 8  # core, db_clock, cache, logs, metrics, shared_state, ...
    assert {m: t - set(core) for m, t in core.items() if t - set(core)} == {}


def test_apps_import_downward_only() -> None:
    upward = upward_imports(import_graph(module_level_only=False))
    assert upward == set(), "imports pointing up a layer"


def test_no_module_imports_another_modules_private_names() -> None:
    assert private_imports() == set()


def test_imports_inside_functions_close_no_circle() -> None:
    found = cycles(import_graph(module_level_only=False))
    assert found == [], "import cycles, counting imports inside functions:\n" + describe(found)


def test_the_layer_rules_see_a_violation(tmp_path: Path) -> None:
    # The rules above must be able to fail: a core module importing an app, an app module
    # importing one above it, and a private name imported across modules are all found.
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "core" / "clock.py").write_text("def f():\n    from notifications import x\n")
    (tmp_path / "notifications" / "x.py").write_text("from workers.y import _hidden\n")
    (tmp_path / "workers" / "y.py").write_text("_hidden = 1\n")
    (tmp_path / "notifications" / "api").mkdir()
    (tmp_path / "notifications" / "api" / "__init__.py").write_text("import workers.y\n")
    graph = import_graph(module_level_only=False, root=tmp_path)
    assert graph["core.clock"] == {"notifications.x"}
    assert upward_imports(graph) == {
        ("core.clock", "notifications.x"),
        ("notifications.x", "workers.y"),
    }
    assert private_imports(tmp_path) == {("notifications.x", "workers.y", "_hidden")}
    # A circle closed by an import inside a function is one too.
    (tmp_path / "workers" / "y.py").write_text(
        "_hidden = 1\ndef g():\n    import notifications.x\n"
    )
    assert cycles(import_graph(module_level_only=True, root=tmp_path)) == []
    assert cycles(import_graph(module_level_only=False, root=tmp_path)) != []


def test_the_graph_holds_the_imports_it_should() -> None:
    # Known edges, so that an empty cycle list cannot come from a graph that missed them.
    graph = import_graph(module_level_only=True)
    assert len(graph) == len(clarion_modules())
    assert {"core.metrics", "workers.selectors"} <= graph["notifications.metrics_scrape"]
    assert graph["project"] == {"project.celery"}
    assert "notifications.metrics_scrape" in graph["project.urls"]


def test_imports_of_skips_function_bodies_and_type_checking_blocks() -> None:
    source = (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "from core import metrics\n"
        "from . import models\n"
        "from .api.views import ERRORS\n"
        "import workers.retry as retry\n"
        "if TYPE_CHECKING:\n"
        "    from workers import services\n"
        "else:\n"
        "    from workers import selectors\n"
        "try:\n"
        "    from notifications import tokens\n"
        "except ImportError:\n"
        "    pass\n"
        "def f():\n"
        "    from project.celery import app\n"
        "class C:\n"
        "    from project import urls\n"
    )
    modules = {
        "notifications",
        "core.metrics",
        "notifications.models",
        "notifications.api",
        "notifications.api.views",
        "notifications.scrape",
        "workers",
        "workers.retry",
        "workers.services",
        "workers.selectors",
        "notifications.tokens",
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
        "core.metrics",
        "notifications.models",
        "notifications.api.views",
        "workers.retry",
        "workers.selectors",
        "notifications.tokens",
        "project.urls",
    }
    assert imports(module_level_only=False) == {
        "core.metrics",
        "notifications.models",
        "notifications.api.views",
        "workers.retry",
        "workers.services",
        "workers.selectors",
        "notifications.tokens",
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
