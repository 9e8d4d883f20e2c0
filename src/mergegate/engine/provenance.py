"""Provenance: `mergegate.json` beside a built model — recipe, input and output hashes, versions, seed.

One record for every build (a merge, a mixture of experts): `write_record` writes the fields they share, each
kind adds its own details. It holds no timestamps or output paths, so the same recipe and inputs rebuild it
byte for byte.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._staging import destination
from ..io.hashing import file_digests, output_digests, sha256_file
from .plan import MergePlan

if TYPE_CHECKING:
    from ..io.read import Checkpoint

PROVENANCE_FILE = "mergegate.json"
FORMAT = "mergegate.provenance/1"


@dataclass(frozen=True)
class Build:
    """What a model was built from and how: the fields every `mergegate.json` holds."""

    recipe: dict  # the recipe (or MoE config) as validated, defaults filled in
    method: str  # the merge method, or "moe"
    seed: int
    base_model: str | None
    tokenizer_source: str
    out_dtype: str  # e.g. "bfloat16"
    shard_size: str | int
    inputs: dict[str, dict]  # hash_checkpoints of the input models
    details: dict = field(default_factory=dict)  # what this kind of build adds (calibration, the router, ...)


def hash_checkpoints(checkpoints: Mapping[str, Checkpoint]) -> dict[str, dict]:
    """sha256 of every file that defines each input model (weights, index, config, tokenizer)."""
    files = {ref: ck.input_files() for ref, ck in checkpoints.items()}
    digests = file_digests(path for paths in files.values() for path in paths)
    return {ref: {"path": str(checkpoints[ref].path.resolve()), "files": {p.name: digests[p] for p in paths}}
            for ref, paths in files.items()}


def hash_inputs(plan: MergePlan) -> dict[str, dict]:
    return hash_checkpoints(plan.checkpoints)


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
    """A merge's record. `weight_digests`: the shards' sha256 by file name, when the writer hashed them as it
    wrote them."""
    build = Build(plan.recipe.model_dump(exclude_none=True, mode="json"), plan.method.name, plan.seed, plan.base,
                  plan.tokenizer_source, str(plan.out_dtype).removeprefix("torch."), shard_size, input_hashes,
                  {"calibration": _calibration(plan)} if plan.statistics else {})
    return write_record(build, folder, weight_digests)


def write_record(build: Build, folder: Path, weight_digests: dict[str, str] | None = None) -> dict:
    """Write `folder`/mergegate.json for `build`, with the versions and the sha256 of every file in `folder`."""
    # remembered in the hash cache under the output's final paths: evaluating the model then reads no file twice
    outputs = output_digests(folder, destination(folder), weight_digests)
    record = {
        "format": FORMAT,
        "recipe": build.recipe,
        "method": build.method,
        "seed": build.seed,
        "base_model": build.base_model,
        "tokenizer_source": build.tokenizer_source,
        "out_dtype": build.out_dtype,
        "shard_size": str(build.shard_size),
        "inputs": build.inputs,
        **build.details,
        "versions": versions(),
        "outputs": outputs,
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
