"""mergegate: merge models as release candidates.

The public API is what `__all__` lists (tests/test_public_api.py keeps the two honest). Names are
imported on first use, so `mergegate --help` and other light entry points never pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The workflow's headline pieces, stage by stage (recipe → merge → evaluate → gate → release → rollout → gateway),
# then the errors every stage raises. name → module it lives in ("module:attribute" where the names differ).
_EXPORTS = {
    # models and recipes
    "ModelRef": "model_ref",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    # merge
    "MergeOptions": "engine",
    "MergePlan": "engine",
    "MergeResult": "engine",
    "merge": "engine",
    "plan_merge": "engine",
    "run_merge": "engine",
    "available_methods": "methods",
    "get_method": "methods",
    "register": "methods",
    "check_compatible": "compat",
    "Checkpoint": "io.read",
    "merge_adapter": "lora",
    "combine_adapters": "lora",
    "extract_adapter": "lora",
    "build_moe": "moe",
    "export_gguf": "export",
    # evaluate
    "Suite": "evaluate",
    "load_suite": "evaluate",
    "EvalOptions": "evaluate",
    "evaluate_models": "evaluate",
    "Registry": "registry",
    # gate and release
    "Policy": "gate",
    "load_policy": "gate",
    "decide": "gate",
    "GateResult": "gate",
    "release": "pipeline",
    "gate_release": "pipeline",
    "ReleaseResult": "pipeline",
    # search (`mergegate.search` is the subpackage: its function `search` is exported as search_merges)
    "search_merges": "search:search",
    "SearchOptions": "search",
    "load_space": "search",
    # roll out
    "RolloutPlan": "rollout",
    "load_plan": "rollout",
    "create_app": "gateway",  # needs mergegate[serve]
    "serve": "gateway",
    # decide from live traffic (the gateway's live loop; its sequential test on paired scores)
    "LivePolicy": "gate",
    "SequentialParams": "live",
    "CohortEvidence": "live",
    "CanaryEvidence": "live",
    # errors
    "MergegateError": "errors",
    "RecipeError": "errors",
    "MoEConfigError": "errors",
    "CheckpointError": "errors",
    "IncompatibleModels": "errors",
    "MergeOptionsError": "errors",
    "ModelRefError": "errors",
    "GGUFExportError": "errors",
    "GGUFImportError": "errors",
    "SuiteError": "errors",
    "EvaluationError": "errors",
    "RegistryError": "errors",
    "PolicyError": "errors",
    "PlanError": "errors",
    "CandidateServerError": "errors",
    "AddressError": "errors",
    "SearchSpaceError": "errors",
    "SearchError": "errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mergegate' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(f".{module}", __name__), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .compat import check_compatible
    from .engine import MergeOptions, MergePlan, MergeResult, merge, plan_merge, run_merge
    from .errors import (
        AddressError,
        CandidateServerError,
        CheckpointError,
        EvaluationError,
        GGUFExportError,
        GGUFImportError,
        IncompatibleModels,
        MergegateError,
        MergeOptionsError,
        ModelRefError,
        MoEConfigError,
        PlanError,
        PolicyError,
        RecipeError,
        RegistryError,
        SearchError,
        SearchSpaceError,
        SuiteError,
    )
    from .evaluate import EvalOptions, Suite, evaluate_models, load_suite
    from .export import export_gguf
    from .gate import GateResult, LivePolicy, Policy, decide, load_policy
    from .gateway import create_app, serve
    from .io.read import Checkpoint
    from .live import CanaryEvidence, CohortEvidence, SequentialParams
    from .lora import combine_adapters, extract_adapter, merge_adapter
    from .methods import available_methods, get_method, register
    from .model_ref import ModelRef
    from .moe import build_moe
    from .pipeline import ReleaseResult, gate_release, release
    from .recipe import Recipe, load_recipe
    from .registry import Registry
    from .rollout import RolloutPlan, load_plan
    from .search import SearchOptions, load_space
    from .search import search as search_merges
