"""Merge methods, registered by name. Each lives in its own module; importing this package registers them all."""

from . import (  # noqa: F401  (registration)
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    fisher,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from ._registry import MergeMethod, NonFiniteInput, NoParams, ParamSpec, available_methods, get_method, param, register

__all__ = ["MergeMethod", "NoParams", "NonFiniteInput", "ParamSpec", "available_methods", "get_method", "param", "register"]
