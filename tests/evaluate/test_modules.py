"""The evaluation's modules import one way: the orchestration (runner) imports the row runners (sharded), which
import the model runners (local, endpoint); the suite imports the evaluators (for their names), which read rows but
import nothing of the suite at run time; nothing imports back up, at the top of a module or inside a function (an
import only for type checking, under `if TYPE_CHECKING:`, is not an import at run time)."""

from __future__ import annotations

import ast
from pathlib import Path

import mergegate.evaluate

EVALUATE = Path(mergegate.evaluate.__file__).parent
# module -> the evaluate modules it must never import (directly, at any depth of its code)
NEVER = {
    "sharded": {"runner"},
    "local": {"runner", "sharded", "endpoint"},
    "decoding": {"runner", "sharded", "local", "endpoint", "suite", "evaluators", "options"},
    "endpoint": {"runner", "sharded", "local"},
    "options": {"runner", "sharded", "local", "endpoint"},
    "evaluators": {"suite", "runner", "sharded", "local", "endpoint"},
}


def _imported(module: str) -> set[str]:
    """The sibling modules of evaluate/ that `module` (a module, or a package's modules together) imports anywhere
    in its code."""
    package = EVALUATE / module
    files = sorted(package.glob("*.py")) if package.is_dir() else [EVALUATE / f"{module}.py"]
    sibling = 2 if package.is_dir() else 1  # the level of a relative import that names evaluate/'s modules
    found = set()
    for file in files:
        found |= _imports_in(ast.parse(file.read_text()), sibling)
    return found


def _imports_in(tree: ast.Module, sibling: int) -> set[str]:
    for node in ast.walk(tree):  # imports for type checking only are dropped
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == sibling and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == sibling:  # from . import x
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("mergegate.evaluate."):
                found.add(node.module.split(".")[2])
    return found


def test_the_runner_and_its_shards_import_downwards_only():
    for module, forbidden in NEVER.items():
        assert not _imported(module) & forbidden, (module, _imported(module) & forbidden)
    assert {"sharded", "local"} <= _imported("runner") and {"local", "endpoint"} <= _imported("sharded")
    assert "decoding" in _imported("local")


def test_the_suite_imports_the_evaluators_and_not_the_other_way():
    assert "evaluators" in _imported("suite") and "suite" not in _imported("evaluators")
