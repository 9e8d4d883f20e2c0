"""The package's floors, as import-linter's layers contract would state them: a room (a top-level module or
sub-package of mergegate) imports only rooms on floors below its own, and no two modules import each other,
directly or around a loop. Imports under `if TYPE_CHECKING:` are left out: they never run."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mergegate"

# Top floor first. A room imports only rooms on floors with a higher number (further down); rooms on one floor
# do not import each other. A new room goes on the floor its imports put it: the test says which.
FLOORS: dict[str, int] = {
    "cli": 1,
    "demo": 2,
    "search": 3,
    "pipeline": 4,
    "compare": 5, "report": 5,
    "gate": 6, "gateway": 6, "moe": 6,
    "costs": 7, "engine": 7, "evaluate": 7, "rollout": 7,
    "calibration": 8, "compat": 8, "export": 8, "lora": 8, "model_ref": 8, "recipe": 8, "registry": 8, "vocab": 8,
    "_ray": 9, "_staging": 9, "_yaml": 9, "addresses": 9, "io": 9, "live": 9, "methods": 9, "report_page": 9, "serving": 9,
    "_extras": 10, "_seeds": 10, "devices": 10, "errors": 10, "progress": 10,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        lines.add(sub.lineno)
    return lines


def _imports(path: Path) -> set[str]:
    """The mergegate modules a file imports (at module level or inside functions), as dotted names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:  # from . import x: x may be a module
                found.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "mergegate" or name.startswith("mergegate.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in _imports(path):
            while target not in modules and "." in target:  # `from pkg import name` names an attribute
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {t for ts in graph.values() for t in ts}):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_around_a_loop():
    assert _cycles(_graph()) == []


def test_every_room_is_on_a_floor():
    rooms = {_room(_module_name(p)) for p in SRC.rglob("*.py")} - {None, "__main__"}
    assert sorted(rooms - set(FLOORS)) == [], "put each new room on the floor its imports put it (FLOORS)"
    assert sorted(set(FLOORS) - rooms) == [], "a room that no longer exists is still listed in FLOORS"


def test_rooms_import_only_rooms_on_lower_floors():
    upward = []
    for module, targets in _graph().items():
        room = _room(module)
        if room is None or room == "__main__":  # the package root re-exports; __main__ runs the CLI
            continue
        for target in targets:
            other = _room(target)
            if other is None or other == room:
                continue
            if FLOORS[other] <= FLOORS[room]:
                upward.append(f"{module} (floor {FLOORS[room]}) imports {target} (floor {FLOORS[other]})")
    assert upward == []
