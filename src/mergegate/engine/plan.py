"""Planning: recipe → the list of tensor jobs, with every parameter resolved, before any tensor is read."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._seeds import derived_seed
from ..compat import check_compatible
from ..errors import CheckpointError, IncompatibleModels, RecipeError
from ..io.dtypes import torch_dtype
from ..io.hashing import all_files_hash, cache_folder
from ..io.read import Checkpoint, contained_file
from ..io.write import OutputTensor, natural_key
from ..methods import MergeMethod, ParamSpec
from ..methods._registry import CHUNK_ELEMENTS as DEFAULT_CHUNK
from ..methods._registry import row_spans
from ..model_ref import ModelRef
from ..recipe import Recipe, evaluate, input_models, load_recipe
from ..vocab import VocabularyPlan, plan_vocabulary, tensor_has_vocabulary

CHUNK_ELEMENTS = DEFAULT_CHUNK  # elementwise methods work on row chunks of about this many elements
_LAYER = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Source:
    """One input tensor: which model, and the tensor's name there (it differs from the output's under slices)."""

    model: str
    tensor: str


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: which inputs it reads and with which resolved parameters."""

    name: str
    output: OutputTensor
    t: float  # relative depth used by gradient parameters (mergekit's convention)
    shared: Any
    per_model: tuple[Any, ...]
    seed: int
    base: Source | None = None  # the base model's tensor, when the method uses one
    inputs: tuple[Source, ...] = ()  # the other inputs, aligned with per_model
    passthrough: bool = False  # non-float tensors are copied from the first input
    rows: tuple[int, int] | None = None  # a chunk of the first dimension, for elementwise methods
    vocabulary: bool = False  # rows are tokens: realigned to the output vocabulary before merging

    @property
    def sources(self) -> tuple[Source, ...]:
        return ((self.base,) if self.base else ()) + self.inputs

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
    config_updates: dict[str, Any] = field(default_factory=dict)  # written over the reference's config.json
    vocabulary: VocabularyPlan | None = None  # set when vocabularies are merged or a chat template chosen
    statistics: dict[str, Checkpoint] = field(default_factory=dict)  # model reference → calibration statistics

    @property
    def total_bytes(self) -> int:
        return sum(job.out_bytes for job in self.jobs)

    @property
    def outputs(self) -> list[OutputTensor]:
        return list({job.name: job.output for job in self.jobs}.values())


def resolve_model_path(ref: str, recipe_folder: Path | None, *, allow_pickle: bool = False) -> Path:
    """The local folder a recipe's model reference names (read by ModelRef: relative to the working directory,
    as mergekit, else to the recipe). `model+adapter` (mergekit's spelling) is the model with a PEFT LoRA adapter
    folded in, built once into the cache and reused while neither input changes.
    """
    model = ModelRef.parse(ref, name=ref).resolve(recipe_folder)  # a recipe names a model by its reference
    if model.path is None:
        raise RecipeError(f"model '{ref}': a recipe merges local folders, not a server's url")
    if model.adapter is not None:
        return folded_adapter(model.path, model.adapter, allow_pickle=allow_pickle)
    return model.path


def folded_adapter(model: Path, adapter: Path, *, allow_pickle: bool = False) -> Path:
    """`model` with `adapter` merged into its weights, cached by the content of both."""
    from ..lora import merge_adapter

    for folder, what in ((model, "model"), (adapter, "adapter")):
        if not folder.is_dir():
            raise CheckpointError(f"{what} '{folder}': no such folder (model+adapter needs two local folders)")
    target = cache_folder() / "folded-adapters" / all_files_hash(model, adapter)[:24]
    if not (target / "config.json").is_file():
        merge_adapter(model, adapter, target, allow_pickle=allow_pickle, overwrite=True)
    return target


def plan_merge(recipe: Recipe | str | Path | dict, *, allow_pickle: bool = False, seed: int = 0,
               check_lineage: bool = True) -> MergePlan:
    """Open every model, check they are compatible, and resolve every tensor's parameters."""
    recipe = load_recipe(recipe)
    method = recipe.method
    checkpoints = {}
    for ref in recipe.model_refs():
        path = resolve_model_path(ref, recipe.folder, allow_pickle=allow_pickle)
        checkpoints[ref] = Checkpoint(path, allow_pickle=allow_pickle)
    if recipe.slices:
        first = recipe.slices[0]
        base = (first.base_model or recipe.base_model) if method.base != "ignored" else None
        others = [s.model for s in first.sources if s.model != base]
        reference = base or first.sources[0].model
    elif method.base == "ignored":  # base_model, when set, is an input like the others (as in mergekit)
        base, others = None, input_models([entry.model for entry in recipe.models or []], recipe.base_model)
        reference = recipe.base_model or others[0]
        checkpoints = {ref: ck for ref, ck in checkpoints.items() if ref in others or ref == reference}
    else:  # base required, or optional and perhaps absent (nuslerp, multislerp)
        base = recipe.base_model
        others = [entry.model for entry in recipe.models or [] if entry.model != base]
        reference = base or others[0]
    chosen = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    tokenizer_source = reference if chosen is None or chosen in ("base", "union") else chosen
    _check_copied_files(checkpoints[reference], checkpoints[tokenizer_source])
    vocabulary = plan_vocabulary(recipe, checkpoints, base, reference)
    check_compatible(checkpoints, reference, check_lineage=check_lineage, same_depth=not recipe.slices,
                     same_vocabulary=vocabulary is None or vocabulary.identity)

    load_dtype = torch_dtype(recipe.dtype) if recipe.dtype else None
    compute_dtype = torch.float64 if load_dtype == torch.float64 else torch.float32
    plan = MergePlan(recipe, method, checkpoints, base, others, reference, tokenizer_source,
                     compute_dtype, load_dtype, torch_dtype(recipe.out_dtype or recipe.dtype or "float32"), seed,
                     vocabulary=vocabulary)
    rows = vocabulary.rows if vocabulary is not None and not vocabulary.identity else None
    realign = rows is not None
    if realign:
        plan.config_updates["vocab_size"] = rows
    explicit_out = recipe.out_dtype or recipe.dtype
    layout = _slice_layout(recipe, plan) if recipe.slices else _model_layout(recipe, plan)
    for name, base_source, inputs, scopes, t in layout:
        first = inputs[0] if inputs else base_source
        tensor_ref = _input_tensor(plan, first)
        by_token = realign and tensor_has_vocabulary(plan.checkpoints[first.model], first.tensor)
        for source in ([base_source] if base_source else []) + list(inputs):
            _check_source(plan, source, name, tensor_ref.shape, by_token)
        shape = (rows, *tensor_ref.shape[1:]) if rows is not None and by_token else tensor_ref.shape
        is_float = tensor_ref.dtype.is_floating_point
        out_dtype = torch_dtype(explicit_out) if (explicit_out and is_float) else tensor_ref.dtype
        shared = _resolve(method.shared, method.shared_params, scopes.shared, name, t, "parameters")
        # a model's parameters see its own tensor's name (filters match `layers.1.` of a source slice placed at
        # output layer 2, as mergekit), shared ones the output's
        per_model = tuple(
            _resolve(method.per_model, method.per_model_params, model_scopes, source.tensor, t,
                     f"model '{source.model}'")
            for source, model_scopes in zip(inputs, scopes.per_model)
        )
        job = TensorJob(name, OutputTensor(name, out_dtype, shape), t, shared, per_model,
                        derived_seed(seed, name), base=base_source, inputs=tuple(inputs), passthrough=not is_float,
                        vocabulary=by_token)
        # realigned rows need whole tensors (defaults average rows of other models; padding takes the mean)
        plan.jobs.extend(_chunks(job) if method.elementwise and is_float and not by_token else [job])
    if not plan.jobs:
        raise CheckpointError(f"model '{reference}' has no tensors")
    if explicit_out is None:
        plan.out_dtype = next((j.output.dtype for j in plan.jobs if not j.passthrough), torch.float32)
    if method.statistics:
        plan.statistics = _calibration_statistics(plan)
    return plan


def _check_copied_files(reference: Checkpoint, tokenizer_source: Checkpoint) -> None:
    """Refuse now, before any tensor is read, side files that would be copied into the output but are links
    leaving their model folder (or not regular files); a vocabulary merge also checks the folders it loads."""
    generation = reference.path / "generation_config.json"
    if os.path.lexists(generation):
        contained_file(generation, reference.path)
    tokenizer_source.tokenizer_files()


def _calibration_statistics(plan: MergePlan) -> dict[str, Checkpoint]:
    """Data-aware methods: every input model's calibration statistics, computed now or found in the cache."""
    from ..calibration import plan_statistics

    kind = plan.method.statistics
    if kind is None:
        return {}
    models = dict.fromkeys(source.model for job in plan.jobs for source in job.inputs)
    return plan_statistics(plan.recipe, kind, {ref: plan.checkpoints[ref] for ref in models}, method=plan.method.name)


@dataclass(frozen=True)
class _Scopes:
    """Where a tensor's parameters are looked up, innermost first (mergekit's order)."""

    shared: list
    per_model: list[list]


def _model_layout(recipe: Recipe, plan: MergePlan):
    """Every tensor of the reference, read under the same name from every model."""
    ref_ck = plan.checkpoints[plan.reference]
    num_layers = ref_ck.num_layers()
    entries = {entry.model: entry for entry in recipe.models or []}
    scopes = _Scopes([recipe.parameters],
                     [[(entries[ref].parameters if ref in entries else None), recipe.parameters] for ref in plan.others])
    for name in sorted(ref_ck.tensors, key=natural_key):
        base = Source(plan.base, name) if plan.base else None
        yield name, base, [Source(ref, name) for ref in plan.others], scopes, _relative_depth(name, num_layers)


def _slice_layout(recipe: Recipe, plan: MergePlan):
    """Output layers stacked slice after slice, each layer merged from its sources' layers (depth up-scaling).

    Tensors outside the blocks come from the first slice's sources when they sit before the blocks
    (embeddings) and from the last slice's sources otherwise (final norm, lm_head), as mergekit does; `t`
    for gradients runs over each slice's own layers.
    """
    method = plan.method
    slices = recipe.slices or []
    ref_ck = plan.checkpoints[plan.reference]
    layer_names = [n for n in ref_ck.tensors if _LAYER.search(n)]
    templates = sorted({_layer_template(n) for n in layer_names}, key=natural_key)
    outside = sorted((n for n in ref_ck.tensors if not _LAYER.search(n)), key=natural_key)

    def slice_roles(piece):
        base = (piece.base_model or recipe.base_model) if method.base != "ignored" else None
        inputs = [s for s in piece.sources if s.model != base]
        base_source = next((s for s in piece.sources if s.model == base), None)
        if base and base_source is None:
            raise RecipeError(f"slices: base_model '{base}' must be one of the slice's sources for {method.name}")
        scopes = _Scopes([piece.parameters, recipe.parameters],
                         [[s.parameters, piece.parameters, recipe.parameters] for s in inputs])
        return base_source, inputs, scopes

    def whole_tensor(piece, name):
        base_source, inputs, scopes = slice_roles(piece)
        base = Source(base_source.model, name) if base_source else None
        return name, base, [Source(s.model, name) for s in inputs], scopes, 0.0

    pre = [n for n in outside if _is_embedding_name(n)]
    for name in pre:
        yield whole_tensor(slices[0], name)
    out_layer = 0
    for piece in slices:
        count = piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0]  # equal spans: checked by the recipe
        base_source, inputs, scopes = slice_roles(piece)
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0
            for template in templates:
                name = template.format(layer=out_layer)
                pick = lambda s, template=template, offset=offset: Source(  # noqa: E731
                    s.model, template.format(layer=s.layer_range[0] + offset))
                yield (name, pick(base_source) if base_source else None, [pick(s) for s in inputs], scopes, t)
            out_layer += 1
    for name in outside:
        if name not in pre:
            yield whole_tensor(slices[-1], name)
    plan.config_updates["num_hidden_layers"] = out_layer
    if isinstance(ref_ck.config.get("layer_types"), list):  # per-layer attention kinds follow their layers
        kinds = []
        for piece in slices:
            source = piece.sources[0]
            own = plan.checkpoints[source.model].config.get("layer_types")
            start, stop = source.layer_range
            if not isinstance(own, list) or len(own) < stop:
                raise IncompatibleModels(f"model '{source.model}': config.json's layer_types does not list layers "
                                         f"{start} to {stop - 1} (needed for the slice's attention kinds)")
            kinds += own[start:stop]
        plan.config_updates["layer_types"] = kinds


def _layer_template(name: str) -> str:
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"'{name}' is not a layer tensor")
    return name[:match.start(1)] + "{layer}" + name[match.end(1):]


def _is_embedding_name(name: str) -> bool:
    return any(key in name for key in ("embed", "wte", "wpe", "word_embeddings", "position_embeddings"))


def _input_tensor(plan: MergePlan, source: Source):
    ck = plan.checkpoints[source.model]
    if source.tensor not in ck.tensors:
        raise IncompatibleModels(f"model '{source.model}' has no tensor '{source.tensor}' ({ck.path})")
    return ck.tensors[source.tensor]


def _check_source(plan: MergePlan, source: Source, output: str, shape: tuple[int, ...], by_token: bool) -> None:
    found = _input_tensor(plan, source).shape
    if by_token:  # one row per token of its own vocabulary; the rest of the shape must agree
        if not tensor_has_vocabulary(plan.checkpoints[source.model], source.tensor) or found[1:] != shape[1:]:
            raise IncompatibleModels(f"tensor '{source.tensor}' of model '{source.model}' has shape {list(found)}: "
                                     f"expected one row per token of its vocabulary × {list(shape[1:])}")
        return
    if found != shape:
        raise IncompatibleModels(f"tensor '{source.tensor}' of model '{source.model}' has shape {list(found)}, "
                                 f"but '{output}' needs {list(shape)}")


def _chunks(job: TensorJob) -> list[TensorJob]:
    spans = row_spans(job.output.shape, CHUNK_ELEMENTS)
    if len(spans) == 1:
        return [job]
    return [dataclasses.replace(job, rows=span) for span in spans]


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
    try:
        return cls(**values)
    except (RecipeError, ValueError) as exc:  # a method's cross-parameter check (e.g. della's window)
        raise RecipeError(f"{where} (tensor '{tensor}'): {exc}") from None
