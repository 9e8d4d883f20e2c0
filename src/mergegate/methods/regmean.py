"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For a linear layer y = W x (HF `nn.Linear`, weight out × in) the merge minimising
Σ_i w_i ||W X_i − W_i X_i||² over the inputs X_i each model sees is W* = (Σ w_i W_i G_i)(Σ w_i G_i)^{-1},
G_i = X_iᵀX_i (here the per-token mean, from mergegate.calibration: the same factor for every model).
As in the paper the off-diagonal part of each Gram is shrunk before merging,
G̃_i = α G_i + (1 − α) diag(G_i), α = `reduce_non_diagonal_ratio`: α = 1 is the exact regression
solution, α = 0 a per-input-feature weighted average; α < 1 also makes G̃ positive definite. The
default 0.9 is the value of the authors' reference implementation (regmean_demo.ipynb in
bloomberg/dataless-model-merging); their emotion-classification configs use 0.1, so lower it when the
merge drifts too far from the sources.

Solved in float64 with torch.linalg.solve (B W*ᵀ = Aᵀ with B symmetric), never an explicit inverse.
Input features no calibration token ever activates (a zero diagonal in every Gram) take the weighted
average for their column; if Σ w_i G̃_i is still singular (α = 1 with fewer tokens than features), a
ridge of 1e-6 · mean diagonal pulls the unconstrained directions toward the weighted average.
Every other tensor — embeddings, norms, biases, and Linear weights without statistics (a tied lm_head is
merged as the embedding it is) — is the weighted average Σ w_i θ_i / Σ w_i. A `base_model` that `models`
does not list is one more input (mergekit's rule for every method); it also supplies the config and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._registry import param, register, work_dtype
from .fisher import weighted_average

RIDGE = 1e-6  # relative to the mean diagonal; only used when the shrunk Gram sum is singular


@dataclass(frozen=True)
class RegMeanShared:
    reduce_non_diagonal_ratio: float = param(0.9, low=0.0, high=1.0)


@dataclass(frozen=True)
class RegMeanModel:
    weight: float = param(1.0, low=0.0)


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G)."""
    return gram * alpha + torch.diag_embed(torch.diagonal(gram)) * (1.0 - alpha)


def regmean_solve(weights_: list[torch.Tensor], grams: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """(Σ c_i W_i G_i)(Σ c_i G_i)^{-1} in float64, with the dead-feature and singular fallbacks above."""
    in_features = grams[0].shape[0]
    lhs = torch.zeros(in_features, in_features, dtype=torch.float64)  # Σ c_i G_i
    rhs = torch.zeros(weights_[0].shape, dtype=torch.float64)  # Σ c_i W_i G_i
    plain = torch.zeros(weights_[0].shape, dtype=torch.float64)  # Σ c_i W_i
    for w, g, c in zip(weights_, grams, coefficients):
        w64 = w.to(torch.float64)
        lhs.add_(g, alpha=c)
        rhs.add_(w64 @ g, alpha=c)
        plain.add_(w64, alpha=c)
    total = sum(coefficients)
    dead = torch.diagonal(lhs) <= 0
    if bool(dead.any()):  # adding c_i·e_k e_kᵀ to every G_i turns column k into the weighted average
        lhs[dead, :] = 0
        lhs[:, dead] = 0
        lhs[dead, dead] = total
        rhs[:, dead] = plain[:, dead]
    _, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0:
        ridge = RIDGE * float(torch.diagonal(lhs).mean())
        lhs = lhs + torch.eye(in_features, dtype=torch.float64) * (ridge * total)
        rhs = rhs + plain * ridge
    return torch.linalg.solve(lhs, rhs.T).T


@register("regmean", shared=RegMeanShared, per_model=RegMeanModel, base="ignored", per_model_scope="input",
          statistics="gram")
def regmean(base, tensors, per_model, shared: RegMeanShared, rng=None, *, stats=None) -> torch.Tensor:
    """Linear layers merged to best reproduce every model's outputs on the calibration text; others averaged."""
    weights = [p.weight for p in per_model]
    if stats is None or any(s is None for s in stats) or tensors[0].dim() != 2:
        return weighted_average(tensors, weights)
    if sum(weights) <= 0:
        raise ValueError("the model weights sum to 0, so no average exists")
    in_features = tensors[0].shape[1]
    for position, gram in enumerate(stats):
        if tuple(gram.shape) != (in_features, in_features):
            raise ValueError(f"the Gram matrix of input {position} has shape {list(gram.shape)}, "
                             f"expected [{in_features}, {in_features}] for a weight of shape {list(tensors[0].shape)}")
    grams = [shrink_off_diagonal(g.to(torch.float64), shared.reduce_non_diagonal_ratio) for g in stats]
    return regmean_solve(list(tensors), grams, weights).to(work_dtype(tensors[0]))
