"""mergegate: merge models as release candidates.

The public API is what `__all__` lists (tests/test_public_api.py keeps the two honest). Names are
imported on first use, so `mergegate --help` and other light entry points never pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "io.read",
    "CheckpointError": "errors",
    "IncompatibleModels": "errors",
    "MergeOptions": "engine",
    "MergePlan": "engine",
    "MergeResult": "engine",
    "MergegateError": "errors",
    "Recipe": "recipe",
    "RecipeError": "errors",
    "available_methods": "methods",
    "check_compatible": "compat",
    "combine_adapters": "lora",
    "extract_adapter": "lora",
    "get_method": "methods",
    "load_recipe": "recipe",
    "merge": "engine",
    "merge_adapter": "lora",
    "plan_merge": "engine",
    "register": "methods",
    "run_merge": "engine",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mergegate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .io.read import Checkpoint
    from .compat import check_compatible
    from .engine import MergeOptions, MergePlan, MergeResult, merge, plan_merge, run_merge
    from .errors import CheckpointError, IncompatibleModels, MergegateError, RecipeError
    from .lora import combine_adapters, extract_adapter, merge_adapter
    from .methods import available_methods, get_method, register
    from .recipe import Recipe, load_recipe
