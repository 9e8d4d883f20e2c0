"""DARE (Yu et al. 2024): drop each delta entry at random with probability 1 - `density`, rescale.

`rescale: true` (the default) restores each delta's L1 norm after the drop, as mergekit does.
"""

from dataclasses import dataclass

from . import _sparsify, _task_vectors
from ._registry import param, register
from .task_arithmetic import TaskVectorModel


@dataclass(frozen=True)
class DareShared:
    normalize: bool = param(False)
    rescale: bool = param(True)
    lambda_: float = param(1.0, name="lambda")
    int8_mask: bool = param(False)


def _drop(delta, params, rescale, rng):
    return _sparsify.random_selection(delta, params.density, rescale, rng)


@register("dare_linear", shared=DareShared, per_model=TaskVectorModel, random=True)
def dare_linear(base, tensors, per_model, shared, rng=None):
    """Random drop and rescale, then a weighted sum of the deltas."""
    return _task_vectors.combine(base, tensors, per_model, shared, rng, sparsify=_drop)


@register("dare_ties", shared=DareShared, per_model=TaskVectorModel, random=True)
def dare_ties(base, tensors, per_model, shared, rng=None):
    """Random drop and rescale, then TIES sign election."""
    return _task_vectors.combine(base, tensors, per_model, shared, rng, sparsify=_drop, sign_consensus=True)
