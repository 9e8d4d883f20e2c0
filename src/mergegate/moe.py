"""A mixture of experts from dense experts: `mergegate moe CONFIG.yaml OUT` (mergekit-moe's config keys).

From a Llama base and N fine-tunes of the same architecture, writes a Mixtral checkpoint (`MixtralForCausalLM`):
attention, norms and embeddings from the base; fine-tune i's MLP as expert i of every layer (gate_proj → w1,
down_proj → w2, up_proj → w3, Mixtral's checkpoint names, which transformers 4 and 5, vLLM and llama.cpp read);
and one router row per expert per layer (`block_sparse_moe.gate.weight`), initialised as mergekit-moe does:

- `hidden`: per layer, the base model's hidden state entering that layer at each positive prompt's last token,
  averaged over the prompts, minus the same over the negative prompts, normalised (mergekit's `hidden`);
- `hidden_avg`: the same with each prompt's hidden states averaged over its tokens;
- `router_input` (mergegate's, not mergekit's): per layer, the mean over every token of the positive prompts of
  what the router itself will see — the normalised hidden state entering the MLP, after attention — minus the
  same over the negatives, normalised. A router routes every token, not a prompt's last one: on the demo this
  sends more of each expert's held-out prompt tokens to it than `hidden` does (docs/moe.md has the figures);
- `cheap_embed`: the normalised sum of the prompts' token embeddings (minus the negatives'), the same every layer;
- `random` / `uniform_random`: N(0, 1), or U(±1/√hidden) as nn.Linear initialises, from `seed` (mergekit uses
  torch's global generator: its random routers differ run to run, these are reproducible).

Prompts are encoded as mergekit encodes them: the tokenizer's BOS text, then the prompt, without other
special tokens. Hidden states are computed in float32 (mergekit loads the base in bfloat16).

The router is only an initialisation: a router's logits are `weight @ x` for the normalised hidden state `x`
entering each MLP, so a token goes to the experts whose prompts looked most like it. It is not trained.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._staging import check_output, staged
from ._yaml import load_yaml_model, validate
from .engine.options import MergeOptions, resolve_options
from .engine.plan import resolve_model_path
from .engine.provenance import Build, hash_checkpoints, write_record
from .errors import CheckpointError, IncompatibleModels, MoEConfigError
from .io.dtypes import MODEL_DTYPE_NAMES, ModelDTypeName, declared_dtype, torch_dtype
from .io.read import Checkpoint
from .io.write import OutputTensor, ShardedWriter, copy_model_files, parse_size
from .progress import Advance, Progress

GateMode = Literal["hidden", "hidden_avg", "router_input", "cheap_embed", "random", "uniform_random"]
PROMPT_MODES = ("hidden", "hidden_avg", "router_input", "cheap_embed")
BASE_TYPES = ("llama",)
MLP_TO_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's names for the Llama MLP
# Llama config keys that Mixtral does not read; refused when they ask for something Mixtral cannot do
LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")


class MoEExpert(BaseModel):
    """One expert: a model whose MLPs become expert i, and the prompts its router row is built from."""

    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None


class MoEConfig(BaseModel):
    """mergekit-moe's config keys (`base_model`, `experts`, `gate_mode`, `dtype`, `experts_per_token`), plus
    `seed` for the random gate modes. mergekit's `shared_experts`, `architecture` other than mixtral, and the
    experts' `noise_scale` / `residual_scale` are refused."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[MoEExpert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: Optional[ModelDTypeName] = None
    experts_per_token: int = Field(2, ge=1)
    seed: int = 0
    architecture: Optional[Literal["mixtral"]] = None

    @model_validator(mode="after")
    def _consistent(self) -> MoEConfig:
        if self.experts_per_token > len(self.experts):
            raise ValueError(f"experts_per_token {self.experts_per_token} is more than the {len(self.experts)} "
                             f"expert(s)")
        if self.gate_mode in PROMPT_MODES:
            for index, expert in enumerate(self.experts):
                if not expert.positive_prompts or not any(p.strip() for p in expert.positive_prompts):
                    raise ValueError(f"experts.{index} ({expert.source_model}): gate_mode {self.gate_mode} needs "
                                     f"positive_prompts (non-empty text), got none")
                if any(not isinstance(p, str) or not p for p in expert.negative_prompts or []):
                    raise ValueError(f"experts.{index} ({expert.source_model}): an empty negative prompt")
            first = self.experts[0]
            if len(self.experts) > 1 and all((e.positive_prompts, e.negative_prompts)
                                             == (first.positive_prompts, first.negative_prompts)
                                             for e in self.experts[1:]):
                raise ValueError("every expert has the same prompts: the router could not tell them apart")
        return self


def load_moe_config(config: MoEConfig | dict | str | Path) -> tuple[MoEConfig, Path | None]:
    """The config, and the folder relative model paths are also looked for in (the YAML file's)."""
    if isinstance(config, MoEConfig):
        return config, None
    if isinstance(config, dict):
        return validate(MoEConfig, config, "moe config", MoEConfigError), None
    path = Path(config)
    return (load_yaml_model(path, MoEConfig, where=str(path), what="moe config fields (base_model, experts, ...)",
                            error_cls=MoEConfigError), path.parent)


@dataclass(frozen=True)
class MoEResult:
    out_dir: Path
    router: torch.Tensor  # (layers, experts, hidden), float32, as computed (before the output dtype)
    parameters: int  # total parameters of the written model
    active_parameters: int  # parameters one token passes through (experts_per_token experts per layer)
    seconds: float
    provenance: dict


def build_moe(config: MoEConfig | dict | str | Path, out_dir: str | Path, options: MergeOptions | None = None,
              **overrides) -> MoEResult:
    """Write the mixture of experts a config describes into `out_dir` (nothing appears unless it succeeds).

    `options` (default: MergeOptions()) with `overrides` (MergeOptions field names, e.g. `overwrite=True`), as
    `merge` takes them. Of the options, the MoE reads overwrite, shard_size, allow_pickle, progress, device (where
    the base runs to build a router from prompts) and seed (of the random routers, when the config sets no
    `seed`); the worker count, memory budget and lineage check are a merge's own.

    Raises MergeOptionsError for a refused option, MoEConfigError for a malformed config, IncompatibleModels for
    a base that is not a Llama or an expert whose architecture or tensor shapes differ from the base's,
    CheckpointError for a folder that cannot be read.
    """
    options = resolve_options(options, overrides)
    started = time.perf_counter()
    config, folder = load_moe_config(config)
    if "seed" not in config.model_fields_set:
        config = config.model_copy(update={"seed": options.seed})
    out_dir = check_output(Path(out_dir), options.overwrite)
    refs = [config.base_model] + [e.source_model for e in config.experts]
    checkpoints = {ref: Checkpoint(resolve_model_path(ref, folder, allow_pickle=options.allow_pickle),
                                   allow_pickle=options.allow_pickle) for ref in dict.fromkeys(refs)}
    base = checkpoints[config.base_model]
    layers = _check_models(config, checkpoints)
    out_dtype = torch_dtype(config.dtype) if config.dtype else _config_dtype(base)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend, and one fixes the reductions' order
    try:
        router = router_weights(config, base, torch.device(options.device))
    finally:
        torch.set_num_threads(threads_before)
    outputs = _output_tensors(config, base, layers, out_dtype)
    with staged(out_dir, overwrite=options.overwrite) as staging:
        writer = ShardedWriter(staging, outputs, parse_size(options.shard_size))
        try:
            with Progress(options.progress) as bar:
                advance = bar.task(f"writing a Mixtral of {len(config.experts)} experts", len(outputs),
                                   unit="tensors")
                _write_tensors(config, checkpoints, layers, router, writer, out_dtype, advance)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_model_files(base, base, staging, out_dtype, _mixtral_config(config, base))
        _drop_llama_keys(staging / "config.json")
        provenance = write_record(_build_record(config, checkpoints, router, out_dtype, options.shard_size), staging)
    total = sum(_numel(t.shape) for t in outputs)
    expert_numel = sum(_numel(t.shape) for t in outputs if ".experts." in t.name)
    active = total - expert_numel + expert_numel * config.experts_per_token // len(config.experts)
    return MoEResult(out_dir, router, total, active, time.perf_counter() - started, provenance)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _config_dtype(checkpoint: Checkpoint) -> torch.dtype:
    return declared_dtype(checkpoint.config, MODEL_DTYPE_NAMES) or torch.float32


def _mlp_names(layer: int) -> dict[str, str]:
    return {proj: f"model.layers.{layer}.mlp.{proj}.weight" for proj in MLP_TO_EXPERT}


def _check_models(config: MoEConfig, checkpoints: dict[str, Checkpoint]) -> int:
    """Refuse what cannot become a Mixtral; returns the number of layers."""
    base = checkpoints[config.base_model]
    where = f"base model '{config.base_model}'"
    if base.config.get("model_type") not in BASE_TYPES:
        raise IncompatibleModels(f"{where} is {base.architecture}: a Mixtral is built from Llama models "
                                 f"(model_type llama)")
    for key in ("attention_bias", "mlp_bias"):
        if base.config.get(key):
            raise IncompatibleModels(f"{where}: config has {key}: true, which Mixtral has no place for")
    layers = base.num_layers()
    if not layers:
        raise IncompatibleModels(f"{where}: config.json has no num_hidden_layers")
    for layer in range(layers):
        for name in _mlp_names(layer).values():
            if name not in base.tensors:
                raise IncompatibleModels(f"{where}: no tensor '{name}' (not a Llama MLP layout)")
    base_shapes = {name: ref.shape for name, ref in base.tensors.items()}
    for index, expert in enumerate(config.experts):
        checkpoint = checkpoints[expert.source_model]
        label = f"expert {index} '{expert.source_model}'"
        if checkpoint.architecture != base.architecture:
            raise IncompatibleModels(f"{label} is {checkpoint.architecture}, the base {base.architecture}: experts "
                                     f"must have the base's architecture")
        shapes = {name: ref.shape for name, ref in checkpoint.tensors.items()}
        for name in sorted(set(base_shapes) | set(shapes)):
            if name not in shapes:
                raise IncompatibleModels(f"{label} has no tensor '{name}' (the base has it)")
            if name not in base_shapes:
                raise IncompatibleModels(f"{label} has tensor '{name}', which the base has not")
            if shapes[name] != base_shapes[name]:
                raise IncompatibleModels(f"{label}: tensor '{name}' has shape {list(shapes[name])}, the base's "
                                         f"{list(base_shapes[name])}")
    return layers


# -- the router --------------------------------------------------------------------------------------------

def router_weights(config: MoEConfig, base: Checkpoint, device: torch.device | None = None) -> torch.Tensor:
    """(layers, experts, hidden) float32 router rows for `config.gate_mode` (module docstring); the modes that
    run the base run it on `device` (default: the CPU)."""
    device = device or torch.device("cpu")
    layers, hidden = base.num_layers() or 0, int(base.config["hidden_size"])
    count = len(config.experts)
    if config.gate_mode in ("random", "uniform_random"):
        generator = torch.Generator().manual_seed(config.seed)
        if config.gate_mode == "random":
            return torch.randn((layers, count, hidden), generator=generator)
        scale = (1.0 / hidden) ** 0.5
        return torch.rand((layers, count, hidden), generator=generator) * 2 * scale - scale
    tokenizer = _tokenizer(base)
    if config.gate_mode == "cheap_embed":
        embed = base.read("model.embed_tokens.weight").float()

        def vector(prompts: list[str]) -> torch.Tensor:
            return _normalised(_cheap_embedding(embed, tokenizer, prompts)).expand(layers, hidden)
    elif config.gate_mode == "router_input":
        model = _load_base(base, device)

        def vector(prompts: list[str]) -> torch.Tensor:
            return _mean_router_inputs(model, tokenizer, prompts, layers)
    else:
        model = _load_base(base, device)
        last_token = config.gate_mode == "hidden"

        def vector(prompts: list[str]) -> torch.Tensor:
            return _mean_hidden_states(model, tokenizer, prompts, last_token)

    rows = []
    for expert in config.experts:
        row = vector(expert.positive_prompts or [])
        if expert.negative_prompts:
            row = row - vector(expert.negative_prompts)
        rows.append(_normalised(row))
    return torch.stack(rows, dim=1).contiguous()  # (layers, experts, hidden)


def _normalised(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def _tokenizer(base: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"model '{base.path}': its tokenizer cannot be loaded ({exc}); gate modes hidden "
                              f"and cheap_embed encode the prompts with it") from None


def _encode(tokenizer, prompt: str) -> list[int]:
    """As mergekit-moe: the BOS text, then the prompt, with no other special tokens."""
    ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MoEConfigError(f"prompt {prompt[:40]!r}: encodes to no tokens")
    return ids


def _cheap_embedding(embed: torch.Tensor, tokenizer, prompts: list[str]) -> torch.Tensor:
    """The sum of the prompts' token embeddings (every token of every prompt), shape (1, hidden)."""
    total = torch.zeros(1, embed.shape[1])
    for prompt in prompts:
        ids = torch.tensor(_encode(tokenizer, prompt))
        if int(ids.max()) >= embed.shape[0]:
            raise MoEConfigError(f"prompt {prompt[:40]!r}: token {int(ids.max())} is outside the base's embedding "
                              f"({embed.shape[0]} rows)")
        total += embed[ids].sum(dim=0, keepdim=True)
    return total


def _load_base(base: Checkpoint, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model.eval()
    return model.to(device)


def _mean_hidden_states(model, tokenizer, prompts: list[str], last_token: bool) -> torch.Tensor:
    """(layers, hidden): the hidden state entering each layer, at the last token (or averaged over the tokens)
    of each prompt, averaged over the prompts. Prompts run one at a time: no padding enters any average."""
    total = None
    for prompt in prompts:
        ids = torch.tensor([_encode(tokenizer, prompt)], device=model.device)
        with torch.no_grad():
            output = model(input_ids=ids, output_hidden_states=True, return_dict=True)
        # hidden_states[i] enters layer i; the last one leaves the final layer (before the final norm)
        states = torch.stack(output.hidden_states[:-1])[:, 0].float().cpu()  # (layers, tokens, hidden)
        vector = states[:, -1] if last_token else states.mean(dim=1)
        total = vector if total is None else total + vector
    assert total is not None  # the config refuses empty prompt lists
    return total / len(prompts)


def _mean_router_inputs(model, tokenizer, prompts: list[str], layers: int) -> torch.Tensor:
    """(layers, hidden): the input of each layer's MLP (where the router will sit), averaged over every token of
    every prompt."""
    totals = torch.zeros(layers, int(model.config.hidden_size))
    tokens = 0
    caught: dict[int, torch.Tensor] = {}

    def catch(layer: int):
        def hook(_module, args):
            caught[layer] = args[0][0].detach().float().sum(dim=0).cpu()
        return hook

    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(catch(i)) for i in range(layers)]
    try:
        for prompt in prompts:
            ids = torch.tensor([_encode(tokenizer, prompt)], device=model.device)
            with torch.no_grad():
                model(input_ids=ids)
            totals += torch.stack([caught[i] for i in range(layers)])
            tokens += ids.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    return totals / tokens


# -- writing -----------------------------------------------------------------------------------------------

def expert_name(layer: int, expert: int, projection: str) -> str:
    """Mixtral's checkpoint name of expert `expert`'s `projection` (gate_proj, down_proj, up_proj) in `layer`."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MLP_TO_EXPERT[projection]}.weight"


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def _output_tensors(config: MoEConfig, base: Checkpoint, layers: int, dtype: torch.dtype) -> list[OutputTensor]:
    hidden = int(base.config["hidden_size"])
    outputs = [OutputTensor(name, dtype, ref.shape) for name, ref in base.tensors.items() if ".mlp." not in name]
    for layer in range(layers):
        for projection, name in _mlp_names(layer).items():
            shape = base.tensors[name].shape
            outputs += [OutputTensor(expert_name(layer, i, projection), dtype, shape)
                        for i in range(len(config.experts))]
        outputs.append(OutputTensor(router_name(layer), dtype, (len(config.experts), hidden)))
    return outputs


def _write_tensors(config: MoEConfig, checkpoints: dict[str, Checkpoint], layers: int, router: torch.Tensor,
                   writer: ShardedWriter, dtype: torch.dtype, advance: Advance) -> None:
    base = checkpoints[config.base_model]
    for name in base.tensors:
        if ".mlp." not in name:
            writer.write(name, base.read(name).to(dtype))
            base.release(name)
            advance(1)
    for layer in range(layers):
        for index, expert in enumerate(config.experts):
            checkpoint = checkpoints[expert.source_model]
            for projection, name in _mlp_names(layer).items():
                writer.write(expert_name(layer, index, projection), checkpoint.read(name).to(dtype))
                checkpoint.release(name)
                advance(1)
        writer.write(router_name(layer), router[layer].to(dtype))
        advance(1)


def _mixtral_config(config: MoEConfig, base: Checkpoint) -> dict:
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
            "num_local_experts": len(config.experts), "num_experts_per_tok": config.experts_per_token,
            "sliding_window": None, "output_router_logits": False}


def _drop_llama_keys(path: Path) -> None:
    config = json.loads(path.read_text())
    for key in LLAMA_ONLY_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _build_record(config: MoEConfig, checkpoints: dict[str, Checkpoint], router: torch.Tensor,
                  out_dtype: torch.dtype, shard_size: str | int) -> Build:
    """The provenance a merge writes (method "moe", the base as base model and tokenizer source), with the gate
    mode and each layer's router condition number (large: the prompts hardly tell the experts apart)."""
    condition = [round(float(torch.linalg.cond(layer)), 4) if router.shape[1] > 1 else 1.0 for layer in router]
    return Build(config.model_dump(exclude_none=True, mode="json"), "moe", config.seed, config.base_model,
                 config.base_model, str(out_dtype).removeprefix("torch."), shard_size, hash_checkpoints(checkpoints),
                 {"gate_mode": config.gate_mode, "router_condition": condition})
