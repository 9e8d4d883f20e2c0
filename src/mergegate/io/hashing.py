"""Content hashes of files and model folders, and the cache that saves re-reading unchanged files.

One home for "what is in this file / this model": the sha256 of a file, the digests remembered in
$MERGEGATE_CACHE (`HashCache`), a model's identity for the registry (`folder_hash`), the key of an adapter
folded into its base (`all_files_hash`), and the digests of a merge's outputs (`output_digests`), which are
remembered so that evaluating a fresh merge does not read its files again.

Importing this module does not import torch: the registry and the gateway use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from ..errors import RegistryError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Everything besides the weights that changes what a model answers: its architecture, its default generation
# settings (generate() applies generation_config.json), its tokenizer (vocabulary, special tokens, whether a
# BOS is added, the chat template), and an adapter's configuration.
IDENTITY_FILES = ("config.json", "generation_config.json", "adapter_config.json", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json", "adapter_model.safetensors.index.json")


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
    def _key(path: Path, resolved: Path | None = None) -> str:
        stat = path.stat()
        return f"{resolved or path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"

    def sha256(self, path: Path) -> str:
        key = self._key(path)
        with self._lock:
            if key in self._entries:
                return self._entries[key]
        digest = sha256_file(path)
        with self._lock:
            self._entries[key] = digest
        return digest

    def remember(self, path: Path, digest: str, *, final_path: Path | None = None) -> None:
        """Record `digest` as the content of `path` (just hashed by the caller), under the path the file will
        have once its folder is renamed into place (`final_path`): a rename keeps size, mtime and inode."""
        resolved = None
        if final_path is not None:  # the folder may not exist yet: resolve what does, its parent
            resolved = Path(os.path.realpath(final_path.parent.parent)) / final_path.parent.name / final_path.name
        key = self._key(path, resolved)
        with self._lock:
            self._entries[key] = digest

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_suffix(f".{os.getpid()}.tmp")
            with self._lock:
                staging.write_text(json.dumps(self._entries, indent=0, sort_keys=True))
            staging.replace(self.path)
        except OSError:
            pass  # a cache that cannot be written only costs time


def file_digests(files: Iterable[Path], *, threads: int = 2) -> dict[Path, str]:
    """sha256 of each file, from the cache where unchanged, the rest read on `threads` threads."""
    files = list(dict.fromkeys(files))
    cache = HashCache()
    with ThreadPoolExecutor(threads) as pool:
        digests = dict(zip(files, pool.map(cache.sha256, files)))
    cache.save()
    return digests


def output_digests(folder: Path, final_folder: Path | None = None, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file of a freshly written output `folder`, by name, remembered in the cache under the
    files' paths in `final_folder` (where `folder`, a staging folder, is about to be renamed). `known` gives
    digests already computed while writing (by file name): those files are not read again."""
    cache = HashCache()
    digests = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digests[path.name] = digest = (known or {}).get(path.name) or sha256_file(path)
            cache.remember(path, digest, final_path=Path(final_folder or folder).absolute() / path.name)
    cache.save()
    return digests


def identity_files(folder: Path) -> list[Path]:
    """The files of a model (or adapter) folder that define its answers, sorted by name."""
    from .read import TOKENIZER_FILES  # imported here: reading imports torch, hashing must not

    names = set(IDENTITY_FILES) | set(TOKENIZER_FILES)
    return [file for file in sorted(Path(folder).iterdir())
            if file.is_file() and (file.suffix in WEIGHT_SUFFIXES or file.name in names)]


def folder_hash(*folders: Path | None) -> str:
    """Content hash of the files on disk that define a model, over one or more folders (a model, its adapter).

    Hashes the bytes of the weights, config, generation config, tokenizer files and chat template — never
    what a `mergegate.json` says they were, so replacing a file changes the hash. File digests come from the
    input-hash cache (`HashCache`, keyed by path, size, mtime and inode), so an unchanged model is not
    re-read. Each folder's position is part of the hash: a model and the same model as an adapter differ.
    """
    cache = HashCache()
    digest = hashlib.sha256(b"mergegate-model-identity/2\n")
    for position, folder in enumerate(folders):
        if folder is None:
            continue
        folder = Path(folder)
        if not folder.is_dir():
            raise RegistryError(f"model folder {folder}: no such folder")
        files = identity_files(folder)
        if not files:
            raise RegistryError(f"model folder {folder}: no weights, config or tokenizer files to identify it by")
        digest.update(f"folder {position}\n".encode())
        for file in files:
            digest.update(f"{file.name}\0{cache.sha256(file)}\n".encode())
    cache.save()
    return digest.hexdigest()


def all_files_hash(*folders: Path) -> str:
    """Content hash of every regular file directly in the folders, by name, in order (what a model folded
    with an adapter is cached by: any change to either input gives a new one)."""
    cache = HashCache()
    digest = hashlib.sha256()
    for folder in folders:
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(f"{file.name}:{cache.sha256(file)};".encode())
    cache.save()
    return digest.hexdigest()
