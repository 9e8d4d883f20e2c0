"""Combine LoRA adapters into one, with the combination types of PEFT's `add_weighted_adapter`.

Three families, per targeted module (adapter i has matrices A_i, B_i, scaling s_i and weight w_i):

- `cat`: stack the ranks, A = [w_i s_i A_i], B = [B_i]. Exact: B@A = Σ w_i s_i B_i A_i.
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: combine the A matrices with weights
  sign(w_i s_i)·sqrt(|w_i s_i|) and the B matrices with sqrt(|w_i s_i|), each with the named task-vector
  rule. Cheap, keeps the rank, but B@A then carries cross terms B_i A_j: only an approximation of the
  weighted sum of the deltas (exact for a single adapter). Ranks must be equal.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: combine the full deltas
  s_i B_i A_i with the named rule, then keep the best rank-k approximation (truncated SVD), optionally
  clamping the factors at a quantile.

The combined adapter always has scaling 1 (lora_alpha = r, rsLoRA off) so its B@A is the combined delta.
PEFT instead copies the first adapter's `use_rslora`, which scales an rsLoRA combination by sqrt(r) too much.
Where PEFT draws DARE masks from the global RNG, here each module draws from a generator seeded by
(seed, module), so the result does not depend on module order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._seeds import derived_seed
from .._staging import check_output, staged
from ..errors import IncompatibleModels, RecipeError
from ..io.write import natural_key
from .adapter import Adapter, LoraWeights, rank_layout, read_adapter, write_adapter_files

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *SVD_TYPES)
_NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                  "dare_ties_svd", "magnitude_prune_svd"}


@dataclass(frozen=True)
class CombineOptions:
    """How to combine: the type, plus the parameters the pruning and SVD types use."""

    combination_type: str
    density: float | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    @property
    def rule(self) -> str:
        """The task-vector rule applied to the tensors: the type without its `_svd` suffix."""
        return "linear" if self.combination_type in ("svd", "cat") else self.combination_type.removesuffix("_svd")


def validate_options(options: CombineOptions) -> None:
    """Raise RecipeError naming the argument that is missing or out of range."""
    kind = options.combination_type
    if kind not in COMBINATION_TYPES:
        raise RecipeError(f"combination_type={kind!r}: expected one of {', '.join(COMBINATION_TYPES)}")
    if kind in _NEEDS_DENSITY:
        if options.density is None:
            raise RecipeError(f"combination_type={kind!r} needs density (the fraction of entries kept, in (0, 1])")
        if not 0 < options.density <= 1:
            raise RecipeError(f"density={options.density}: expected a value in (0, 1]")
    if options.majority_sign_method not in ("total", "frequency"):
        raise RecipeError(f"majority_sign_method={options.majority_sign_method!r}: expected 'total' or 'frequency'")
    if options.svd_rank is not None and (not isinstance(options.svd_rank, int) or options.svd_rank < 1):
        raise RecipeError(f"svd_rank={options.svd_rank!r}: expected a positive integer")
    if options.svd_clamp is not None and not 0 < options.svd_clamp <= 1:
        raise RecipeError(f"svd_clamp={options.svd_clamp}: expected a quantile in (0, 1]")


# -- task-vector rules, with PEFT's semantics (merge_utils) ----------------------------------------------------
def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` and divide the survivors by it (DARE)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    stacked = torch.stack(list(tensors))
    scale = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return (stacked * scale).sum(dim=0)


def sign_consensus(tensors: Sequence[torch.Tensor], weights: Sequence[float], method: str) -> torch.Tensor:
    """TIES' elect-and-average: the sign with the larger unweighted total (or count) wins each entry; the
    weighted entries that agree with it are averaged."""
    stacked = torch.stack(list(tensors))
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = signs == majority
    scale = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    total = (stacked * scale * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def apply_rule(rule: str, tensors: Sequence[torch.Tensor], weights: Sequence[float], options: CombineOptions,
               generator: torch.Generator) -> torch.Tensor:
    """Combine same-shaped float32 tensors with one of the task-vector rules."""
    density = options.density if options.density is not None else 1.0
    if rule == "linear":
        return weighted_sum(tensors, weights)
    if rule == "magnitude_prune":
        return weighted_sum([magnitude_prune(t, density) for t in tensors], weights)
    if rule == "dare_linear":
        return weighted_sum([random_prune(t, density, generator) for t in tensors], weights)
    if rule == "ties":
        return sign_consensus([magnitude_prune(t, density) for t in tensors], weights, options.majority_sign_method)
    if rule == "dare_ties":
        return sign_consensus([random_prune(t, density, generator) for t in tensors], weights,
                              options.majority_sign_method)
    raise RecipeError(f"combination rule {rule!r} is unknown")


# -- one module ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One adapter's contribution to a module: its matrices, its scaling and the user's weight."""

    lora: LoraWeights
    scaling: float
    weight: float


def combine_cat(parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([p.lora.A.float() * (p.weight * p.scaling) for p in parts], dim=0)
    b = torch.cat([p.lora.B.float() for p in parts], dim=1)
    return a, b


def combine_factors(module: str, parts: Sequence[Part], options: CombineOptions,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {p.lora.rank for p in parts}
    if len(ranks) > 1:
        raise IncompatibleModels(f"module '{module}': combination_type={options.combination_type!r} needs equal "
                                 f"ranks, the adapters have {sorted(ranks)} (use cat or an *_svd type)")
    # the sign goes on A only, so B_i A_i keeps the sign of w_i s_i
    products = [p.weight * p.scaling for p in parts]
    weights_a = [math.copysign(math.sqrt(abs(x)), 1.0 if x >= 0 else -1.0) for x in products]
    weights_b = [math.sqrt(abs(x)) for x in products]
    a = apply_rule(options.rule, [p.lora.A.float() for p in parts], weights_a, options, generator)
    b = apply_rule(options.rule, [p.lora.B.float() for p in parts], weights_b, options, generator)
    return a, b


def truncated_factors(delta: torch.Tensor, rank: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, in) and B (out, k) with B@A the best rank-k approximation of `delta` (singular values in B);
    with `clamp`, both factors are clipped to ± that quantile of their pooled entries."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


def combine_svd(parts: Sequence[Part], rank: int, options: CombineOptions,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [p.lora.product() * p.scaling for p in parts]
    combined = apply_rule(options.rule, deltas, [p.weight for p in parts], options, generator)
    return truncated_factors(combined, rank, options.svd_clamp)


def combine_module(module: str, parts: Sequence[Part], options: CombineOptions,
                   svd_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined (A, B) of one module, in LoRA's orientation, for scaling 1."""
    generator = torch.Generator().manual_seed(derived_seed(options.seed, module))
    kind = options.combination_type
    if kind == "cat":
        return combine_cat(parts)
    if kind in FACTOR_TYPES:
        return combine_factors(module, parts, options, generator)
    return combine_svd(parts, svd_rank, options, generator)


# -- whole adapters --------------------------------------------------------------------------------------------
def _check_compatible(adapters: Sequence[Adapter]) -> None:
    """Adapters that target the same module must agree on its shape and layout."""
    seen: dict[str, tuple[Adapter, LoraWeights]] = {}
    for adapter in adapters:
        for name, lora in adapter.modules.items():
            if name not in seen:
                seen[name] = (adapter, lora)
                continue
            first, other = seen[name]
            if (other.weight_shape, other.kind, other.transposed) != (lora.weight_shape, lora.kind, lora.transposed):
                raise IncompatibleModels(
                    f"tensor '{name}': adapter '{first.path}' gives a {other.kind} delta of shape "
                    f"{list(other.weight_shape)}, adapter '{adapter.path}' a {lora.kind} delta of shape "
                    f"{list(lora.weight_shape)}: they were trained on different models")
    bases = {a.config.base_model_name_or_path for a in adapters}
    if len(bases) > 1:
        warnings.warn(f"the adapters name different base models: {sorted(map(str, bases))}", stacklevel=3)


def _output_config(adapters: Sequence[Adapter], ranks: dict[str, int]) -> dict:
    """The first adapter's config with scaling 1 everywhere and the exact module list as targets."""
    r, rank_pattern = rank_layout(ranks)
    config = dict(adapters[0].config.raw)
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        config.pop(key, None)  # the target list below is exact: nothing else may narrow or widen it
    config.update(
        r=r, lora_alpha=r, rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern), use_rslora=False,
        target_modules=sorted(ranks, key=natural_key),
        # modules PEFT injects but the file does not fill start at zero, never at random
        init_lora_weights=True, inference_mode=True,
        fan_in_fan_out=any(a.config.fan_in_fan_out for a in adapters),
    )
    return config


def _as_adapter(source: str | Path | Adapter, allow_pickle: bool) -> Adapter:
    return source if isinstance(source, Adapter) else read_adapter(source, allow_pickle=allow_pickle)


def combine_adapters(  # noqa: PLR0913  (PEFT's add_weighted_adapter's parameters, by the same names)
        adapters: Sequence[str | Path | Adapter], weights: Sequence[float], combination_type: str,
                     out_dir: str | Path, *, density: float | None = None, svd_rank: int | None = None,
                     svd_clamp: float | None = None, majority_sign_method: str = "total", seed: int = 0,
                     allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Combine PEFT LoRA adapters into a new PEFT adapter folder at `out_dir` (see the module docstring for
    the types). A module targeted by only some adapters is combined from those. Returns the folder.

    As in PEFT, a single adapter is always combined `linear` (exactly weight · its delta), and the SVD types
    keep `svd_rank` (default: the largest rank among the inputs) singular directions per module.
    """
    options = CombineOptions(combination_type, density, svd_rank, svd_clamp, majority_sign_method, seed)
    validate_options(options)
    check_output(Path(out_dir), overwrite)  # fail before the work, not after
    if not adapters:
        raise RecipeError("adapters: need at least one adapter")
    if len(weights) != len(adapters):
        raise RecipeError(f"weights: {len(weights)} given for {len(adapters)} adapters")
    loaded = [_as_adapter(a, allow_pickle) for a in adapters]
    _check_compatible(loaded)
    if len(loaded) == 1:
        options = CombineOptions("linear", None, None, None, majority_sign_method, seed)
    target_rank = svd_rank or max(lora.rank for a in loaded for lora in a.modules.values())
    names = sorted({name for a in loaded for name in a.modules}, key=natural_key)
    dtype = _common_dtype(loaded)
    combined: dict[str, LoraWeights] = {}
    for name in names:
        parts = [Part(a.modules[name], a.scaling(name), float(w)) for a, w in zip(loaded, weights)
                 if name in a.modules]
        template = parts[0].lora
        a_matrix, b_matrix = combine_module(template.module, parts, options, target_rank)
        combined[name] = LoraWeights(template.module, a_matrix.to(dtype), b_matrix.to(dtype), kind=template.kind,
                                     transposed=template.transposed)
    config = _output_config(loaded, {lora.module: lora.rank for lora in combined.values()})
    with staged(Path(out_dir), overwrite) as staging:
        write_adapter_files(staging, config, combined, _full_weights(loaded))
    return Path(out_dir).absolute()


def _full_weights(adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """Whole tensors the adapters carry (saved embeddings) pass through, if every adapter carrying one agrees."""
    full: dict[str, tuple[Adapter, torch.Tensor]] = {}
    for adapter in adapters:
        for name, tensor in adapter.full_weights.items():
            if name in full and not torch.equal(full[name][1], tensor):
                raise IncompatibleModels(f"tensor '{name}': adapters '{full[name][0].path}' and '{adapter.path}' "
                                         "carry different full copies of it, which cannot be combined")
            full.setdefault(name, (adapter, tensor))
    return {name: tensor for name, (_, tensor) in full.items()}


def _common_dtype(adapters: Sequence[Adapter]) -> torch.dtype:
    dtypes = {lora.A.dtype for a in adapters for lora in a.modules.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
