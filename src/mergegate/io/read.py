"""Reading Hugging Face model folders: lazy safetensors reading, header and config validation, side files.

Reading parses each file's header once and then reads one tensor at a time from a private mapping, so memory
holds only the tensors being merged, and threads can read in parallel. Everything read from a folder is
checked first: a malformed header, config or index raises CheckpointError naming the file, a side file that
would be copied into an output must be a regular file inside the folder, and pickle weights are loaded only
when asked (`allow_pickle`), with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_MAX_HEADER = 100 * 1024 * 1024
_MAX_COUNT = (1 << 63) - 1  # dimensions and offsets are 64-bit in every reader


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its file and byte range, dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_safetensors_header(path: Path) -> list[TensorRef]:
    """Parse and validate a safetensors header; every problem names the file and tensor.

    Refuses what the `safetensors` library refuses: a header that is not a JSON object of objects, an entry
    without a known dtype, a shape of non-negative integers or two non-negative integer offsets, a byte
    length that disagrees with dtype × shape, and byte ranges that overlap, leave gaps or end anywhere but
    at the end of the file. Any such file raises CheckpointError, never another exception.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        size = info.st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {header_len} header bytes, file has {size})")
            text = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not text.startswith(b"{"):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object starting with '{{', got "
                              f"{text[:16]!r}")
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, got {_json_kind(header)}")
    data_start = 8 + header_len
    data_size = size - data_start
    refs = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointError(f"{path}: safetensors __metadata__ must be an object of strings")
            continue
        refs.append(_header_entry(path, name, entry, data_start, data_size))
    end = 0  # the tensors' byte ranges must tile the data exactly, in offset order (as safetensors checks)
    for ref in sorted(refs, key=lambda r: (r.start, r.stop)):
        if ref.start != data_start + end:
            what = "overlaps the tensor before it" if ref.start < data_start + end else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor '{ref.name}' byte range [{ref.start - data_start}, "
                                  f"{ref.stop - data_start}) {what} (ends at {end}): the file is corrupt")
        end = ref.stop - data_start
    if end != data_size:
        raise CheckpointError(f"{path}: the tensors cover {end} of {data_size} data bytes: the file is truncated "
                              f"or corrupt")
    return refs


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"key {key!r} appears twice")
        found[key] = value
    return found


def _json_kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorRef:
    """One tensor's header entry, checked: dtype, shape, offsets and their agreement with the file."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor '{name}' header entry must be an object, got {_json_kind(entry)}")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {code!r}")
    dtype = SAFETENSORS_DTYPES[code]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) and d <= _MAX_COUNT for d in shape):
        raise CheckpointError(f"{path}: tensor '{name}' has shape {_short(shape)}: expected a list of "
                              f"non-negative integers")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise CheckpointError(f"{path}: tensor '{name}' has data_offsets {_short(offsets)}: expected two "
                              f"non-negative integers")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if end < begin or end - begin != numel * dtype.itemsize or end > data_size:
        raise CheckpointError(
            f"{path}: tensor '{name}' ({code} {list(shape)}) has byte range [{begin}, {end}) that does not fit "
            f"its shape or the file ({data_size} data bytes): the file is truncated or corrupt"
        )
    return TensorRef(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


class Checkpoint:
    """A local Hugging Face model folder, opened lazily: headers now, tensor bytes on `read`."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"model '{path}': no such folder (mergegate reads local model folders; it never downloads)"
            )
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"model '{path}': no config.json, so this is not a Hugging Face model folder")
        self.config: dict = read_json_object(contained_file(config_path, self.path))
        _check_config_fields(config_path, self.config)
        self.weight_files = sorted(self.path.glob("*.safetensors"))
        self._maps: dict[Path, mmap.mmap] = {}
        self._maps_lock = threading.Lock()
        self._pickled: dict[str, torch.Tensor] | None = None
        self.tensors: dict[str, TensorRef] = {}
        if self.weight_files:
            self._index_safetensors()
        else:
            self._open_pickle(allow_pickle)

    # -- reading -------------------------------------------------------------------------------
    def _index_safetensors(self) -> None:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index_path}: not a valid index ('weight_map' must map tensor names to "
                                      f"file names)")
            for file in set(weight_map.values()):
                if not file or Path(file).name != file or file in (".", ".."):
                    raise CheckpointError(f"{index_path}: shard {file!r} is not a file name inside the model folder")
            listed = sorted({self.path / f for f in weight_map.values()})
            missing = [p.name for p in listed if not p.is_file()]
            if missing:
                raise CheckpointError(f"{index_path}: lists shard(s) that are missing: {', '.join(missing)}")
            self.weight_files = listed
        for file in self.weight_files:
            for ref in read_safetensors_header(file):
                if ref.name in self.tensors:
                    raise CheckpointError(f"model '{self.path}': tensor '{ref.name}' appears in two files")
                self.tensors[ref.name] = ref

    def _open_pickle(self, allow_pickle: bool) -> None:
        pickles = sorted(p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise CheckpointError(f"model '{self.path}': no *.safetensors weight files")
        if not allow_pickle:
            names = ", ".join(p.name for p in pickles)
            raise CheckpointError(
                f"model '{self.path}' has only pickle weights ({names}). Unpickling can run arbitrary code, so "
                "mergegate refuses it by default: convert the model to safetensors, or pass --allow-pickle "
                "(allow_pickle=True) to load it with torch.load(weights_only=True)."
            )
        self._pickled = {}
        for file in pickles:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for unsafe or corrupt pickles
                raise CheckpointError(f"{file}: cannot load with weights_only=True ({exc})") from None
            if not isinstance(state, dict) or not all(isinstance(n, str) and isinstance(t, torch.Tensor)
                                                      for n, t in state.items()):
                raise CheckpointError(f"{file}: not a state dict (a mapping of tensor names to tensors)")
            for name, tensor in state.items():
                self._pickled[name] = tensor
                nbytes = tensor.numel() * tensor.element_size()
                self.tensors[name] = TensorRef(name, file, tensor.dtype, tuple(tensor.shape), 0, nbytes)
        self.weight_files = pickles

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A tensor (or rows [start, stop) of its first dimension) viewed straight from the page cache.

        The view is read-only in spirit: it lives in a private mapping, so nothing written to it reaches
        the file. Call `release` when done, so the mapped pages stop counting in the process's memory.
        """
        ref = self.tensors[name]
        if self._pickled is not None:
            tensor = self._pickled[name]
            return tensor if rows is None else tensor[rows[0]:rows[1]]
        start, count = ref.start, ref.nbytes // ref.dtype.itemsize
        shape = ref.shape
        if rows is not None:
            row_items = count // shape[0] if shape and shape[0] else 0
            start += rows[0] * row_items * ref.dtype.itemsize
            count = (rows[1] - rows[0]) * row_items
            shape = (rows[1] - rows[0], *shape[1:])
        if count == 0:
            return torch.empty(shape, dtype=ref.dtype)
        return torch.frombuffer(self._map(ref.file), dtype=ref.dtype, count=count, offset=start).reshape(shape)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop the pages of a tensor read with `read` from this process (they stay in the page cache)."""
        ref = self.tensors[name]
        if self._pickled is not None or ref.file not in self._maps:
            return
        start, stop = ref.start, ref.stop
        if rows is not None and ref.shape:
            row_bytes = ref.nbytes // ref.shape[0]
            start, stop = ref.start + rows[0] * row_bytes, ref.start + rows[1] * row_bytes
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, stop // page * page  # only pages wholly inside the range
        if last > first:
            self._maps[ref.file].madvise(mmap.MADV_DONTNEED, first, last - first)

    def _map(self, file: Path) -> mmap.mmap:
        with self._maps_lock:
            if file not in self._maps:
                with open(file, "rb") as fh:
                    # ACCESS_COPY: a private mapping, writable for torch.frombuffer, never written to the file
                    self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._maps[file]

    # -- metadata ------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or ["?"]  # a list of strings: checked on opening
        return f"{self.config.get('model_type', '?')}/{','.join(archs)}"

    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        return None

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files present, each checked to be a regular file inside the folder (see
        `contained_file`): they are copied into merged models."""
        return [contained_file(self.path / name, self.path) for name in TOKENIZER_FILES
                if os.path.lexists(self.path / name)]

    def check_side_files(self) -> None:
        """Refuse any file of the folder other than the weights that is a link leaving it or not a regular
        file: a tokenizer loaded from the folder may read (and a merged model then carry) any of them."""
        for entry in sorted(self.path.iterdir()):
            if entry.suffix == ".safetensors" or entry.suffix in PICKLE_SUFFIXES or entry.name.startswith("."):
                continue  # weights are read, never copied (a link to a big disk is fine); hidden files never read
            if entry.is_dir() and not entry.is_symlink():
                for inner in sorted(entry.iterdir()):  # e.g. additional_chat_templates/
                    contained_file(inner, self.path, allow_folders=True)
                continue
            contained_file(entry, self.path, allow_folders=True)

    def vocabulary(self) -> dict[str, int] | None:
        """Token string → id, from tokenizer.json (with added tokens); None when the folder has none."""
        path = self.path / "tokenizer.json"
        if not path.is_file():
            return None
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot be read by `tokenizers` ({exc})") from None

    def input_files(self) -> list[Path]:
        """Every file whose content defines the model: weights, index, config, tokenizer."""
        names = {p.name for p in self.weight_files} | {"config.json", "generation_config.json",
                                                       "model.safetensors.index.json"}
        names |= set(TOKENIZER_FILES)  # hashed where present; `tokenizer_files` checks the ones that are copied
        return sorted(self.path / n for n in names if (self.path / n).is_file())


def read_json_object(path: Path) -> dict:
    """A UTF-8 JSON file holding an object; CheckpointError naming the file otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise CheckpointError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {_json_kind(value)}")
    return value


def _check_config_fields(path: Path, config: dict) -> None:
    """The config fields mergegate reads must have their types: a list of strings, a string, integers."""
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{path}: 'architectures' must be a list of strings, got {_short(archs)}")
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        raise CheckpointError(f"{path}: 'model_type' must be a string, got {_short(config['model_type'])}")
    for key in ("vocab_size", "num_hidden_layers"):
        value = config.get(key)
        if value is not None and not _is_count(value):
            raise CheckpointError(f"{path}: '{key}' must be a non-negative integer, got {_short(value)}")
    if config.get("layer_types") is not None and not isinstance(config["layer_types"], list):
        raise CheckpointError(f"{path}: 'layer_types' must be a list, got {_short(config['layer_types'])}")


def contained_file(path: Path, folder: Path, *, allow_folders: bool = False) -> Path:
    """`path`, checked to be a regular file whose real location is inside `folder` — what may be copied from a
    model folder into an output. A link that leaves the folder (to /etc/passwd, say) or anything that is not a
    regular file (a FIFO, a device) raises CheckpointError naming the file and where it points.

    One layout is allowed out: the Hugging Face cache's, where `<repo>/snapshots/<rev>/<file>` links to
    `<repo>/blobs/<hash>` of the same repository. `allow_folders` passes real sub-folders inside `folder`.
    """
    folder_real = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(path))
    roots = [folder_real]
    if folder_real.parent.name == "snapshots":
        roots.append(folder_real.parent.parent / "blobs")
    if not any(target == root or target.is_relative_to(root) for root in roots):
        raise CheckpointError(f"{path}: links to {target}, outside the model folder {folder}; refusing to copy it "
                              "into a merged model (copy the file into the folder if it belongs there)")
    if target.is_dir() and allow_folders:
        return path
    if not target.is_file():
        what = "a broken link" if not target.exists() else "not a regular file"
        raise CheckpointError(f"{path}: {what} (points to {target}); only regular files are copied into a merged "
                              "model")
    return path
