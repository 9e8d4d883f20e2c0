"""Export a Llama checkpoint (`LlamaForCausalLM`, Hugging Face layout) to one GGUF file for llama.cpp.

The layout follows llama.cpp's `convert_hf_to_gguf.py` for llama: tensors renamed (`token_embd`, `blk.N.attn_q`,
…, `output_norm`, `output`), the rows of q_proj and k_proj permuted from Hugging Face's rotate-half order to the
interleaved pairs llama.cpp's rope expects, `output.weight` left out when the embeddings are tied (llama.cpp then
uses `token_embd`), hyperparameters under `llama.*`, and the tokenizer under `tokenizer.ggml.*` with the chat
template as `tokenizer.chat_template`.

Types (`qtype`): `f16` writes every matrix as float16; `q8_0` and `q4_0` quantize every matrix whose rows split
into 32-value blocks with the `gguf` package's own quantizers (bit-exact with ggml's reference ones), and write
float16 for the rest. One-dimensional tensors (the norms, biases) stay float32 in every type, as llama.cpp's
converter and `llama-quantize` keep them.

Tokenizer, as far as GGUF's metadata can say it:
- a `tokenizers` WordLevel model (the demo's character tokenizer) becomes `tokenizer.ggml.model = "llama"`
  (llama.cpp's SentencePiece tokenizer, scores all 0, no space prefix, spaces spelled `▁`): it splits text into
  characters and merges a pair only into a token of the vocabulary, so a character vocabulary tokenizes one
  token per character, as the WordLevel model does. (GPT-2's byte-level BPE would need merges, which a
  WordLevel model has none of, and would respell every token.)
- a byte-level BPE becomes `"gpt2"` with its merges, and `tokenizer.ggml.pre` names how llama.cpp is to pre-split
  text (it reads a name, not the regex): `"gpt-2"` for GPT-2's own split (a ByteLevel step with its regex),
  `"smollm"` for digits split one by one first (SmolLM's). llama.cpp's `"default"` splits otherwise (" +" into " "
  and "+"), so a pre-tokenizer without a name here is refused rather than written as it.
- anything else is refused: its GGUF form needs a conversion this exporter does not do.
Special tokens become CONTROL (the unknown token UNKNOWN), other added tokens USER_DEFINED; bos/eos/unk/pad ids
come from tokenizer_config.json / config.json, and whether a BOS (EOS) is added from what the tokenizer itself
does to a sample text.

OUT is checked before anything is converted (an existing file is replaced only with `overwrite`); the file is
written beside OUT under a temporary name and renamed onto OUT when complete, so OUT is never a partial file;
tensors are streamed to a spooled temporary file as they are converted, and one holding NaN or infinity is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GGUFExportError

if TYPE_CHECKING:
    from ..io.read import Checkpoint

GGUF_TYPES = ("f16", "q8_0", "q4_0")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SPM_SPACE = "\u2581"  # SentencePiece's visible space: llama.cpp's "llama" tokenizer spells ' ' this way
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


@dataclass
class GGUFExport:
    """What was written: the file, its type, and per GGUF tensor name the source tensor and the type stored."""

    path: Path
    qtype: str
    tensors: dict[str, tuple[str, str]] = field(default_factory=dict)  # gguf name -> (source name, ggml type)
    tokenizer_model: str = ""


def gguf_tensor_name(name: str) -> str | None:
    """The GGUF name of a Hugging Face Llama tensor; None for tensors llama.cpp recomputes (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"blk.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    return None


def permute_rope_rows(weight: Any, heads: int) -> Any:
    """Reorder the rows of a q/k projection (or its bias) from rotate-half to interleaved pairs, per head: row
    j·(d/2)+i of a head becomes row 2i+j (llama.cpp's `LlamaModel.permute`)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_rope_rows(weight: Any, heads: int) -> Any:
    """The inverse of `permute_rope_rows` (what a GGUF reader does to get Hugging Face's order back)."""
    return (weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _config_int(config: dict, key: str, folder: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GGUFExportError(f"{folder / 'config.json'}: '{key}' is {value!r}; a positive integer is needed")
    return value


def _attention_shape(config: dict, folder: Path) -> tuple[int, int, int]:
    """(heads, kv heads, head dim), checked to fit together: the q/k rows are permuted per head in pairs."""
    path = folder / "config.json"
    heads = _config_int(config, "num_attention_heads", folder)
    if config.get("head_dim") is not None:
        head_dim = _config_int(config, "head_dim", folder)
    else:
        hidden = _config_int(config, "hidden_size", folder)
        if hidden % heads:
            raise GGUFExportError(f"{path}: 'num_attention_heads' is {heads}, which does not divide "
                                  f"'hidden_size' {hidden}")
        head_dim = hidden // heads
    if head_dim % 2:
        raise GGUFExportError(f"{path}: 'head_dim' is {head_dim}; rope rotates pairs, so it must be even")
    kv_heads = _config_int(config, "num_key_value_heads", folder) if config.get("num_key_value_heads") else heads
    if heads % kv_heads:
        raise GGUFExportError(f"{path}: 'num_key_value_heads' is {kv_heads}, which does not divide "
                              f"'num_attention_heads' {heads}")
    return heads, kv_heads, head_dim


def _check_rope_rows(checkpoint: Checkpoint, heads: int, kv_heads: int, head_dim: int) -> None:
    """Every q/k projection has the rows its heads say (what `permute_rope_rows` reshapes by), before any work."""
    for source, ref in sorted(checkpoint.tensors.items()):
        target = gguf_tensor_name(source) or ""
        field_heads = ("num_attention_heads", heads) if ".attn_q." in target else \
            ("num_key_value_heads", kv_heads) if ".attn_k." in target else None
        if field_heads is None:
            continue
        field, count = field_heads
        rows = ref.shape[0] if ref.shape else 0
        if rows != count * head_dim:
            raise GGUFExportError(f"model '{checkpoint.path}': tensor '{source}' has {rows} rows; config.json's "
                                  f"{field} × head dim is {count} × {head_dim} = {count * head_dim}")


def _rope(config: dict, folder: Path) -> tuple[float, str, float | None]:
    """(rope theta, scaling type, scaling factor) from `rope_parameters` (transformers 5) or the older
    `rope_theta` / `rope_scaling`; scalings llama.cpp's llama needs extra tensors for are refused."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear"):
        raise GGUFExportError(f"{folder / 'config.json'}: rope type '{kind}' is not exported (default and linear "
                              "are; llama.cpp's converter writes extra tensors for the others)")
    factor = params.get("factor") if kind == "linear" else None
    return float(theta), kind, (float(factor) if factor is not None else None)


def _special_id(folder: Path, tokenizer_config: dict, config: dict, vocab: dict[str, int], role: str) -> int | None:
    """A special token's id: its text in tokenizer_config.json looked up in the vocabulary, else config.json's id."""
    text = tokenizer_config.get(f"{role}_token")
    if isinstance(text, dict):  # AddedToken serialised as an object
        text = text.get("content")
    if isinstance(text, str) and text in vocab:
        return vocab[text]
    value = config.get(f"{role}_token_id")
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    return template if isinstance(template, str) else None


@dataclass
class _Vocabulary:
    model: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    pre: str | None = None  # llama.cpp's name of a byte-level BPE's pre-tokenization


def _gpt2_split(step: Any) -> bool:
    """A ByteLevel step that splits with GPT-2's regex (tokenizers' default when `use_regex` is not written)."""
    return isinstance(step, dict) and step.get("type") == "ByteLevel" and step.get("use_regex", True) is True


def _pre_tokenizer_name(path: Path, pre_tokenizer: Any) -> str:
    """llama.cpp's name for how the byte-level BPE of `path` pre-splits text (GGUFExportError when it has none
    here): GPT-2's regex alone is "gpt-2"; each digit on its own first, then GPT-2's regex, is "smollm"."""
    steps = pre_tokenizer.get("pretokenizers") if isinstance(pre_tokenizer, dict) and \
        pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    steps = steps if isinstance(steps, list) else [steps]
    if len(steps) == 1 and _gpt2_split(steps[0]):
        return "gpt-2"
    digits_first = bool(steps) and isinstance(steps[0], dict) and steps[0].get("type") == "Digits" and \
        steps[0].get("individual_digits") is True
    if len(steps) == 2 and digits_first and _gpt2_split(steps[1]):
        return "smollm"
    kinds = ", ".join(str(step.get("type")) if isinstance(step, dict) else repr(step) for step in steps)
    raise GGUFExportError(f"{path}: its pre-tokenizer ({kinds}) is not one llama.cpp knows by a name this exporter "
                          "writes (GPT-2's ByteLevel split, or digits one by one and then it): llama.cpp would split "
                          "the text otherwise than the model's tokenizer")


def _vocabulary(folder: Path, vocab_size: int) -> tuple[_Vocabulary, Any]:
    """The GGUF spelling of the folder's tokenizer.json (see the module's docstring) and the loaded tokenizer."""
    from gguf import TokenType
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"model '{folder}': no tokenizer.json; GGUF carries the tokenizer, so one is needed")
    spec = json.loads(path.read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(path))
    ids = tokenizer.get_vocab(with_added_tokens=True)
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    kind = (spec.get("model") or {}).get("type")
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if kind == "WordLevel":
        model = "llama"
    elif kind == "BPE" and byte_level:
        model = "gpt2"
    else:
        raise GGUFExportError(f"{path}: a {kind} tokenizer{' (not byte-level)' if kind == 'BPE' else ''} is not "
                              "exported (WordLevel and byte-level BPE are)")
    if len(ids) > vocab_size:
        raise GGUFExportError(f"{path}: {len(ids)} tokens but the embedding has {vocab_size} rows")
    by_id = {token_id: text for text, token_id in ids.items()}
    unk = (spec.get("model") or {}).get("unk_token")
    tokens, types = [], []
    for token_id in range(vocab_size):
        text = by_id.get(token_id)
        if text is None:  # rows past the tokenizer (a padded embedding): llama.cpp's converter names them so
            tokens.append(f"[PAD{token_id}]")
            types.append(int(TokenType.UNUSED))
        elif token_id in added:
            tokens.append(text)
            types.append(int(TokenType.UNKNOWN if text == unk else
                             TokenType.CONTROL if added[token_id].get("special") else TokenType.USER_DEFINED))
        else:
            tokens.append(text.replace(" ", SPM_SPACE) if model == "llama" else text)
            types.append(int(TokenType.UNKNOWN if text == unk else TokenType.NORMAL))
    merges, pre = [], None
    if model == "gpt2":
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        pre = _pre_tokenizer_name(path, spec.get("pre_tokenizer"))
    scores = [0.0] * vocab_size if model == "llama" else None
    return _Vocabulary(model, tokens, types, merges, scores, pre), tokenizer


def _adds_special(tokenizer: Any, token_id: int | None, at_start: bool) -> bool:
    """Whether the tokenizer puts `token_id` at the start (end) of an encoded sample text by itself."""
    if token_id is None:
        return False
    encoded = tokenizer.encode("a", add_special_tokens=True).ids
    return bool(encoded) and encoded[0 if at_start else -1] == token_id


def _ggml_type(array: Any, qtype: str) -> Any:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if array.ndim < 2:
        return GGMLQuantizationType.F32
    if qtype == "f16":
        return GGMLQuantizationType.F16
    quantized = GGMLQuantizationType.Q8_0 if qtype == "q8_0" else GGMLQuantizationType.Q4_0
    block = GGML_QUANT_SIZES[quantized][0]
    return quantized if array.shape[-1] % block == 0 else GGMLQuantizationType.F16


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType

    return int({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                "q4_0": LlamaFileType.MOSTLY_Q4_0}[qtype])


def export_gguf(folder: str | Path, out: str | Path, qtype: str = "f16", *, name: str | None = None,
                overwrite: bool = False) -> GGUFExport:
    """Write the Llama checkpoint in `folder` as one GGUF file at `out` with weights of type `qtype` (`f16`,
    `q8_0`, `q4_0`), its tokenizer and chat template. `out` is checked first (an existing file is replaced only
    with `overwrite`, and only once the new one is complete). GGUFExportError for a model this cannot export (the
    reason in one line), CheckpointError for an unreadable folder, MergegateError for an unusable `out`."""
    from .._extras import install_hint
    from .._staging import staged_file
    from ..io.read import Checkpoint

    try:
        import gguf
    except ModuleNotFoundError:
        raise GGUFExportError(f"exporting GGUF needs the `gguf` package: {install_hint('gguf')}") from None

    if qtype not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type '{qtype}' is not one of {', '.join(GGUF_TYPES)}")
    folder, out = Path(folder), Path(out)
    with staged_file(out, overwrite) as partial:
        result = _write_gguf(gguf, Checkpoint(folder), partial, qtype, name)
    result.path = out
    return result


def _write_gguf(gguf: Any, checkpoint: Checkpoint, partial: Path, qtype: str, name: str | None) -> GGUFExport:
    """The export itself, into `partial`: the model checked, its metadata and tensors converted and written."""
    import numpy as np

    from ..io.read import read_json_object

    folder = checkpoint.path
    config = checkpoint.config
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or not set(archs) <= set(SUPPORTED_ARCHITECTURES) or not archs:
        raise GGUFExportError(f"model '{folder}': architecture {checkpoint.architecture} is not exported to GGUF "
                              f"(only llama/{','.join(SUPPORTED_ARCHITECTURES)} is)")
    hidden = _config_int(config, "hidden_size", folder)
    layers = _config_int(config, "num_hidden_layers", folder)
    heads, kv_heads, head_dim = _attention_shape(config, folder)
    _check_rope_rows(checkpoint, heads, kv_heads, head_dim)
    vocab_size = _config_int(config, "vocab_size", folder)
    theta, rope_kind, rope_factor = _rope(config, folder)
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = read_json_object(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    vocabulary, tokenizer = _vocabulary(folder, vocab_size)
    token_ids = tokenizer.get_vocab(with_added_tokens=True)
    special = {role: _special_id(folder, tokenizer_config, config, token_ids, role)
               for role in ("bos", "eos", "unk", "pad")}

    writer = gguf.GGUFWriter(None, "llama", use_temp_file=True)
    writer.add_name(name or folder.resolve().name)
    writer.add_file_type(_file_type(qtype))
    if qtype != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(_config_int(config, "max_position_embeddings", folder))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(_config_int(config, "intermediate_size", folder))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if rope_kind == "linear" and rope_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_factor)
    writer.add_vocab_size(vocab_size)

    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
        writer.add_token_merges(vocabulary.merges)
    else:
        writer.add_add_space_prefix(False)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    for role, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(_adds_special(tokenizer, special["bos"], at_start=True))
    writer.add_add_eos_token(_adds_special(tokenizer, special["eos"], at_start=False))
    template = _chat_template(folder, tokenizer_config)
    if template:
        writer.add_chat_template(template)

    result = GGUFExport(path=partial, qtype=qtype, tokenizer_model=vocabulary.model)
    tied = bool(config.get("tie_word_embeddings", False))
    for source in sorted(checkpoint.tensors, key=_tensor_order):
        target = gguf_tensor_name(source)
        if target is None:
            if source.endswith("rotary_emb.inv_freq"):
                continue
            raise GGUFExportError(f"model '{folder}': tensor '{source}' has no GGUF llama name (not a plain Llama?)")
        if target == "output.weight" and tied:
            continue  # llama.cpp reads token_embd as the output matrix when output is absent
        array = checkpoint.read(source).float().numpy()
        if not np.isfinite(array).all():
            raise GGUFExportError(f"model '{folder}': tensor '{source}' ({checkpoint.tensors[source].file.name}) "
                                  "holds NaN or infinite values")
        if ".attn_q." in target:
            array = permute_rope_rows(array, heads)
        elif ".attn_k." in target:
            array = permute_rope_rows(array, kv_heads)
        ggml_type = _ggml_type(array, qtype)
        data = gguf.quants.quantize(array, ggml_type)
        writer.add_tensor(target, data, raw_dtype=ggml_type)  # a quantized array's shape is in bytes
        result.tensors[target] = (source, ggml_type.name)
        checkpoint.release(source)
    if "token_embd.weight" not in result.tensors:
        raise GGUFExportError(f"model '{folder}': no model.embed_tokens.weight")

    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return result


def _tensor_order(name: str) -> tuple:
    """Embeddings first, then the layers in numeric order, then the final norm and output (llama.cpp's order)."""
    match = _LAYER.match(name)
    if match:
        return (1, int(match.group(1)), name)
    return (0 if "embed" in name else 2, 0, name)


def dequantized_tensors(path: str | Path) -> dict[str, tuple[str, Any]]:
    """GGUF name → (ggml type name, float32 array in numpy order, i.e. Hugging Face's shape) read back with the
    `gguf` package's reader and dequantizers: what a check compares with the source."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    return {tensor.name: (tensor.tensor_type.name, dequantize(tensor.data, tensor.tensor_type).reshape(
        tuple(int(n) for n in reversed(tensor.shape)))) for tensor in reader.tensors}


BLOCK_VALUES = 32  # values per Q8_0 / Q4_0 block
F16_EPS = 2.0 ** -11  # float16's unit roundoff: a block scale d is stored in float16


def block_error_bound(array: Any, qtype: str) -> Any:
    """Largest |dequantized − source| the format allows, per value, from each 32-value block's largest magnitude m.
    Q8_0: scale d = m/127, q = round(x/d) → |error| ≤ d/2, plus |q| ≤ 127 times d's float16 rounding (≤ d·2⁻¹¹).
    Q4_0: d = m/8 (sign of the extreme value), q = trunc(x/d + 8.5) clipped to 0..15 → |error| ≤ d (the clip
    loses up to a whole step at the far end), plus |q − 8| ≤ 8 times d's float16 rounding."""
    import numpy as np

    blocks = np.abs(array.reshape(-1, BLOCK_VALUES)).max(axis=1, keepdims=True)
    if qtype == "q8_0":
        step = blocks / 127
        bound = step / 2 + 127 * step * F16_EPS
    elif qtype == "q4_0":
        step = blocks / 8
        bound = step + 8 * step * F16_EPS
    else:
        raise GGUFExportError(f"no block error bound for GGUF type '{qtype}' (q8_0 and q4_0 have one)")
    return np.broadcast_to(bound * (1 + 1e-5) + 1e-12, (blocks.shape[0], BLOCK_VALUES)).reshape(array.shape)


@dataclass(frozen=True)
class QuantizationReport:
    """The worst quantized matrix of an export: the largest |error| / bound over its values (≤ 1 when the file
    holds what the format promises), and the largest |error| relative to the matrix's largest magnitude."""

    ratio: float
    tensor: str
    relative: float


def quantization_error(export: GGUFExport, folder: str | Path) -> QuantizationReport:
    """How far the quantized matrices of a q8_0 / q4_0 export, read back, are from the source in `folder`:
    the tensors the format stores unquantized (norms, rows that do not split into blocks) are left out."""
    import numpy as np

    from ..io.read import Checkpoint

    checkpoint = Checkpoint(Path(folder))
    config = checkpoint.config
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    worst = QuantizationReport(0.0, "", 0.0)
    for name, (ggml_type, array) in dequantized_tensors(export.path).items():
        if ggml_type.lower() != export.qtype:
            continue
        source = checkpoint.read(export.tensors[name][0]).float().numpy()
        if ".attn_q." in name:
            source = permute_rope_rows(source, heads)
        elif ".attn_k." in name:
            source = permute_rope_rows(source, kv_heads)
        error = np.abs(array - source)
        ratio = float((error / block_error_bound(source, export.qtype)).max())
        relative = float(error.max() / max(float(np.abs(source).max()), 1e-30))
        if ratio > worst.ratio:
            worst = QuantizationReport(ratio, name, max(relative, worst.relative))
        else:
            worst = QuantizationReport(worst.ratio, worst.tensor, max(relative, worst.relative))
    if not worst.tensor:
        raise GGUFExportError(f"{export.path}: no tensor is stored as {export.qtype}")
    return worst
