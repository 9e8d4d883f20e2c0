"""The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA) is one algorithm.

delta_i = model_i - base, optionally sparsified, weighted; optionally only entries agreeing with the
elected sign of the weighted sum are kept (`>= 0` counts as +); summed; divided by the sum of the
(kept) weights when `normalize`; scaled by `lambda`; added back to the base.

Everything after the sparsifier's choice is elementwise. So a large tensor is done in two passes: each
delta is formed whole once to choose its entries (a boolean mask and a rescale factor — top-k and L1 norms
need the whole tensor), then freed; the rest runs over row chunks, recomputing each delta chunk. Peak memory
is one float32 delta plus a byte per element per model, instead of every delta at once — with the same
bytes out, since every step is the same elementwise arithmetic in the same order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ._parallel import parallel_map
from ._registry import CHUNK_ELEMENTS, row_spans  # noqa: F401  (CHUNK_ELEMENTS: read at call time, patchable)
from ._sparsify import KEEP_ALL, Selection

Sparsifier = Callable[[torch.Tensor, object, bool, "torch.Generator | None"], Selection]


def combine(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    per_model: Sequence[Any],
    shared: Any,
    rng: torch.Generator | None,
    *,
    sparsify: Sparsifier | None = None,
    sign_consensus: bool = False,
) -> torch.Tensor:
    if not tensors:
        return base.clone()
    weights = [params.weight for params in per_model]
    spans = row_spans(base.shape, CHUNK_ELEMENTS)
    if len(spans) == 1:
        deltas = []
        for tensor, params in zip(tensors, per_model):
            delta = torch.sub(tensor, base)  # a stored bf16 input promotes to the base's float32 here, uncopied
            if sparsify is not None:
                delta = sparsify(delta, params, shared.rescale, rng).apply(delta)
            deltas.append(delta)
        return _merge_rows(base, deltas, weights, shared, sign_consensus)

    selections = []
    for tensor, params in zip(tensors, per_model):  # pass 1: choose entries on the whole delta, in model order
        # one model at a time, not in parallel: each holds a float32 delta of the whole tensor (peak memory)
        if sparsify is None:
            selections.append(KEEP_ALL)
            continue
        delta = torch.sub(tensor, base)
        selections.append(sparsify(delta, params, shared.rescale, rng))
        del delta
    out = torch.empty_like(base)

    def merge_span(rows: tuple[int, int]) -> None:  # pass 2: everything elementwise, span by span
        chunk_base = base[rows[0]:rows[1]]
        deltas = [selection.apply(torch.sub(tensor[rows[0]:rows[1]], chunk_base), rows)
                  for tensor, selection in zip(tensors, selections)]
        out[rows[0]:rows[1]] = _merge_rows(chunk_base, deltas, weights, shared, sign_consensus)

    parallel_map(merge_span, spans)
    return out


def _merge_rows(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], shared: Any,
                sign_consensus: bool) -> torch.Tensor:
    """Weight, elect signs, sum, normalize, scale and add back — all elementwise; consumes `deltas`."""
    weighted = [delta.mul_(weight) for delta, weight in zip(deltas, weights)]  # each delta is ours: in place
    divisor: torch.Tensor | float
    if sign_consensus:
        elected = torch.where(_sum(weighted) >= 0, 1.0, -1.0)  # `>= 0` counts as +
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for delta, weight in zip(weighted, weights):
            # sign(0) matches neither side, so zeroed entries count in neither sum nor divisor; the product
            # with ±1 is exact, one pass fewer than comparing with both signs
            agrees = delta.mul(elected) > 0
            divisor.add_(agrees, alpha=weight)
            mixed.add_(delta.masked_fill_(~agrees, 0))  # the delta is ours and used up: mask it in place
        divisor[divisor == 0] = 1
    else:
        mixed = _sum(weighted)
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0

    if shared.normalize:
        mixed = mixed / divisor
    if shared.lambda_ != 1:
        mixed = mixed * shared.lambda_
    return base + mixed


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum in order without stacking (same accumulation order as a sum over a stacked first dim)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total
