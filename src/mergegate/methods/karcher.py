"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit hypersphere, scaled by
their mean norm. Every model weighs the same; a `base_model` that `models` does not list is one more input,
appended last (as mergekit does for every method).

Each tensor is one vector. Starting from the normalized average of the unit directions, each step maps the
directions into the tangent space at the current mean (log map: angle/sin(angle) times the orthogonal
component), averages them there and moves along that average (exponential map); it stops after `max_iter`
steps or once the step is shorter than `tol`. Tensors whose norm is at most `tol` do not pull the
direction (all of them that small gives zeros) but still count in the mean norm. As mergekit 0.1.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._geometry import compute_dtype
from ._registry import param, register


@dataclass(frozen=True)
class KarcherShared:
    max_iter: int = param(10, low=0)
    tol: float = param(1e-5, low=0.0)


def unit_directions(vectors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each vector's norm (0-d tensor) and its direction (zeros for a zero vector)."""
    norms = [torch.linalg.vector_norm(v) for v in vectors]
    units = [torch.zeros_like(v) if n.item() == 0 else v / n for v, n in zip(vectors, norms)]
    return norms, units


def tangent_average(mean: torch.Tensor, units: list[torch.Tensor], alphas: list[float], tol: float) -> torch.Tensor:
    """The weighted average of the log maps of `units` at `mean` (directions closer than `tol` radians add 0)."""
    flat_mean = mean.reshape(-1)
    tangent = torch.zeros_like(mean)
    for alpha, unit in zip(alphas, units):
        cos = torch.dot(flat_mean, unit.reshape(-1)).clamp(-1.0, 1.0)
        angle = torch.arccos(cos)
        if angle.item() < tol:
            continue
        # coefficient as a 0-d tensor times the vector: mergekit's rounding, so results agree to the bit
        tangent += alpha * (angle / torch.sin(angle)) * (unit - cos * mean)
    return tangent


def karcher_direction(units: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of unit vectors (alphas summing to 1), a unit vector."""
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units):
        mean += alpha * unit
    length = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if length.item() < tol else mean / length
    for _ in range(max_iter):
        tangent = tangent_average(mean, units, alphas, tol)
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)  # exponential map
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:  # stay on the sphere despite rounding
            mean = mean / length
    return mean


def karcher_mean(vectors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """Karcher mean of the directions of `vectors`, scaled by the alpha-weighted sum of their norms."""
    norms, units = unit_directions(vectors)
    pulling = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not pulling:
        return torch.zeros_like(vectors[0])
    total = sum(alphas[i] for i in pulling)
    direction = karcher_direction([units[i] for i in pulling], [alphas[i] / total for i in pulling], max_iter, tol)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * direction


@register("karcher", shared=KarcherShared, base="ignored", per_model_scope="input", min_models=1)
def karcher(base, tensors, per_model, shared: KarcherShared, rng=None) -> torch.Tensor:
    """Riemannian mean of the models' directions on the hypersphere, scaled by their mean norm."""
    dtype = compute_dtype(None, tensors)
    if len(tensors) == 1:
        return tensors[0].to(dtype, copy=True)
    vectors = [tensor.to(dtype) for tensor in tensors]
    return karcher_mean(vectors, [1.0 / len(vectors)] * len(vectors), shared.max_iter, shared.tol)
