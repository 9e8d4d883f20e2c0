"""PEFT LoRA adapter folders: read them (refusing what plain `W + scaling·B@A` cannot express) and write them.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are named
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (linear layers) or
`base_model.model.<module>.lora_embedding_A` / `_B` (embeddings). Here every module is keyed by the base
model's weight name, `<module>.weight`, so it lines up with the tensors of the base checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, MergegateError
from ..io.read import read_safetensors_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
# A full weight PEFT saves beside the LoRA matrices: the embedding layers, when they are targeted or resized
_FULL_WEIGHT = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.weight$")

# Config fields that change what an adapter computes beyond `W + scaling·B@A`. Each must be unset (null,
# false, empty) for mergegate to read the adapter; the value says why.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA rescales each column by a learned magnitude over the merged weight's norm",
    "lora_bias": "the adapter trains a bias on lora_B, which a weight delta alone does not carry",
    "modules_to_save": "whole modules are replaced by trained copies, not by low-rank deltas",
    "trainable_token_indices": "some embedding rows are trained directly (trainable tokens)",
    "target_parameters": "the adapter targets nn.Parameter tensors (ParamWrapper), not modules",
    "layer_replication": "the adapter duplicates layers of the base model",
    "alora_invocation_tokens": "an activated LoRA only acts after its invocation tokens, so it cannot be merged",
    "arrow_config": "Arrow routes between adapters per token",
    "use_qalora": "QA-LoRA's A matrix acts on pooled inputs",
    "use_bdlora": "block-diagonal LoRA shards its matrices",
    "kasa_config": "a LoRA variant mergegate does not implement",
    "monteclora_config": "a LoRA variant mergegate does not implement",
    "velora_config": "a LoRA variant mergegate does not implement",
}
# Initialisations that rewrite the base weights: the trained adapter is relative to a residual base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: the first key that regex-matches the module path's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT LoraConfig that decide what the adapter computes; `raw` is the whole JSON."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)

    def rank(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r))

    def alpha(self, module: str) -> float:
        return float(pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scaling(self, module: str) -> float:
        """alpha/sqrt(r) with rsLoRA, alpha/r otherwise, with the module's rank and alpha patterns applied."""
        r, alpha = self.rank(module), self.alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass(frozen=True)
class LoraWeights:
    """One module's low-rank pair. `A` is (r, in) and `B` (out, r) in LoRA's own orientation; `transposed`
    says the base weight stores the product transposed (embeddings, fan_in_fan_out Conv1D layers)."""

    module: str
    A: torch.Tensor
    B: torch.Tensor
    kind: str = "linear"  # or "embedding"
    transposed: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def weight_shape(self) -> tuple[int, int]:
        out_features, in_features = self.B.shape[0], self.A.shape[1]
        return (in_features, out_features) if self.transposed else (out_features, in_features)

    def product(self) -> torch.Tensor:
        """B @ A in float32, in LoRA's orientation (not yet transposed to the base weight's layout)."""
        return self.B.float() @ self.A.float()


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter read from disk: its config and one `LoraWeights` per targeted module, keyed by
    the base model's weight name (`model.layers.0.self_attn.q_proj.weight`). `full_weights` are whole
    tensors the adapter carries (PEFT saves the embedding layers when they are targeted or were resized);
    as in PEFT, they replace the base's tensors of the same name."""

    path: Path
    config: AdapterConfig
    modules: Mapping[str, LoraWeights]
    full_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def _module(self, name: str) -> LoraWeights:
        weights = self.modules.get(name) or self.modules.get(f"{name}.weight")
        if weights is None:
            raise KeyError(f"adapter '{self.path}' has no LoRA weights for '{name}'")
        return weights

    def scaling(self, module: str) -> float:
        """The factor PEFT applies to B@A for this module (weight name or module path)."""
        return self.config.scaling(self._module(module).module)

    def delta(self, module: str, weight: float = 1.0) -> torch.Tensor:
        """weight · scaling · B@A in float32, laid out like the base weight it is added to."""
        lora = self._module(module)
        delta = lora.product() * (self.config.scaling(lora.module) * weight)
        return delta.T if lora.transposed else delta


# -- reading -------------------------------------------------------------------------------------------
def _load_config(folder: Path) -> tuple[Path, dict]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"adapter '{folder}': no {CONFIG_FILE}, so this is not a PEFT adapter folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return path, raw


def check_supported(raw: Mapping, path: Path) -> None:
    """Refuse configs whose adapters are not plain LoRA deltas, naming the field and the reason."""
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise CheckpointError(f"{path}: peft_type={peft_type!r}; mergegate reads LoRA adapters only")
    for name, reason in _UNSUPPORTED_FIELDS.items():
        if raw.get(name):
            raise CheckpointError(f"{path}: {name}={json.dumps(raw[name])} is not supported ({reason})")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise CheckpointError(f"{path}: bias={bias!r} is not supported (the adapter trains biases, which a "
                              "low-rank weight delta does not carry); only bias='none' adapters can be used")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} trains against a rewritten (residual) base, so adding the "
            "adapter to the original base is wrong; convert it to a plain LoRA first (PEFT's save_pretrained "
            "with path_initial_model_for_weight_conversion)")
    for name in ("r", "lora_alpha"):
        value = raw.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{path}: {name}={value!r}; expected a positive number")


def parse_config(raw: Mapping, path: Path) -> AdapterConfig:
    check_supported(raw, path)
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    return AdapterConfig(
        r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]), use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=targets, rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}), fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"), raw=dict(raw),
    )


def _load_tensors(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        read_safetensors_header(weights)  # named errors for truncated or corrupt files
        from safetensors.torch import load_file

        return weights, load_file(weights)
    pickled = folder / PICKLE_WEIGHTS_FILE
    if pickled.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{pickled}: pickle weights. Unpickling can run arbitrary code, so mergegate refuses it by "
                "default: convert the adapter to safetensors, or pass --allow-pickle (allow_pickle=True) to "
                "load it with torch.load(weights_only=True).")
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for unsafe or corrupt pickles
            raise CheckpointError(f"{pickled}: cannot load with weights_only=True ({exc})") from None
        return pickled, dict(state)
    raise CheckpointError(f"adapter '{folder}': no {WEIGHTS_FILE} (nor {PICKLE_WEIGHTS_FILE})")


def _group(tensors: Mapping[str, torch.Tensor], file: Path) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """(module path → {'A': (key, tensor), 'B': ..., 'kind': ...}, weight name → full weight); anything else
    is refused, naming the tensor."""
    grouped: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if not tensor.is_floating_point():
            raise CheckpointError(f"{file}: tensor '{key}' has dtype {tensor.dtype}; LoRA matrices are floats")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: tensor '{key}' holds NaN or infinite values")
        match = _KEY.match(name)
        if match is None:
            whole = _FULL_WEIGHT.match(name)
            if whole is None:
                raise CheckpointError(
                    f"{file}: tensor '{key}' is not a LoRA A/B matrix (DoRA magnitudes, biases, saved modules "
                    "and trainable tokens are not supported)")
            full[f"{whole['module']}.weight"] = tensor
            continue
        part = match["part"]
        entry = grouped.setdefault(match["module"], {})
        entry["A" if part.startswith(("lora_A", "lora_embedding_A")) else "B"] = (key, tensor)
        kind = "embedding" if "embedding" in part else "linear"
        if entry.setdefault("kind", kind) != kind:
            raise CheckpointError(f"{file}: module '{match['module']}' mixes lora_A/B and lora_embedding_A/B")
    return grouped, full


def _module_weights(module: str, entry: dict, config: AdapterConfig, file: Path) -> LoraWeights:
    for part in ("A", "B"):
        if part not in entry:
            other = entry["A" if part == "B" else "B"][0]
            raise CheckpointError(f"{file}: tensor '{other}' has no matching lora_{part} matrix")
    (a_key, a), (b_key, b) = entry["A"], entry["B"]
    for key, tensor in ((a_key, a), (b_key, b)):
        if tensor.dim() != 2:
            raise CheckpointError(f"{file}: tensor '{key}' has shape {list(tensor.shape)}; only 2-D LoRA "
                                  "matrices (linear and embedding layers) are supported, not convolutions")
    if a.shape[0] != b.shape[1]:
        raise CheckpointError(f"{file}: '{a_key}' {list(a.shape)} and '{b_key}' {list(b.shape)} disagree on the rank")
    expected = config.rank(module)
    if a.shape[0] != expected:
        raise CheckpointError(f"{file}: tensor '{a_key}' has rank {a.shape[0]} but the config says r={expected} "
                              "for this module (r / rank_pattern in adapter_config.json)")
    embedding = entry["kind"] == "embedding"
    return LoraWeights(module, a, b, kind=entry["kind"], transposed=embedding or config.fan_in_fan_out)


def read_adapter(folder: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA adapter folder. Raises CheckpointError naming the file, field or tensor when the
    folder is incomplete or the adapter is not a plain LoRA (DoRA, biases, saved modules, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"adapter '{folder}': no such folder")
    config_path, raw = _load_config(folder)
    config = parse_config(raw, config_path)
    file, tensors = _load_tensors(folder, allow_pickle)
    if not tensors:
        raise CheckpointError(f"{file}: holds no tensors")
    grouped, full = _group(tensors, file)
    modules = {}
    for module in sorted(grouped):
        weights = _module_weights(module, grouped[module], config, file)
        modules[weights.weight_name] = weights
    return Adapter(folder, config, modules, full)


# -- writing -------------------------------------------------------------------------------------------
def adapter_state(modules: Mapping[str, LoraWeights],
                  full_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file, named as PEFT saves them."""
    state = {}
    for name, tensor in (full_weights or {}).items():
        # a LoRA-wrapped layer keeps its own weight under base_layer
        inner = name.removesuffix(".weight") + (".base_layer.weight" if name in modules else ".weight")
        state[f"{PEFT_PREFIX}{inner}"] = tensor.contiguous()
    for lora in modules.values():
        a_name, b_name = (("lora_embedding_A", "lora_embedding_B") if lora.kind == "embedding"
                          else ("lora_A.weight", "lora_B.weight"))
        state[f"{PEFT_PREFIX}{lora.module}.{a_name}"] = lora.A.contiguous()
        state[f"{PEFT_PREFIX}{lora.module}.{b_name}"] = lora.B.contiguous()
    return state


def write_adapter_files(folder: Path, config: Mapping, modules: Mapping[str, LoraWeights],
                        full_weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing folder."""
    from safetensors.torch import save_file

    save_file(adapter_state(modules, full_weights), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def rank_layout(ranks: Mapping[str, int]) -> tuple[int, dict[str, int]]:
    """A global r (the most common rank, the larger on a tie) and a rank_pattern for the other modules."""
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {module: rank for module, rank in ranks.items() if rank != r}
    for module, rank in ranks.items():
        # PEFT reads the keys as regexes matched against a module path's tail: every module must resolve to
        # its own rank, never to another module's key
        if pattern_value(pattern, module, r) != rank:
            raise MergegateError(f"rank_pattern: module '{module}' would match another module's key")
    return r, pattern
