"""DELLA (Deep et al. 2024): drop delta entries at random, with small magnitudes more likely to go.

MagPrune ranks each row of a delta by magnitude and keeps an entry with probability from
`density - epsilon` (smallest) to `density + epsilon` (largest), linear in rank, so on average a
`density` fraction survives; `rescale` then restores the delta's L1 norm. `della` follows with TIES sign
election and a disjoint mean (`normalize` defaults to true); `della_linear` with a plain weighted sum.
Parameters and defaults are mergekit's.
"""

from dataclasses import dataclass

from ..errors import RecipeError
from . import _sparsify, _task_vectors
from ._registry import param, register


@dataclass(frozen=True)
class DellaShared:
    normalize: bool = param(True)
    rescale: bool = param(True)
    lambda_: float = param(1.0, name="lambda")
    int8_mask: bool = param(False)  # accepted for mergekit recipes; the sign mask is boolean either way


@dataclass(frozen=True)
class DellaLinearShared:
    normalize: bool = param(False)
    rescale: bool = param(True)
    lambda_: float = param(1.0, name="lambda")
    int8_mask: bool = param(False)


@dataclass(frozen=True)
class DellaModel:
    weight: float = param()
    density: float = param(1.0, low=0.0, high=1.0)
    epsilon: float = param(0.15, low=0.0, high=1.0)

    def __post_init__(self):
        # Checked when the plan resolves a tensor's parameters, so a bad window fails before any work.
        try:
            _sparsify.check_della_window(self.density, self.epsilon)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None


def _magprune(delta, params, rescale, rng):
    return _sparsify.della_selection(delta, params.density, params.epsilon, rescale, rng)


@register("della", shared=DellaShared, per_model=DellaModel, random=True)
def della(base, tensors, per_model, shared, rng=None):
    """Magnitude-ranked random drop, then TIES sign election and the mean over agreeing deltas."""
    return _task_vectors.combine(base, tensors, per_model, shared, rng, sparsify=_magprune, sign_consensus=True)


@register("della_linear", shared=DellaLinearShared, per_model=DellaModel, random=True)
def della_linear(base, tensors, per_model, shared, rng=None):
    """Magnitude-ranked random drop, then a weighted sum of the deltas."""
    return _task_vectors.combine(base, tensors, per_model, shared, rng, sparsify=_magprune)
