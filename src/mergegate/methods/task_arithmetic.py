"""Task arithmetic (Ilharco et al. 2023): base + lambda * sum of weighted task vectors."""

from dataclasses import dataclass

from . import _task_vectors
from ._registry import param, register


@dataclass(frozen=True)
class TaskArithmeticShared:
    normalize: bool = param(False)
    rescale: bool = param(False)
    lambda_: float = param(1.0, name="lambda")
    int8_mask: bool = param(False)  # accepted for mergekit recipes; boolean masks make it moot


@dataclass(frozen=True)
class TaskVectorModel:
    weight: float = param()
    density: float = param(1.0, low=0.0, high=1.0)


@register("task_arithmetic", shared=TaskArithmeticShared, per_model=TaskVectorModel, elementwise=True)
def task_arithmetic(base, tensors, per_model, shared, rng=None):
    """Add the weighted sum of the deltas to the base."""
    return _task_vectors.combine(base, tensors, per_model, shared, rng)
