"""TIES (Yadav et al. 2023): trim each delta to its top-`density` magnitudes, elect a sign, disjoint mean."""

from dataclasses import dataclass

from . import _sparsify, _task_vectors
from ._registry import param, register
from .task_arithmetic import TaskVectorModel


@dataclass(frozen=True)
class TiesShared:
    normalize: bool = param(True)
    rescale: bool = param(False)
    lambda_: float = param(1.0, name="lambda")
    int8_mask: bool = param(False)


def _trim(delta, params, rescale, rng):
    return _sparsify.magnitude_selection(delta, params.density, rescale)


@register("ties", shared=TiesShared, per_model=TaskVectorModel)
def ties(base, tensors, per_model, shared, rng=None):
    """Magnitude trim, sign election on the weighted deltas, mean over the agreeing ones."""
    return _task_vectors.combine(base, tensors, per_model, shared, rng, sparsify=_trim, sign_consensus=True)
