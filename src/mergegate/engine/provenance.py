"""Provenance: `mergegate.json` beside the merged model — recipe, input and output hashes, versions, seed.

It holds no timestamps or output paths, so the same recipe and inputs rebuild it byte for byte.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from .._staging import destination
from ..io.hashing import file_digests, output_digests, sha256_file
from .plan import MergePlan

PROVENANCE_FILE = "mergegate.json"


def hash_inputs(plan: MergePlan) -> dict[str, dict]:
    """sha256 of every file that defines each input model (weights, index, config, tokenizer)."""
    files = {ref: ck.input_files() for ref, ck in plan.checkpoints.items()}
    digests = file_digests(path for paths in files.values() for path in paths)
    return {ref: {"path": str(plan.checkpoints[ref].path.resolve()), "files": {p.name: digests[p] for p in paths}}
            for ref, paths in files.items()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("mergegate", "torch", "safetensors", "tokenizers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _calibration(plan: MergePlan) -> dict:
    """The calibration text each data-aware input learned its statistics from: it shapes the bytes too."""
    from ..calibration import resolve_calibration_path

    entries = {entry.model: entry for entry in plan.recipe.models or []}
    record = {}
    for ref in plan.statistics:
        own = entries[ref].calibration if ref in entries else None
        given = own or (plan.recipe.calibration.path if plan.recipe.calibration else None)
        if given is None:  # plan_statistics refuses such a recipe before any statistics exist
            raise ValueError(f"model '{ref}' has calibration statistics but no calibration text")
        path = resolve_calibration_path(given, plan.recipe.folder)
        record[ref] = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    return record


def write_provenance(plan: MergePlan, folder: Path, input_hashes: dict, shard_size,
                     weight_digests: dict[str, str] | None = None) -> dict:
    """`weight_digests`: the shards' sha256 by file name, when the writer hashed them as it wrote them."""
    # remembered in the hash cache under the output's final paths: evaluating the merge then reads no file twice
    outputs = output_digests(folder, destination(folder), weight_digests)
    record = {
        "format": "mergegate.provenance/1",
        "recipe": plan.recipe.model_dump(exclude_none=True, mode="json"),
        "method": plan.method.name,
        "seed": plan.seed,
        "base_model": plan.base,
        "tokenizer_source": plan.tokenizer_source,
        "out_dtype": str(plan.out_dtype).removeprefix("torch."),
        "shard_size": str(shard_size),
        "inputs": input_hashes,
        **({"calibration": _calibration(plan)} if plan.statistics else {}),
        "versions": versions(),
        "outputs": outputs,
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
