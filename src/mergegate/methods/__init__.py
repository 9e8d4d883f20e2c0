"""Merge methods, registered by name. Each lives in its own module; importing this package registers them all."""

from . import breadcrumbs, dare, linear, passthrough, slerp, task_arithmetic, ties  # noqa: F401  (registration)
from . import della, sce  # noqa: F401  (registration)
from . import arcee_fusion, karcher, model_stock, multislerp, nearswap, nuslerp, ram  # noqa: F401  (registration)
from . import fisher, regmean  # noqa: F401  (registration)
from ._registry import MergeMethod, NoParams, NonFiniteInput, ParamSpec, available_methods, get_method, param, register

__all__ = ["MergeMethod", "NoParams", "NonFiniteInput", "ParamSpec", "available_methods", "get_method", "param", "register"]
