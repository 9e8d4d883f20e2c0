"""The gateway's answering modules import one way: ensembles (routes that answer with several models) builds on
dispatch (one model's attempt, the fallback chain), and both share the answer types in answers; dispatch never
imports ensembles back, at the top of the module or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import mergegate.gateway

GATEWAY = Path(mergegate.gateway.__file__).parent
# module -> the gateway modules it must never import (directly, at any depth of its code)
NEVER = {
    "dispatch": {"ensembles", "app", "api"},
    "answers": {"dispatch", "ensembles", "app", "api"},
}


def _imported(module: str) -> set[str]:
    """The sibling modules of gateway/ that `module` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse((GATEWAY / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("mergegate.gateway."):
                found.add(node.module.split(".")[2])
    return found


def test_dispatch_and_ensembles_share_the_answer_types_and_import_one_way():
    for module, forbidden in NEVER.items():
        assert not _imported(module) & forbidden, (module, _imported(module) & forbidden)
    assert "answers" in _imported("dispatch") and "answers" in _imported("ensembles")
