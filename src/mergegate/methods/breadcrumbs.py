"""Model breadcrumbs (Davari & Belilovsky 2023): drop the largest `gamma` outliers and the smallest entries."""

from dataclasses import dataclass

from . import _sparsify, _task_vectors
from ._registry import param, register
from .task_arithmetic import TaskArithmeticShared


@dataclass(frozen=True)
class BreadcrumbsModel:
    weight: float = param()
    density: float = param(1.0, low=0.0, high=1.0)
    gamma: float = param(0.01, low=0.0, high=1.0)


def _crumbs(delta, params, rescale, rng):
    return _sparsify.outliers_selection(delta, params.density, params.gamma, rescale)


@register("breadcrumbs", shared=TaskArithmeticShared, per_model=BreadcrumbsModel)
def breadcrumbs(base, tensors, per_model, shared, rng=None):
    """Outlier and small-magnitude removal, then a weighted sum of the deltas."""
    return _task_vectors.combine(base, tensors, per_model, shared, rng, sparsify=_crumbs)


@register("breadcrumbs_ties", shared=TaskArithmeticShared, per_model=BreadcrumbsModel)
def breadcrumbs_ties(base, tensors, per_model, shared, rng=None):
    """Breadcrumbs sparsification with TIES sign election."""
    return _task_vectors.combine(base, tensors, per_model, shared, rng, sparsify=_crumbs, sign_consensus=True)
