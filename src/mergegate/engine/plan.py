"""Planning: recipe → the list of tensor jobs, with every parameter resolved, before any tensor is read."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, OutputTensor, natural_key
from ..compat import check_compatible
from ..errors import CheckpointError, RecipeError
from ..methods import MergeMethod, ParamSpec
from ..recipe import Recipe, evaluate, load_recipe

CHUNK_ELEMENTS = 1 << 22  # elementwise methods work on row chunks of about this many elements
_LAYER = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: which inputs it reads and with which resolved parameters."""

    name: str
    output: OutputTensor
    t: float  # relative depth used by gradient parameters (mergekit's convention)
    shared: Any
    per_model: tuple[Any, ...]
    seed: int
    passthrough: bool = False  # non-float tensors are copied from the reference model
    rows: tuple[int, int] | None = None  # a chunk of the first dimension, for elementwise methods

    @property
    def numel(self) -> int:
        total = self.output.nbytes // self.output.dtype.itemsize
        if self.rows is None:
            return total
        return total // self.output.shape[0] * (self.rows[1] - self.rows[0])

    @property
    def work_bytes(self) -> int:
        """A generous estimate of the memory this job needs: float32 copies of inputs, deltas, result."""
        return self.numel * 4 * (2 * (len(self.per_model) + 1) + 3)

    @property
    def out_bytes(self) -> int:
        return self.numel * self.output.dtype.itemsize


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: dict[str, Checkpoint]  # model reference → opened folder
    base: str | None  # base model reference when the method uses it
    others: list[str]  # the other inputs, recipe order
    reference: str  # the model whose config, tensor names and tokenizer are the template
    tokenizer_source: str
    compute_dtype: torch.dtype
    load_dtype: torch.dtype | None
    out_dtype: torch.dtype
    seed: int
    jobs: list[TensorJob] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(job.out_bytes for job in self.jobs)

    @property
    def outputs(self) -> list[OutputTensor]:
        return list({job.name: job.output for job in self.jobs}.values())


def resolve_model_path(ref: str, recipe_folder: Path | None) -> Path:
    """A model reference is a local folder: relative to the working directory (as mergekit), else to the recipe."""
    if "+" in ref and not Path(ref).exists():
        raise RecipeError(f"model '{ref}': LoRA adapters (model+adapter) are not supported by this version")
    path = Path(os.path.expanduser(ref))
    if path.is_dir() or path.is_absolute() or recipe_folder is None:
        return path
    beside_recipe = recipe_folder / path
    return beside_recipe if beside_recipe.is_dir() else path


def plan_merge(recipe: Recipe | str | Path | dict, *, allow_pickle: bool = False, seed: int = 0,
               check_lineage: bool = True) -> MergePlan:
    """Open every model, check they are compatible, and resolve every tensor's parameters."""
    recipe = load_recipe(recipe)
    method = recipe.method
    checkpoints = {}
    for ref in recipe.model_refs():
        path = resolve_model_path(ref, recipe.folder)
        checkpoints[ref] = Checkpoint(path, allow_pickle=allow_pickle)
    if method.base == "ignored":
        base, others = None, [entry.model for entry in recipe.models]
        reference = recipe.base_model or others[0]
        checkpoints = {ref: ck for ref, ck in checkpoints.items() if ref in others or ref == reference}
    else:
        base = reference = recipe.base_model
        others = [entry.model for entry in recipe.models if entry.model != base]
    check_compatible(checkpoints, reference, check_lineage=check_lineage)

    tokenizer_source = reference if recipe.tokenizer_source in (None, "base") else recipe.tokenizer_source
    load_dtype = _DTYPES[recipe.dtype] if recipe.dtype else None
    compute_dtype = torch.float64 if load_dtype == torch.float64 else torch.float32
    ref_ck = checkpoints[reference]
    plan = MergePlan(recipe, method, checkpoints, base, others, reference, tokenizer_source,
                     compute_dtype, load_dtype, _DTYPES[recipe.out_dtype or recipe.dtype or "float32"], seed)
    explicit_out = recipe.out_dtype or recipe.dtype
    num_layers = ref_ck.num_layers()
    entries = {entry.model: entry for entry in recipe.models}
    for name in sorted(ref_ck.tensors, key=natural_key):
        tensor_ref = ref_ck.tensors[name]
        is_float = tensor_ref.dtype.is_floating_point
        out_dtype = _DTYPES[explicit_out] if (explicit_out and is_float) else tensor_ref.dtype
        t = _relative_depth(name, num_layers)
        shared = _resolve(method.shared, method.shared_params, [recipe.parameters], name, t, "parameters")
        per_model = tuple(
            _resolve(method.per_model, method.per_model_params,
                     [(entries[ref].parameters if ref in entries else None), recipe.parameters],
                     name, t, f"model '{ref}'")
            for ref in others
        )
        job = TensorJob(name, OutputTensor(name, out_dtype, tensor_ref.shape), t, shared, per_model,
                        _tensor_seed(seed, name), passthrough=not is_float)
        plan.jobs.extend(_chunks(job) if method.elementwise and is_float else [job])
    if not plan.jobs:
        raise CheckpointError(f"model '{reference}' has no tensors")
    if explicit_out is None:
        plan.out_dtype = next((j.output.dtype for j in plan.jobs if not j.passthrough), torch.float32)
    return plan


def _chunks(job: TensorJob) -> list[TensorJob]:
    shape = job.output.shape
    if len(shape) < 1 or job.numel <= CHUNK_ELEMENTS or shape[0] < 2:
        return [job]
    per_row = job.numel // shape[0]
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    return [dataclasses.replace(job, rows=(start, min(start + step, shape[0]))) for start in range(0, shape[0], step)]


def _relative_depth(name: str, num_layers: int | None) -> float:
    """t = layer / (layers - 1) inside the blocks, 0 outside them, 1 for a single layer (as mergekit)."""
    match = _LAYER.search(name)
    if not match:
        return 0.0
    if not num_layers or num_layers <= 1:
        return 1.0
    return int(match.group(1)) / (num_layers - 1)


def _resolve(cls: type, specs: tuple[ParamSpec, ...], sources: list, tensor: str, t: float, where: str):
    values = {}
    for spec in specs:
        value = None
        for scope in sources:
            if scope and spec.name in scope:
                value = evaluate(scope[spec.name], spec, tensor, t, f"{where}, parameter {spec.name}")
                if value is not None:
                    break
        if value is None:
            if spec.required:
                raise RecipeError(f"{where}: missing required parameter '{spec.name}' (for tensor '{tensor}')")
            value = spec.default
        values[spec.field] = value
    return cls(**values)


def _tensor_seed(seed: int, name: str) -> int:
    """Random methods draw from a generator seeded per tensor, so bytes never depend on scheduling."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
