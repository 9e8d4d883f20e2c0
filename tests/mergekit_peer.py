"""Run a recipe through mergekit in-process and measure how far mergegate's output is from it.

Used by tests/test_vs_mergekit.py. mergekit is the peer implementation: same recipe dict, same
checkpoints, and every output tensor compared by name, shape, dtype and value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

_MANTISSA_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}


def run_mergekit(recipe: dict, out: Path, seed: int | None = 0) -> Path:
    """Merge `recipe` with mergekit into `out`: CPU, eager loading, no tokenizer copy, no model card."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, lazy_unpickle=False,
                           quiet=True, random_seed=seed)
    # mergegate merges with one intra-op thread; reductions (norms, sums) then run in the same order on both
    # sides, so exact agreement does not depend on how many threads the test process happens to use.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_merge(config, str(out), options=options)
    finally:
        torch.set_num_threads(threads)
    return Path(out)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in `folder`, by name."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    if not tensors:
        raise FileNotFoundError(f"{folder}: no safetensors output")
    return tensors


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at each value's magnitude (float64; subnormals ignored)."""
    _, exponent = torch.frexp(values.double())  # values = m * 2**exponent with 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - _MANTISSA_BITS[dtype])


@dataclass(frozen=True)
class TensorDiff:
    name: str
    max_abs: float
    max_ulps: float  # the largest difference in units of the last place (of the larger of the two values)
    off_by_more_than_one_ulp: float  # fraction of elements further apart than one ulp


@dataclass(frozen=True)
class Agreement:
    """How mergegate's output compares with mergekit's, tensor by tensor."""

    only_mergekit: tuple[str, ...]
    only_mergegate: tuple[str, ...]
    mismatched: tuple[str, ...]  # "name: shape/dtype there vs here"
    diffs: tuple[TensorDiff, ...]

    @property
    def structure_ok(self) -> bool:
        return not (self.only_mergekit or self.only_mergegate or self.mismatched)

    @property
    def worst(self) -> TensorDiff:
        return max(self.diffs, key=lambda d: (d.max_abs, d.name))

    @property
    def worst_ulps(self) -> TensorDiff:
        return max(self.diffs, key=lambda d: (d.max_ulps, d.name))

    @property
    def worst_fraction(self) -> TensorDiff:
        return max(self.diffs, key=lambda d: (d.off_by_more_than_one_ulp, d.name))

    def summary(self) -> str:
        if not self.structure_ok:
            return (f"structure differs: only in mergekit {list(self.only_mergekit)[:5]}, only in mergegate "
                    f"{list(self.only_mergegate)[:5]}, mismatched {list(self.mismatched)[:5]}")
        worst, ulps = self.worst, self.worst_ulps
        return (f"{len(self.diffs)} tensors, max |diff| {worst.max_abs:.3g} ({worst.name}), "
                f"max {ulps.max_ulps:.3g} ulp ({ulps.name}), "
                f">1 ulp in {self.worst_fraction.off_by_more_than_one_ulp:.2%} of {self.worst_fraction.name}")


def compare(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> Agreement:
    """Compare mergegate's tensors (`candidate`) with mergekit's (`reference`)."""
    only_ref = tuple(sorted(set(reference) - set(candidate)))
    only_cand = tuple(sorted(set(candidate) - set(reference)))
    mismatched, diffs = [], []
    for name in sorted(set(reference) & set(candidate)):
        ref, cand = reference[name], candidate[name]
        if ref.shape != cand.shape or ref.dtype != cand.dtype:
            mismatched.append(f"{name}: {tuple(ref.shape)} {ref.dtype} vs {tuple(cand.shape)} {cand.dtype}")
            continue
        diffs.append(tensor_diff(name, ref, cand))
    return Agreement(only_ref, only_cand, tuple(mismatched), tuple(diffs))


def tensor_diff(name: str, ref: torch.Tensor, cand: torch.Tensor) -> TensorDiff:
    if not ref.dtype.is_floating_point:
        differ = float((ref != cand).sum())
        return TensorDiff(name, differ, differ, differ / max(1, ref.numel()))
    diff = (ref.double() - cand.double()).abs()
    if ref.numel() == 0:
        return TensorDiff(name, 0.0, 0.0, 0.0)
    scale = torch.maximum(ref.double().abs(), cand.double().abs()).clamp_min(torch.finfo(ref.dtype).tiny)
    in_ulps = diff / ulp(scale, ref.dtype)
    return TensorDiff(name, float(diff.max()), float(in_ulps.max()), float((in_ulps > 1).double().mean()))


def distance(ref: torch.Tensor, cand: torch.Tensor, ulps_of: torch.dtype | None = None,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise |ref - cand| (float64); with `ulps_of`, counted in units in the last place of that dtype at
    the larger of the two values, or of `scale` when given (e.g. the largest operand of a bf16 computation)."""
    diff = (ref.double() - cand.double()).abs()
    if ulps_of is None:
        return diff
    magnitude = torch.maximum(ref.double().abs(), cand.double().abs())
    if scale is not None:
        magnitude = torch.maximum(magnitude, scale.double())
    return diff / ulp(magnitude.clamp_min(torch.finfo(ulps_of).tiny), ulps_of)


def planned_inputs(recipe: dict, names: list[str]):
    """For each output tensor in `names`: (base, inputs, per-model parameters) as mergegate's plan reads them,
    rounded to the recipe's `dtype` like both tools do on load. Yields (name, base or None, inputs, params)."""
    import mergegate

    plan = mergegate.plan_merge(recipe)
    jobs = {job.name: job for job in plan.jobs if job.rows is None or job.rows[0] == 0}
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(source) -> torch.Tensor:
        folder = str(plan.checkpoints[source.model].path)
        if folder not in cache:
            cache[folder] = read_tensors(Path(folder))
        value = cache[folder][source.tensor]
        return value.to(plan.load_dtype) if plan.load_dtype is not None else value

    for name in names:
        job = jobs[name]
        base = load(job.base) if job.base is not None else None
        yield name, base, [load(source) for source in job.inputs], job.per_model, plan.method.name


def operand_scale(recipe: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """Per tensor, the elementwise largest |value| among the merge's inputs."""
    out = {}
    for name, base, inputs, _, _ in planned_inputs(recipe, names):
        values = ([base] if base is not None else []) + inputs
        out[name] = torch.stack([v.float().abs() for v in values]).amax(0)
    return out


# Magnitude sparsifiers whose cut depends on an ordering of |delta|: with equal magnitudes at the cut, which
# of the tied entries survive is an implementation choice (mergekit: torch.argsort's unstable order).
SPARSIFIER_CUTS = {"ties": "top", "breadcrumbs": "window", "breadcrumbs_ties": "window"}
SIGN_ELECTION = {"ties", "breadcrumbs_ties"}
# How close to 0 a sign election's weighted sum must be, relative to the sum of magnitudes, before rounding
# in the compute dtype can flip it (mergekit also rounds the weights themselves to that dtype: 2**-9 for bf16).
ELECTION_MARGIN = {torch.bfloat16: 2.0**-6, torch.float32: 2.0**-20}


def cut_values(magnitudes: torch.Tensor, kind: str, density: float, gamma: float = 0.0) -> list[float]:
    """The magnitudes at the edges of what a sparsifier keeps (empty when it keeps everything or nothing)."""
    n = magnitudes.numel()
    if density >= 1 or n == 0:
        return []
    ascending = torch.sort(magnitudes.reshape(-1).double()).values
    if kind == "top":
        if density <= 0:
            return []
        k = max(1, int(density * n))
        return [float(ascending[n - k])]
    target, n_top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - n_top)
    return [] if target == 0 else [float(ascending[bottom]), float(ascending[bottom + target - 1])]


def ambiguous_elements(recipe: dict, names: list[str], mergekit_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per tensor, the elements where two correct implementations may legitimately disagree by more than
    rounding: some input's |delta| equals a cut value of its sparsifier (which tied entry survives is
    arbitrary), or, for sign election, the weighted sum of the kept deltas is within rounding of 0.

    Deltas are taken both as mergegate computes them (float32 from the loaded values) and as mergekit does
    (in `mergekit_dtype`, the recipe's dtype or the inputs' own); parameters come from mergegate's plan.
    """
    out = {}
    for name, base, inputs, per_model, method in planned_inputs(recipe, names):
        kind = SPARSIFIER_CUTS[method]
        ambiguous = torch.zeros(base.shape, dtype=torch.bool)
        signed_sum = torch.zeros(base.shape, dtype=torch.float64)
        magnitude_sum = torch.zeros(base.shape, dtype=torch.float64)
        for other, params in zip(inputs, per_model):
            exact = other.double() - base.double()
            for dtype in {torch.float32, mergekit_dtype}:
                magnitudes = (other.to(dtype) - base.to(dtype)).abs().float()
                for value in cut_values(magnitudes, kind, params.density, getattr(params, "gamma", 0.0)):
                    ambiguous |= magnitudes == value
            kept = exact * _kept(exact.abs(), kind, params.density, getattr(params, "gamma", 0.0))
            signed_sum += params.weight * kept
            magnitude_sum += abs(params.weight) * kept.abs()
        if method in SIGN_ELECTION:
            ambiguous |= signed_sum.abs() < ELECTION_MARGIN[mergekit_dtype] * magnitude_sum  # never where all dropped
        out[name] = ambiguous
    return out


def _kept(magnitudes: torch.Tensor, kind: str, density: float, gamma: float) -> torch.Tensor:
    """The sparsifier's keep mask from a full sort (ties in index order; they are flagged separately)."""
    n = magnitudes.numel()
    if density >= 1:
        return torch.ones_like(magnitudes)
    order = torch.argsort(magnitudes.reshape(-1), stable=True)
    if kind == "top":
        k = max(1, int(density * n)) if density > 0 else 0
        chosen = order[n - k:] if k else order[:0]
    else:
        target, n_top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - n_top)
        chosen = order[bottom:bottom + target]
    mask = torch.zeros(n, dtype=magnitudes.dtype)
    mask[chosen] = 1
    return mask.reshape(magnitudes.shape)
