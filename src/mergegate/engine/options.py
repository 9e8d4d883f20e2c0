"""The options of one merge run, in one value checked once: `merge`, `run_merge`, `release` and the CLI take it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..devices import device_problem
from ..errors import MergeOptionsError
from ..io.write import parse_size

DEFAULT_SHARD_SIZE = "5GB"
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


@dataclass(frozen=True)
class MergeOptions:
    """How a merge runs. Only `seed` (random methods) can change the merged bytes, and only those of random
    methods; the worker count, memory budget and shard size never do.

    Refused on construction (MergeOptionsError naming the field): a shard size that is not a positive size, a
    worker count that is not a whole number of at least 1, a device that is not the CPU or an available CUDA GPU.
    On a GPU the elementwise arithmetic gives the CPU's bytes; reductions (slerp's norms, rescale's L1 sums)
    may round differently in the last bits.
    """

    workers: int | None = None  # tensor chunks merged in parallel; None: every core this process may use
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes of estimated working memory admitted at once
    shard_size: str | int = DEFAULT_SHARD_SIZE  # largest safetensors shard, e.g. "5GB", "500MB" or bytes
    seed: int = 0  # seeds random methods (DARE, …) per tensor
    allow_pickle: bool = False  # load .bin/.pt weights with torch.load(weights_only=True)
    overwrite: bool = False  # replace an existing output folder (only once the merge succeeded)
    progress: bool | None = None  # a progress bar; None: when stderr is a terminal
    check_lineage: bool = True  # refuse sources that do not share the base's initialisation
    device: str = "cpu"  # where tensors are merged: "cpu", "cuda" or "cuda:N" (moved there per chunk and back)

    def __post_init__(self) -> None:
        try:
            parse_size(self.shard_size)
        except ValueError as exc:
            raise MergeOptionsError("shard_size", f": {exc}") from None
        check_device(self.device)
        workers = self.workers
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise MergeOptionsError("workers", f" must be a whole number of at least 1, got {workers!r}")


def resolve_options(options: MergeOptions | None, overrides: dict[str, Any]) -> MergeOptions:
    """`options` (default: MergeOptions()) with `overrides` (field names) replacing some of its fields, checked by
    MergeOptions itself (an unknown name is a TypeError): what the functions taking `options, **overrides` run."""
    if options is not None and not isinstance(options, MergeOptions):
        raise TypeError(f"options must be a MergeOptions, got {type(options).__name__}")
    options = options or MergeOptions()
    return replace(options, **overrides) if overrides else options


def check_device(device: object) -> None:
    """Refuse a merge device other than "cpu", "cuda" or "cuda:N" naming a GPU torch can see (`devices`)."""
    problem = device_problem(device)
    if problem is not None:
        raise MergeOptionsError("device", problem)
