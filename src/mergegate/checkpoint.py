"""Hugging Face model folders: lazy safetensors reading and sharded, deterministic safetensors writing.

Reading parses each file's header once and then reads one tensor at a time with positional reads
(`os.preadv`), so memory holds only the tensors being merged, and threads can read in parallel.
Writing lays out every shard's header up front (shapes and dtypes are known from the plan), then writes
each tensor at its offset as it is finished, in any order: output bytes never depend on scheduling.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_MAX_HEADER = 100 * 1024 * 1024


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
    """Parse and validate a safetensors header; every problem names the file and tensor."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {header_len} header bytes, file has {size})")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    data_start = 8 + header_len
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code = info.get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {code!r}")
        dtype = SAFETENSORS_DTYPES[code]
        shape = tuple(int(d) for d in info.get("shape", []))
        begin, end = (int(x) for x in info.get("data_offsets", (0, -1)))
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0 or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor '{name}' ({code} {list(shape)}) has byte range [{begin}, {end}) that does not fit "
                f"its shape or the file ({size - data_start} data bytes): the file is truncated or corrupt"
            )
        refs.append(TensorRef(name, path, dtype, shape, data_start + begin, data_start + end))
    return refs


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
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
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
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_path}: not a valid index ({exc})") from None
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
        archs = self.config.get("architectures") or ["?"]
        return f"{self.config.get('model_type', '?')}/{','.join(archs)}"

    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        return None

    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

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
        names |= {p.name for p in self.tokenizer_files()}
        return sorted(self.path / n for n in names if (self.path / n).is_file())


# -- writing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


def natural_key(name: str) -> list:
    """Sort `layers.2` before `layers.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5G', or a byte count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", str(text).upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB)")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)


class ShardedWriter:
    """Writes tensors into safetensors shards whose layout is fixed before the first byte is written."""

    def __init__(self, folder: Path, tensors: Iterable[OutputTensor], shard_size: int):
        self.folder = folder
        ordered = sorted(tensors, key=lambda t: natural_key(t.name))
        shards: list[list[OutputTensor]] = [[]]
        filled = 0
        for tensor in ordered:
            if shards[-1] and filled + tensor.nbytes > shard_size:
                shards.append([])
                filled = 0
            shards[-1].append(tensor)
            filled += tensor.nbytes
        count = len(shards)
        names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self.files = [folder / n for n in names]
        self._slots: dict[str, tuple[int, int, int]] = {}  # name -> (file index, offset, nbytes)
        self._fds = []
        self._weight_map = {}
        self.total_bytes = sum(t.nbytes for t in ordered)
        for index, (file, shard) in enumerate(zip(self.files, shards)):
            header, offset = {}, 0
            for tensor in shard:
                header[tensor.name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                                       "data_offsets": [offset, offset + tensor.nbytes]}
                offset += tensor.nbytes
                self._weight_map[tensor.name] = file.name
            encoded = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
            data_start = 8 + len(encoded)
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, struct.pack("<Q", len(encoded)) + encoded, 0)
            os.ftruncate(fd, data_start + offset)
            self._fds.append(fd)
            for tensor in shard:
                begin = header[tensor.name]["data_offsets"][0]
                self._slots[tensor.name] = (index, data_start + begin, tensor.nbytes)
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None,
              total_rows: int | None = None) -> None:
        """Write a whole tensor, or rows [start, stop) of it (of `total_rows`); rows may come in any order."""
        index, offset, nbytes = self._slots[name]
        if rows is not None:
            row_bytes = nbytes // total_rows
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        data = memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())
        if len(data) != nbytes:
            raise ValueError(f"tensor '{name}' has {len(data)} bytes, its slot {nbytes}")
        done = 0
        while done < nbytes:
            done += os.pwrite(self._fds[index], data[done:], offset + done)
        with self._lock:
            self._written[name] = self._written.get(name, 0) + nbytes

    def close(self) -> None:
        """Flush to disk; write the index when sharded. Raises if any tensor was never written."""
        missing = {name for name, (_, _, nbytes) in self._slots.items() if self._written.get(name, 0) != nbytes}
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {sorted(missing)[:3]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(self._weight_map.items(), key=lambda kv: natural_key(kv[0])))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_folder() -> Path:
    """$MERGEGATE_CACHE, default ~/.cache/mergegate: input hashes, adapters folded into their base."""
    return Path(os.environ.get("MERGEGATE_CACHE", Path.home() / ".cache" / "mergegate"))


class HashCache:
    """sha256 of input files, remembered by (path, size, mtime, inode): re-merging the same sources — the
    usual loop when comparing recipes — does not re-read gigabytes just to hash them. A changed file has a
    new mtime or size and is hashed again. Stored in $MERGEGATE_CACHE (default ~/.cache/mergegate)."""

    def __init__(self, folder: Path | None = None):
        self.path = Path(folder or cache_folder()) / "sha256.json"
        self._lock = threading.Lock()
        try:
            self._entries: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            self._entries = {}

    @staticmethod
    def _key(path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"

    def sha256(self, path: Path) -> str:
        key = self._key(path)
        with self._lock:
            if key in self._entries:
                return self._entries[key]
        digest = sha256_file(path)
        with self._lock:
            self._entries[key] = digest
        return digest

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_suffix(f".{os.getpid()}.tmp")
            with self._lock:
                staging.write_text(json.dumps(self._entries, indent=0, sort_keys=True))
            staging.replace(self.path)
        except OSError:
            pass  # a cache that cannot be written only costs time


def copy_model_files(source: Checkpoint, tokenizer_source: Checkpoint | None, folder: Path, out_dtype: torch.dtype,
                     config_updates: dict | None = None) -> None:
    """Copy config (with `config_updates` applied) and generation config from the base, tokenizer files from the
    tokenizer source."""
    config = {**source.config, **(config_updates or {})}
    dtype_name = str(out_dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype_name
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = source.path / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / generation.name)
    for file in tokenizer_source.tokenizer_files() if tokenizer_source else ():
        shutil.copyfile(file, folder / file.name)
