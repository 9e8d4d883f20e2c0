"""mergegate: merge models as release candidates.

The public API is what `__all__` lists; submodules are implementation detail (tests/test_public_api.py
keeps the two honest).
"""

from .checkpoint import Checkpoint
from .compat import check_compatible
from .engine import MergePlan, MergeResult, merge, plan_merge, run_merge
from .errors import CheckpointError, IncompatibleModels, MergegateError, RecipeError
from .methods import available_methods, get_method, register
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "IncompatibleModels",
    "MergePlan",
    "MergeResult",
    "MergegateError",
    "Recipe",
    "RecipeError",
    "__version__",
    "available_methods",
    "check_compatible",
    "get_method",
    "load_recipe",
    "merge",
    "plan_merge",
    "register",
    "run_merge",
]
