"""Running the rows still to run: one model's rows in the calling process (`run_model_rows`: a local model
through `evaluate.local`, a url model through `evaluate.endpoint`), or every model's sharded on Ray, shards of
(rows × models), each a Ray task (`run_sharded`).

The runner (`runner._evaluate`) keeps everything that touches the registry in the driver: cache checks, opening
or resuming a run (a `PendingRun`), finishing it. Only the running of rows is here. Each model's rows are sorted
by prompt length and cut into `workers` contiguous chunks, so each shard's batches stay length-bucketed; every
chunk of every model is one Ray task (one CPU, and one GPU when the device is CUDA; its torch threads set to its
CPUs) that runs `run_model_rows` and returns its RowResults. The driver collects them with `ray.wait` as shards finish and
writes them to the registry: the one writer, so SQLite never sees two. A failed shard stops the evaluation
(the shards still queued are cancelled); the rows already written stay, and the next run resumes after them.

A row's answer does not depend on the rows it is batched with (runner's module docstring), so a sharded run
records the same outputs, scores and token counts as one process; latency is measured per row as always.

Ray is imported only here, when a sharded run starts (`import mergegate` never imports it); without the `ray`
extra the run is refused with the install line. Ray already initialised in this process is used as it is;
otherwise mergegate joins `ray_address` when given, or starts a local Ray with `workers` CPUs, and shuts down
only what it started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from .._ray import import_ray, ray_session
from ..errors import EvaluationError, MergegateError
from ..model_ref import ModelRef, Role
from ..progress import Advance
from ..registry import Registry, RowResult
from . import endpoint as _endpoint
from . import local
from .endpoint import EndpointSettings
from .options import NEEDS_RAY, EvalOptions
from .suite import SuiteRow

TASK_CPUS = 1  # each shard's CPUs, and so its torch threads: small models gain little from more


@dataclass(frozen=True)
class PendingRun:
    """A model's opened run and the suite rows it still lacks (all of them, or those an interrupted run left)."""

    ref: ModelRef
    role: Role
    model_hash: str
    run_id: int
    rows: list[SuiteRow]
    advance: Advance  # its progress bar
    budgets: dict[str, int] | None = None  # a url model's token budget per row (endpoint.prepare)

    def record(self, registry: Registry, results: list[RowResult]) -> None:
        registry.add_results(self.run_id, results)  # committed as they come: a crash loses one batch
        self.advance(len(results))


def run_model_rows(ref: ModelRef, model_hash: str, rows: list[SuiteRow], *, batch_size: int, max_new_tokens: int,
                   device: str, endpoint: EndpointSettings, budgets: dict[str, int] | None,
                   on_results: Callable[[list[RowResult]], None]) -> None:
    """Run one model on `rows`: a local model loaded on `device` and generated in length-bucketed batches, a url
    model through its server (`budgets` from endpoint.prepare). `on_results` gets each batch's results (a url
    model's: each row's) as they are done, in the calling thread. Used in this process and by each Ray shard."""
    if not rows:
        return
    if ref.is_remote:
        _endpoint.run_rows(ref, model_hash, rows, budgets or {}, endpoint, lambda result: on_results([result]))
        return
    local.run_rows(ref, model_hash, rows, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                   on_results=on_results)


def split_rows(rows: list[SuiteRow], count: int) -> list[list[SuiteRow]]:
    """`rows` sorted by prompt length and cut into at most `count` contiguous chunks of near-equal size."""
    ordered = sorted(rows, key=local.length_order)
    size = math.ceil(len(ordered) / count) if ordered else 1
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def shard_endpoint(ref: ModelRef, endpoint: EndpointSettings, shards: int) -> tuple[ModelRef, EndpointSettings]:
    """What each of url model `ref`'s `shards` shards is called with: the model's effective settings (its own
    over the command's `endpoint`) with their concurrency shared among the shards, so the model keeps that many
    requests in flight in all; and `ref` without its own settings, so the worker (`endpoint.run_rows`) does not
    lay them over the shared ones again."""
    own = ref.endpoint_settings(endpoint)
    return replace(ref, endpoint=None), replace(own, concurrency=max(1, own.concurrency // max(1, shards)))


def _run_shard(ref: ModelRef, model_hash: str, rows: list[SuiteRow], batch_size: int, max_new_tokens: int,
               device: str, endpoint: EndpointSettings, budgets: dict[str, int] | None) -> list[RowResult]:
    """One shard, in a Ray worker: its rows' results (nothing is written here; the driver writes them)."""
    import torch

    torch.set_num_threads(TASK_CPUS)
    results: list[RowResult] = []
    run_model_rows(ref, model_hash, rows, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                   endpoint=endpoint, budgets=budgets, on_results=results.extend)
    return results


def run_sharded(pending: list[PendingRun], registry: Registry, options: EvalOptions, device: str) -> None:
    """Run every pending run's rows as Ray shards on `device` and record their results in `registry` (from this
    process) as each shard finishes. `options.workers`: chunks per model, and the local Ray's CPUs when mergegate
    starts one (default with `options.ray_address`: the cluster's CPUs, or GPUs on CUDA)."""
    if not any(todo.rows for todo in pending):
        return
    ray = import_ray(EvaluationError(NEEDS_RAY))
    workers = options.workers
    with ray_session(ray, options.ray_address, num_cpus=workers):
        on_gpu = device.startswith("cuda")
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("GPU" if on_gpu else "CPU", 1)))
        _run_and_record(ray, pending, registry, workers, options, device)


def _run_and_record(ray: Any, pending: list[PendingRun], registry: Registry, workers: int, options: EvalOptions,
                    device: str) -> None:
    # Ray gives a GPU task its GPU as the only visible one, so the task asks for "cuda", whatever cuda:N the
    # driver was given (the cache key holds only the device kind).
    task_device = "cuda" if device.startswith("cuda") else device
    shard = ray.remote(_run_shard)
    in_flight = {}
    for todo in pending:
        chunks = split_rows(todo.rows, workers)
        resources: dict[str, Any] = {"num_cpus": TASK_CPUS, "max_retries": 0}
        ref, settings = todo.ref, options.endpoint
        if todo.ref.is_remote:
            ref, settings = shard_endpoint(todo.ref, options.endpoint, len(chunks))
            # The model's key (its own variable's or the command's) travels inside the task's arguments, which Ray
            # keeps in memory; never as a runtime environment variable, which Ray writes into its logs.
            settings = settings.with_key()
        elif task_device != "cpu":
            resources["num_gpus"] = 1
        for rows in chunks:
            task = shard.options(**resources).remote(ref, todo.model_hash, rows, options.batch_size,
                                                     options.max_new_tokens, task_device, settings, todo.budgets)
            in_flight[task] = todo
    try:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            todo = in_flight.pop(done[0])
            try:
                results = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, MergegateError):  # the worker's one-line refusal, not Ray's traceback
                    raise exc.cause from None
                raise
            todo.record(registry, results)
    finally:
        for task in in_flight:  # only after a failure: the rest would be wasted work
            ray.cancel(task)
