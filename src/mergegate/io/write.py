"""Writing model folders: sharded, deterministic safetensors and the side files copied from the inputs.

Writing lays out every shard's header up front (shapes and dtypes are known from the plan), then writes
each tensor at its offset as it is finished, in any order: output bytes never depend on scheduling.
Each shard's sha256 (for the provenance) is computed while the merge runs: whichever write completes the
next stretch of a file hashes it from the page cache, so hashing overlaps compute instead of re-reading
every output at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CheckpointError
from .read import SAFETENSORS_DTYPES, Checkpoint, contained_file

DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


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


MAX_SHARD_SIZE = 1 << 50  # 1 PiB: beyond any disk; larger values are typos (or 400-digit numbers)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5G', or a byte count: a whole number of bytes from 1 to MAX_SHARD_SIZE, else
    ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB)")
    if isinstance(text, int):
        value = text
    else:
        shown = str(text) if len(str(text)) <= 40 else str(text)[:37] + "..."
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)i?B?\s*", str(text).upper())
        if not match:
            raise ValueError(f"not a size: {shown!r} (use e.g. 5GB, 500MB)")
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2)]
        if len(match.group(1)) > 30:
            raise ValueError(f"size {shown!r} is too large (at most {MAX_SHARD_SIZE} bytes)")
        value = int(Fraction(match.group(1)) * scale)  # exact: no float overflow or rounding
    if value < 1:
        raise ValueError(f"size {text!r} is not positive")
    if value > MAX_SHARD_SIZE:
        raise ValueError(f"size {str(text)[:40]!r} is too large (at most {MAX_SHARD_SIZE} bytes)")
    return value


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
        self._fds: list[int] = []
        self._weight_map: dict[str, str] = {}
        self.total_bytes = sum(t.nbytes for t in ordered)
        header_ends: list[int] = []
        for index, (file, shard) in enumerate(zip(self.files, shards)):
            header: dict[str, dict] = {}
            offset = 0
            for tensor in shard:
                header[tensor.name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                                       "data_offsets": [offset, offset + tensor.nbytes]}
                offset += tensor.nbytes
                self._weight_map[tensor.name] = file.name
            encoded = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
            data_start = 8 + len(encoded)
            header_ends.append(data_start)
            try:
                fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # read back for the hash
                self._fds.append(fd)
                os.pwrite(fd, struct.pack("<Q", len(encoded)) + encoded, 0)
                os.ftruncate(fd, data_start + offset)
            except OSError as exc:
                self.abort()
                raise CheckpointError(f"{file}: cannot be written ({exc.strerror or exc})") from None
            for tensor in shard:
                begin = header[tensor.name]["data_offsets"][0]
                self._slots[tensor.name] = (index, data_start + begin, tensor.nbytes)
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()
        # progressive sha256 per file: bytes [0, hashed) are in the digest; `finished` holds the written stretches
        # beyond it (start -> end), merged into the digest in file order
        self.hash_seconds = 0.0  # time spent hashing, summed over the threads (for the merge's time breakdown)
        self._digests = [hashlib.sha256() for _ in self.files]
        self._hashed = [0] * len(self.files)
        self._finished: list[dict[int, int]] = [{} for _ in self.files]
        self._hash_locks = [threading.Lock() for _ in self.files]
        for index, header_end in enumerate(header_ends):
            self._hash_ahead(index, 0, header_end)

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None,
              total_rows: int | None = None) -> None:
        """Write a whole tensor, or rows [start, stop) of it (of `total_rows`); rows may come in any order."""
        index, offset, nbytes = self._slots[name]
        if rows is not None:
            if total_rows is None:
                raise ValueError(f"tensor '{name}': rows given without total_rows")
            row_bytes = nbytes // total_rows
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        data = memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())  # type: ignore[arg-type]
        if len(data) != nbytes:
            raise ValueError(f"tensor '{name}' has {len(data)} bytes, its slot {nbytes}")
        done = 0
        while done < nbytes:
            done += os.pwrite(self._fds[index], data[done:], offset + done)
        with self._lock:
            self._written[name] = self._written.get(name, 0) + nbytes
        self._hash_ahead(index, offset, offset + nbytes)

    def _hash_ahead(self, index: int, start: int, end: int) -> None:
        """Record [start, end) of file `index` as written; hash the file's completed prefix if no one else is."""
        with self._lock:
            if end > start:
                self._finished[index][start] = end
        lock = self._hash_locks[index]
        while lock.acquire(blocking=False):  # another thread hashing this file will pick this stretch up
            try:
                while True:
                    with self._lock:
                        stop = self._finished[index].pop(self._hashed[index], None)
                    if stop is None:
                        break
                    self._digest_range(index, self._hashed[index], stop)
                    self._hashed[index] = stop
            finally:
                lock.release()
            with self._lock:  # a stretch finished while the lock was being released: go round again
                if self._hashed[index] not in self._finished[index]:
                    return

    def _digest_range(self, index: int, start: int, stop: int, block: int = 1 << 24) -> None:
        since = time.perf_counter()
        for position in range(start, stop, block):
            self._digests[index].update(os.pread(self._fds[index], min(block, stop - position), position))
        self.hash_seconds += time.perf_counter() - since  # under this file's hash lock; one file at a time

    def digests(self) -> dict[str, str]:
        """sha256 of each shard by file name; call after `close`."""
        return {file.name: digest.hexdigest() for file, digest in zip(self.files, self._digests)}

    def close(self) -> None:
        """Flush to disk; write the index when sharded. Raises if any tensor was never written."""
        missing = {name for name, (_, _, nbytes) in self._slots.items() if self._written.get(name, 0) != nbytes}
        if not missing:
            for position, fd in enumerate(self._fds):  # whatever no write got round to hashing
                self._hash_ahead(position, 0, 0)
                if self._hashed[position] != os.fstat(fd).st_size:
                    raise RuntimeError(f"{self.files[position]}: hashed {self._hashed[position]} bytes of its "
                                       f"{os.fstat(fd).st_size}")
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


def copy_model_files(source: Checkpoint, tokenizer_source: Checkpoint | None, folder: Path, out_dtype: torch.dtype,
                     config_updates: dict | None = None) -> None:
    """Copy config (with `config_updates` applied) and generation config from the base, tokenizer files from the
    tokenizer source. Only regular files inside each model folder are copied (see `contained_file`)."""
    config = {**source.config, **(config_updates or {})}
    dtype_name = str(out_dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype_name
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = source.path / "generation_config.json"
    if os.path.lexists(generation):
        shutil.copyfile(contained_file(generation, source.path), folder / generation.name)
    for file in tokenizer_source.tokenizer_files() if tokenizer_source else ():
        shutil.copyfile(file, folder / file.name)
