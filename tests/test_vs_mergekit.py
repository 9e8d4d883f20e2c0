"""Every method mergegate shares with mergekit, run through both on the same tiny checkpoints.

One recipe dict per case goes to mergekit 0.1.5 (in-process, CPU) and to `mergegate.merge`; the two outputs
must hold the same tensor names, shapes and dtypes, and values within the case's tolerance. `pytest -s`
prints one line per case with the measured max |diff| and the tensor where it occurs.

Tolerances: 0 where both compute the same operations in the same order (most methods, measured exact);
1e-6 absolute (a few float32 ulps on weights below ~1.1) where the arithmetic differs: slerp and
multislerp formulas, or mergekit rounding interpolated gradient weights to float32. bf16 outputs of a
float32 computation: 1 bf16 ulp. Inputs computed in bf16 by mergekit (the task-vector family with bf16
inputs or `dtype: bfloat16`; mergegate computes in float32 and rounds once): 4 bf16 ulps of the largest
operand, since each of mergekit's rounding steps (delta, weight, product, sum, divisor, mean) is relative to
the operands, not the result, which can be far smaller where base and delta cancel.

Two kinds of element are set aside for TIES and breadcrumbs, and counted in the printed line: entries whose
|delta| equals the magnitude cut of the sparsifier (which of the tied entries survive is arbitrary; mergekit
takes torch.argsort's unstable order, mergegate a fixed index order), and entries whose sign election sums to
within rounding of 0 in the compute dtype. Random methods at density < 1 draw from different generators, so
those are compared by statistics (kept shares and mean shifts) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

pytest.importorskip("mergekit")

import mergegate  # noqa: E402
from mergegate.demo.samples import SampleShape, write_family  # noqa: E402

from .mergekit_peer import (  # noqa: E402
    SPARSIFIER_CUTS,
    ambiguous_elements,
    compare,
    distance,
    operand_scale,
    read_config,
    read_tensors,
    run_mergekit,
)

# every test merges twice (mergekit and mergegate): a whole-module cost of ~15-20 s, run by `make test`
pytestmark = pytest.mark.slow

Family = dict[str, Path]


@pytest.fixture(scope="session")
def f32_family(tmp_path_factory) -> Family:
    """float32 tiny Llama, 4 layers so that gradients over depth interpolate between their anchors."""
    return write_family(tmp_path_factory.mktemp("mk_f32"), finetunes=3, shape=SampleShape(layers=4))


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory) -> Family:
    """The same architecture stored in bfloat16 (2 layers)."""
    return write_family(tmp_path_factory.mktemp("mk_bf16"), finetunes=3, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------- recipes


def entries(fam: Family, *specs: tuple[str, dict] | str) -> list[dict]:
    """`models:` entries; a spec is a model name or (name, parameters)."""
    out = []
    for spec in specs:
        name, params = (spec, None) if isinstance(spec, str) else spec
        out.append({"model": str(fam[name]), **({"parameters": params} if params else {})})
    return out


def recipe(method: str, fam: Family, *specs, base: bool = True, **extra) -> dict:
    """A `models:` recipe; keyword arguments become top-level keys (`parameters`, `dtype`, `out_dtype`)."""
    out = {"merge_method": method, "models": entries(fam, *specs)}
    if base:
        out["base_model"] = str(fam["base"])
    out.update(extra)
    return out


def layer_slice(fam: Family, name: str, start: int, stop: int, params: dict | None = None) -> dict:
    return {"model": str(fam[name]), "layer_range": [start, stop], **({"parameters": params} if params else {})}


BF16_COMPUTE = ("mergekit computes deltas, weights, sums and the mean in bf16, rounding each step; mergegate computes "
                "in float32 and rounds once, so results differ by a few bf16 ulps of the operands (more than of the "
                "result where base and delta cancel)")
W = lambda weight, **more: {"weight": weight, **more}  # noqa: E731
ATTN_THEN_REST = lambda attn, rest: [{"filter": "self_attn", "value": attn}, {"value": rest}]  # noqa: E731


@dataclass(frozen=True)
class Case:
    """One recipe run through both tools. Each element must agree within `atol`, or, when `ulps` is set,
    within that many units in the last place of the output dtype (for bf16 outputs). For methods with a
    magnitude cut (TIES, breadcrumbs) elements beyond that may only sit where an input's |delta| ties the
    cut or the sign election is within rounding of 0 (see `mergekit_peer.ambiguous_elements`)."""

    id: str
    build: Callable[[Family], dict]
    family: str = "f32"
    atol: float = 0.0
    ulps: float | None = None
    of_operands: bool = False  # count ulps at the largest input magnitude (for computations in bf16)
    why: str = ""


CASES = [
    # --- linear: mergekit and mergegate both accumulate weight * tensor in float32, in input order
    Case("linear-normalize", lambda f: recipe("linear", f, ("ft1", W(1.0)), ("ft2", W(2.0)), ("ft3", W(0.5)),
                                              base=False)),
    Case("linear-no-normalize", lambda f: recipe("linear", f, ("ft1", W(0.2)), ("ft2", W(0.3)), ("ft3", W(0.1)),
                                                 base=False, parameters={"normalize": False}), atol=0.0),
    Case("linear-weight-gradient", lambda f: recipe(
        "linear", f, ("ft1", W([1.0, 0.0])), ("ft2", W(ATTN_THEN_REST(0.25, [0.5, 1.0, 2.0]))), base=False),
        atol=1e-6, why="mergekit rounds interpolated weights (2/3, 1/3) to float32 coefficients first"),
    # --- task arithmetic family
    Case("task_arithmetic-lambda", lambda f: recipe(
        "task_arithmetic", f, ("ft1", W(0.5)), ("ft2", W(0.3)), ("ft3", W(0.2)), parameters={"lambda": 0.8}),
        atol=0.0),
    Case("task_arithmetic-normalize", lambda f: recipe(
        "task_arithmetic", f, ("ft1", W(0.5)), ("ft2", W(0.3)), ("ft3", W(0.7)),
        parameters={"lambda": 1.3, "normalize": True}), atol=0.0),
    Case("ties-densities", lambda f: recipe(
        "ties", f, ("ft1", W(1.0, density=0.5)), ("ft2", W(0.7, density=0.3)), ("ft3", W(0.4, density=0.7))),
        atol=0.0),
    Case("ties-density-gradient", lambda f: recipe(
        "ties", f, ("ft1", W(1.0)), ("ft2", W(0.6)), ("ft3", W([0.2, 0.9])),
        parameters={"density": [0.2, 0.9, 0.5]}), atol=0.0),
    Case("ties-density-filter", lambda f: recipe(
        "ties", f, ("ft1", W(1.0, density=ATTN_THEN_REST(0.3, 0.7))), ("ft2", W(1.0, density=ATTN_THEN_REST(0.3, 0.7))),
        ("ft3", W(0.5, density=0.9))), atol=0.0),
    Case("ties-rescale-lambda", lambda f: recipe(
        "ties", f, ("ft1", W(0.6, density=0.4)), ("ft2", W(0.4, density=0.6)),
        parameters={"normalize": False, "rescale": True, "lambda": 0.5}), atol=0.0),
    Case("breadcrumbs", lambda f: recipe(
        "breadcrumbs", f, ("ft1", W(0.6, density=0.8, gamma=0.05)), ("ft2", W(0.4, density=0.7)),
        ("ft3", W(0.3, density=0.9, gamma=0.1))), atol=0.0),
    Case("breadcrumbs_ties", lambda f: recipe(
        "breadcrumbs_ties", f, ("ft1", W(1.0, density=0.7, gamma=0.02)), ("ft2", W(0.5, density=0.6)),
        ("ft3", W(0.8, density=0.8, gamma=0.05)), parameters={"normalize": True}), atol=0.0),
    # --- random sparsifiers at density 1: the deterministic path (no drop, so rescaling changes nothing)
    Case("dare_linear-density1", lambda f: recipe(
        "dare_linear", f, ("ft1", W(0.5, density=1.0)), ("ft2", W(0.3, density=1.0)), ("ft3", W(0.2, density=1.0))),
        atol=0.0),
    Case("dare_ties-density1", lambda f: recipe(
        "dare_ties", f, ("ft1", W(1.0, density=1.0)), ("ft2", W(0.5, density=1.0)), ("ft3", W(0.8, density=1.0))),
        atol=0.0),
    Case("della-density1", lambda f: recipe(
        "della", f, ("ft1", W(1.0, density=1.0, epsilon=0.1)), ("ft2", W(0.5, density=1.0)),
        ("ft3", W(0.8, density=1.0))), atol=0.0),
    Case("della_linear-density1", lambda f: recipe(
        "della_linear", f, ("ft1", W(0.5, density=1.0)), ("ft2", W(0.3, density=1.0)), ("ft3", W(0.2, density=1.0)),
        parameters={"lambda": 0.9}), atol=0.0),
    # --- interpolations
    Case("slerp-t-gradient", lambda f: recipe("slerp", f, "base", "ft1", parameters={"t": [0.0, 0.3, 0.8, 1.0]}),
         atol=1e-6, why="float32 vs float64 coefficients"),
    Case("slerp-t-filters", lambda f: recipe("slerp", f, "base", "ft2", parameters={"t": [
        {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]}), atol=1e-6),
    Case("nuslerp-no-base", lambda f: recipe("nuslerp", f, ("ft1", W(1.0)), ("ft2", W(3.0)), base=False), atol=0.0),
    Case("nuslerp-base-flatten", lambda f: recipe("nuslerp", f, ("ft1", W(0.4)), ("ft2", W(0.6))), atol=0.0),
    Case("nuslerp-base-row-wise", lambda f: recipe(
        "nuslerp", f, ("ft1", W(0.4)), ("ft2", W(0.6)),
        parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}), atol=0.0),
    Case("nuslerp-no-base-column-wise", lambda f: recipe(
        "nuslerp", f, ("ft1", W(2.0)), ("ft3", W(1.0)), base=False,
        parameters={"nuslerp_flatten": False, "nuslerp_row_wise": False}), atol=0.0),
    Case("multislerp-no-base", lambda f: recipe(
        "multislerp", f, ("ft1", W(1.0)), ("ft2", W(2.0)), ("ft3", W(1.0)), base=False), atol=1e-6),
    Case("multislerp-base", lambda f: recipe(
        "multislerp", f, ("ft1", W(0.5)), ("ft2", W(0.3)), ("ft3", W(0.2))), atol=1e-6),
    Case("karcher", lambda f: recipe("karcher", f, "ft1", "ft2", "ft3", base=False), atol=1e-6,
         why="iterated float32 norms: the last bits follow the reduction order, which follows the thread count"),
    Case("karcher-iterations", lambda f: recipe(
        "karcher", f, "base", "ft1", base=False, parameters={"max_iter": 3, "tol": 1e-7}), atol=1e-6,
         why="iterated float32 norms: the last bits follow the reduction order, which follows the thread count"),
    # --- other base-relative methods
    Case("sce-topk1", lambda f: recipe("sce", f, "ft1", "ft2", "ft3"), atol=0.0),
    Case("sce-topk0.5", lambda f: recipe("sce", f, "ft1", "ft2", "ft3", parameters={"select_topk": 0.5}),
         atol=0.0),
    Case("model_stock", lambda f: recipe("model_stock", f, "ft1", "ft2", "ft3"), atol=0.0),
    Case("model_stock-filter-wise", lambda f: recipe(
        "model_stock", f, "ft1", "ft2", "ft3", parameters={"filter_wise": True}), atol=0.0),
    Case("nearswap", lambda f: recipe("nearswap", f, "ft1", parameters={"t": 0.0005}), atol=0.0),
    Case("arcee_fusion", lambda f: recipe("arcee_fusion", f, "ft1"), atol=0.0),
    Case("passthrough", lambda f: recipe("passthrough", f, "ft2", base=False), atol=0.0),
    Case("passthrough-scale-filter", lambda f: recipe(
        "passthrough", f, ("ft2", {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.5},
                                             {"value": 1.0}]}), base=False), atol=0.0),
    # --- slices (depth up-scaling, per-slice gradients): t restarts at 0 in each output slice
    Case("slices-passthrough-dus", lambda f: {"merge_method": "passthrough", "slices": [
        {"sources": [layer_slice(f, "ft1", 0, 3)]},
        {"sources": [layer_slice(f, "ft2", 1, 4, {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]})]},
    ]}, atol=0.0),
    Case("slices-slerp", lambda f: {"merge_method": "slerp", "base_model": str(f["base"]), "slices": [
        {"sources": [layer_slice(f, "base", 0, 4), layer_slice(f, "ft1", 0, 4)]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}, atol=1e-6),
    Case("slices-linear-two-slices", lambda f: {"merge_method": "linear", "slices": [
        {"sources": [layer_slice(f, "ft1", 0, 2, {"weight": [1.0, 0.0]}),
                     layer_slice(f, "ft2", 0, 2, {"weight": 1.0})]},
        {"sources": [layer_slice(f, "ft1", 2, 4, {"weight": 0.5}),
                     layer_slice(f, "ft3", 2, 4, {"weight": [0.0, 1.0]})]},
    ]}, atol=0.0),
    # a source's filters match its own tensor names: `layers.1.` is ft2's layer 1, placed at output layer 2, and
    # `layers.3.` names no ft2 layer of [1, 3) (only the output's layer 3)
    Case("slices-filter-source-names", lambda f: {"merge_method": "passthrough", "slices": [
        {"sources": [layer_slice(f, "ft1", 0, 2)]},
        {"sources": [layer_slice(f, "ft2", 1, 3, {"scale": [{"filter": "layers.1.", "value": 0.0},
                                                            {"filter": "layers.3.", "value": 0.5}, {"value": 1.0}]})]},
    ]}, atol=0.0),
    Case("slices-linear-filter-source-names", lambda f: {"merge_method": "linear", "slices": [
        {"sources": [layer_slice(f, "ft1", 0, 2, {"weight": [{"filter": "layers.1.", "value": 0.0}, {"value": 1.0}]}),
                     layer_slice(f, "ft3", 2, 4, {"weight": [{"filter": "layers.2.", "value": 0.0},
                                                             {"value": 1.0}]})]},
    ]}, atol=0.0),
    # --- base_model not listed under models: mergekit makes it an input of every method, linear and karcher too
    Case("linear-unlisted-base", lambda f: recipe("linear", f, ("ft1", W(1.0)), ("ft2", W(2.0)),
                                                  parameters={"weight": 0.5}), atol=0.0),
    Case("linear-unlisted-base-filtered-weight", lambda f: recipe(
        "linear", f, ("ft1", W(1.0)), ("ft2", W(2.0)), parameters={"weight": ATTN_THEN_REST(0.0, 3.0)}), atol=0.0),
    Case("karcher-unlisted-base", lambda f: recipe("karcher", f, "ft1", "ft2"), atol=1e-6,
         why="iterated float32 norms: the last bits follow the reduction order, which follows the thread count"),
    # --- dtypes. f32 inputs rounded to bf16 on load: linear computes in float32 in both, so exact.
    Case("linear-dtype-bf16", lambda f: recipe("linear", f, ("ft1", W(1.0)), ("ft2", W(2.0)), ("ft3", W(0.5)),
                                               base=False, dtype="bfloat16"), atol=0.0),
    Case("linear-out_dtype-bf16", lambda f: recipe("linear", f, ("ft1", W(1.0)), ("ft2", W(2.0)), ("ft3", W(0.5)),
                                                   base=False, out_dtype="bfloat16"), ulps=1.0),
    Case("ties-out_dtype-bf16", lambda f: recipe(
        "ties", f, ("ft1", W(1.0, density=0.5)), ("ft2", W(0.7, density=0.3)), ("ft3", W(0.4, density=0.7)),
        out_dtype="bfloat16"), ulps=1.0, why="float32 results a few ulp apart may round to neighbouring bf16"),
    Case("ties-dtype-bf16", lambda f: recipe(
        "ties", f, ("ft1", W(1.0, density=0.5)), ("ft2", W(0.7, density=0.3)), ("ft3", W(0.4, density=0.7)),
        dtype="bfloat16"), ulps=4.0, of_operands=True, why=BF16_COMPUTE),
    Case("linear-bf16-inputs", lambda f: recipe("linear", f, ("ft1", W(1.0)), ("ft2", W(2.0)), ("ft3", W(0.5)),
                                                base=False), family="bf16", atol=0.0),
    Case("task_arithmetic-bf16-inputs", lambda f: recipe(
        "task_arithmetic", f, ("ft1", W(0.5)), ("ft2", W(0.3)), ("ft3", W(0.2)), parameters={"lambda": 0.8}),
        family="bf16", ulps=4.0, of_operands=True, why=BF16_COMPUTE),
    Case("ties-bf16-inputs", lambda f: recipe(
        "ties", f, ("ft1", W(1.0, density=0.5)), ("ft2", W(0.7, density=0.3)), ("ft3", W(0.4, density=0.7))),
        family="bf16", ulps=4.0, of_operands=True, why=BF16_COMPUTE),
    Case("ties-bf16-inputs-dtype-f32", lambda f: recipe(
        "ties", f, ("ft1", W(1.0, density=0.5)), ("ft2", W(0.7, density=0.3)), ("ft3", W(0.4, density=0.7)),
        dtype="float32"), family="bf16", atol=0.0),
]


def both(recipe_dict: dict, tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """Merge with mergekit, then with mergegate; return the two output folders."""
    theirs = run_mergekit(recipe_dict, tmp_path / "mergekit", seed=seed)
    ours = tmp_path / "mergegate"
    mergegate.merge(recipe_dict, ours, progress=False, seed=seed)
    return theirs, ours


MAX_SET_ASIDE = 0.05  # measured: ≤ 0.01% on float32 inputs, 1-4% on bf16 inputs, whose small deltas tie often


def mergekit_dtype(recipe_dict: dict, family: str) -> torch.dtype:
    """The dtype mergekit computes the task-vector family in: the recipe's `dtype`, else the inputs'."""
    named = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if "dtype" in recipe_dict:
        return named[recipe_dict["dtype"]]
    return torch.bfloat16 if family == "bf16" else torch.float32


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_output_matches_mergekit(case: Case, request, tmp_path):
    fam = request.getfixturevalue(f"{case.family}_family")
    recipe_dict = case.build(fam)
    theirs_dir, ours_dir = both(recipe_dict, tmp_path)
    theirs, ours = read_tensors(theirs_dir), read_tensors(ours_dir)
    agreement = compare(theirs, ours)
    assert agreement.structure_ok, f"{case.id}: {agreement.summary()}"

    names = sorted(theirs)
    scale = operand_scale(recipe_dict, names) if case.of_operands else {}
    unit = "ulp" if case.ulps is not None else ""
    bound = case.ulps if case.ulps is not None else case.atol
    dist = {n: distance(theirs[n], ours[n], theirs[n].dtype if unit else None, scale.get(n)) for n in names}
    beyond = [n for n in names if bool((dist[n] > bound).any())]
    note = ""
    if beyond and recipe_dict["merge_method"] in SPARSIFIER_CUTS:
        ambiguous = ambiguous_elements(recipe_dict, beyond, mergekit_dtype(recipe_dict, case.family))
        excused = sum(int(((dist[n] > bound) & ambiguous[n]).sum()) for n in beyond)
        note = f"; {excused} element(s) at a tied magnitude cut or sign election set aside"
        total = sum(t.numel() for t in theirs.values())
        assert excused <= MAX_SET_ASIDE * total, f"{case.id}: {excused} of {total} elements set aside{note}"
        for n in beyond:
            dist[n] = dist[n].masked_fill(ambiguous[n], 0)
    worst = max(names, key=lambda n: float(dist[n].max()))
    figure = float(dist[worst].max())
    if unit:
        note += f"; max {figure:.3g} ulp{' of the operands' if case.of_operands else ''} ({worst})"
    elif note:
        note += f"; then max |diff| {figure:.3g} ({worst})"
    print(f"\n[vs mergekit] {case.id}: {agreement.summary()}{note}")
    assert figure <= bound, (
        f"{case.id}: {figure:.3g}{unit} apart at {worst} (tolerance {bound:g}{unit}); {agreement.summary()}{note}. "
        f"{case.why}")
    if "slices" in recipe_dict:
        assert read_config(ours_dir)["num_hidden_layers"] == read_config(theirs_dir)["num_hidden_layers"]


@pytest.mark.parametrize("method, theirs_ft2, ours_ft2", [
    ("linear", W(2.0), W(0.6)),
    ("ties", W(2.0, density=0.5), W(2.0, density=0.45)),
])
def test_harness_flags_a_wrong_parameter(method, theirs_ft2, ours_ft2, f32_family, tmp_path):
    """Negative control: recipes differing in one weight or one density must not pass as agreement, even after
    the tie and sign-election allowances."""
    ft1 = ("ft1", W(1.0, density=0.5) if method == "ties" else W(1.0))
    theirs_recipe = recipe(method, f32_family, ft1, ("ft2", theirs_ft2), base=method == "ties")
    ours_recipe = recipe(method, f32_family, ft1, ("ft2", ours_ft2), base=method == "ties")
    theirs = read_tensors(run_mergekit(theirs_recipe, tmp_path / "mergekit"))
    mergegate.merge(ours_recipe, tmp_path / "mergegate", progress=False)
    ours = read_tensors(tmp_path / "mergegate")
    names = sorted(theirs)
    ambiguous = ambiguous_elements(theirs_recipe, names, torch.float32) if method == "ties" else {}
    left = max(float(distance(theirs[n], ours[n]).masked_fill(ambiguous[n], 0).max() if ambiguous
                     else distance(theirs[n], ours[n]).max()) for n in names)
    assert left > 1e-5, f"{method}: a changed parameter left only {left:.3g} of difference"


# ---------------------------------------------------------------------------------------------- random drops
# mergekit draws DARE/DELLA masks from torch's global generator, mergegate from per-tensor seeded ones, so at
# density < 1 the two outputs differ element by element; the distributions must not. Over the ~176k weights
# of the 4-layer family the standard error of a kept fraction is about 0.0012: tolerances are ~8 of those.
FRACTION_TOL = 0.01


def changed_fraction(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """Share of all elements that moved away from the base."""
    moved = sum(int((out[n] != base[n]).sum()) for n in base)
    return moved / sum(t.numel() for t in base.values())


def mean_shift(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """Mean |out - base| over all elements."""
    total = sum(float((out[n].double() - base[n].double()).abs().sum()) for n in base)
    return total / sum(t.numel() for t in base.values())


def row_rank_halves(delta: torch.Tensor) -> torch.Tensor:
    """True where |delta| ranks in the upper half of its row (dim 1; a 1-D tensor is one row), DELLA's ranking."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1)
    return (ranks >= rows.shape[1] / 2).reshape(delta.shape)


@pytest.fixture(scope="session")
def f32_inputs(f32_family) -> dict[str, dict[str, torch.Tensor]]:
    return {name: read_tensors(folder) for name, folder in f32_family.items()}


def both_outputs(recipe_dict: dict, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    theirs, ours = both(recipe_dict, tmp_path)
    return {"mergekit": read_tensors(theirs), "mergegate": read_tensors(ours)}


def test_dare_linear_keeps_density_share_and_restores_l1(f32_family, f32_inputs, tmp_path):
    """One model at density 0.3: 30% of entries move; with rescale (the default) each tensor's delta keeps its L1."""
    base, ft = f32_inputs["base"], f32_inputs["ft1"]
    for rescale in (False, True):
        outputs = both_outputs(recipe("dare_linear", f32_family, ("ft1", W(1.0, density=0.3)),
                                      parameters={"rescale": rescale}), tmp_path / str(rescale))
        for tool, out in outputs.items():
            share = changed_fraction(out, base)
            print(f"\n[vs mergekit] dare_linear density 0.3 rescale={rescale} {tool}: {share:.4f} of entries moved")
            assert abs(share - 0.3) < FRACTION_TOL, f"{tool}: {share:.4f} of entries moved, expected 0.3"
            if rescale:
                ratios = {n: float((out[n] - base[n]).abs().sum() / (ft[n] - base[n]).abs().sum()) for n in base}
                worst = max(ratios, key=lambda n: abs(ratios[n] - 1))
                assert abs(ratios[worst] - 1) < 1e-3, (
                    f"{tool}: L1 of {worst}'s delta is {ratios[worst]:.5f}× the original's")


def test_della_linear_keeps_large_magnitudes_more_often(f32_family, f32_inputs, tmp_path):
    """density 0.5, epsilon 0.2: keep probability runs 0.3 → 0.7 with rank in the row, so the upper half of each
    row keeps 0.6 on average and the lower half 0.4."""
    outputs = both_outputs(recipe("della_linear", f32_family, ("ft1", W(1.0, density=0.5, epsilon=0.2)),
                                  parameters={"rescale": False}), tmp_path)
    base, ft = f32_inputs["base"], f32_inputs["ft1"]
    upper = {n: row_rank_halves(ft[n] - base[n]) for n in base}
    for tool, out in outputs.items():
        kept = {n: out[n] != base[n] for n in base}
        high = sum(int((kept[n] & upper[n]).sum()) for n in base) / sum(int(upper[n].sum()) for n in base)
        low = sum(int((kept[n] & ~upper[n]).sum()) for n in base) / sum(int((~upper[n]).sum()) for n in base)
        print(f"\n[vs mergekit] della_linear density 0.5 epsilon 0.2 {tool}: kept {high:.4f} of upper halves, "
              f"{low:.4f} of lower halves")
        assert abs(high - 0.6) < FRACTION_TOL and abs(low - 0.4) < FRACTION_TOL, (
            f"{tool}: kept {high:.4f} of row-upper halves (expected 0.6), {low:.4f} of lower (expected 0.4)")


@pytest.mark.parametrize("method, density, epsilon, expected", [
    ("dare_ties", 0.5, None, 0.875),  # an entry moves unless all three drop it: 1 - 0.5³
    ("della", 0.6, 0.1, 0.936),  # 1 - 0.4³
])
def test_random_ties_methods_move_the_same_share_by_the_same_amount(f32_family, f32_inputs, tmp_path, method,
                                                                   density, epsilon, expected):
    """Three models: the share of entries that move, and by how much on average, as mergekit's."""
    extra = {} if epsilon is None else {"epsilon": epsilon}
    outputs = both_outputs(recipe(method, f32_family, ("ft1", W(1.0, density=density, **extra)),
                                  ("ft2", W(0.5, density=density, **extra)), ("ft3", W(0.8, density=density, **extra))),
                           tmp_path)
    base = f32_inputs["base"]
    shares = {tool: changed_fraction(out, base) for tool, out in outputs.items()}
    shifts = {tool: mean_shift(out, base) for tool, out in outputs.items()}
    print(f"\n[vs mergekit] {method} density {density}: moved {shares}, mean |shift| {shifts}")
    for tool, share in shares.items():
        assert abs(share - expected) < FRACTION_TOL, f"{tool}: {share:.4f} of entries moved, expected {expected}"
    assert abs(shifts["mergegate"] / shifts["mergekit"] - 1) < 0.02, f"mean |out - base|: {shifts}"


def test_unlisted_base_without_a_weight_is_refused_by_both(f32_family, tmp_path):
    """linear with base_model set but not listed: the base is an input, and it has no weight. mergekit fails
    planning the first tensor; mergegate refuses the recipe, naming the base and the parameter."""
    recipe_dict = recipe("linear", f32_family, ("ft1", W(1.0)), ("ft2", W(2.0)))
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        run_mergekit(recipe_dict, tmp_path / "mergekit")
    with pytest.raises(mergegate.RecipeError, match=r"models: base_model '.*base' is not listed, so it is merged as "
                                                    r"one more input \(as mergekit does\) and needs parameter 'weight'"):
        mergegate.merge(recipe_dict, tmp_path / "mergegate", progress=False)
    assert not (tmp_path / "mergegate").exists()


def test_unlisted_base_of_passthrough_is_refused_by_both(f32_family, tmp_path):
    recipe_dict = recipe("passthrough", f32_family, "ft1")
    with pytest.raises(ValueError, match="requires exactly 1 inputs .*got 2"):
        run_mergekit(recipe_dict, tmp_path / "mergekit")
    with pytest.raises(mergegate.RecipeError, match=r"passthrough takes exactly 1 models, got 2: .*base_model '.*base' "
                                                    r"is one of them"):
        mergegate.merge(recipe_dict, tmp_path / "mergegate", progress=False)
