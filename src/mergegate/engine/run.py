"""Execution: stream tensors through the method on a thread pool, write shards in a temporary folder,
rename it into place only when everything (weights, config, tokenizer, provenance) is complete."""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .._staging import check_output, staged
from ..errors import IncompatibleModels, MergegateError
from ..io.write import ShardedWriter, copy_model_files, parse_size
from ..methods import NonFiniteInput
from ..methods._parallel import available_cores
from ..progress import Advance, Progress
from ..recipe import Recipe
from ..vocab import align
from .options import MergeOptions, resolve_options
from .plan import MergePlan, Source, TensorJob, plan_merge
from .provenance import hash_inputs, write_provenance


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    files: list[str]
    tensors: int  # tensors written (a large tensor merged in several row chunks counts once)
    bytes_written: int
    seconds: float
    provenance: dict
    # where the time went: "read", "compute", "write", "hash" (output shards while written, inputs in the
    # background) are seconds summed over the threads doing them; "finish" (fsync, side files, provenance) is wall
    phases: dict[str, float] = field(default_factory=dict)


class _PhaseClock:
    """Seconds per phase, summed over the threads that spend them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"read": 0.0, "compute": 0.0, "write": 0.0, "hash": 0.0}
        self._lock = threading.Lock()

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now


class _ByteBudget:
    """Admits jobs while their estimated memory fits; a job larger than the budget runs alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, amount: int) -> None:
        with self._cond:
            while self.used and self.used + amount > self.limit:
                self._cond.wait()
            self.used += amount

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()


def merge(recipe: Recipe | dict | str | Path, out_dir: str | Path, options: MergeOptions | None = None, **overrides) -> MergeResult:
    """Merge the models a recipe names into `out_dir` (Hugging Face format, safetensors).

    `options` (default: MergeOptions()) with `overrides` (MergeOptions field names, e.g. `progress=False`)
    replacing some of its fields. Nothing appears at `out_dir` unless the whole merge succeeds. Raises a
    MergegateError subclass, naming the option, file, tensor or field at fault, when an input is refused.
    """
    options = resolve_options(options, overrides)
    out_dir = check_output(Path(out_dir), options.overwrite)  # refused before any model is opened
    planning = time.perf_counter()
    plan = plan_merge(recipe, allow_pickle=options.allow_pickle, seed=options.seed,
                      check_lineage=options.check_lineage)
    planned = time.perf_counter() - planning  # opening models, compatibility and lineage checks
    result = run_merge(plan, out_dir, options)
    return replace(result, phases={"plan": round(planned, 3), **result.phases})


def run_merge(plan: MergePlan, out_dir: Path, options: MergeOptions | None = None, **overrides) -> MergeResult:
    """Stream a planned merge into `out_dir`, replacing it. Of the options, the plan already holds its seed,
    pickle policy and lineage check (`plan_merge`'s); the workers, memory budget, shard size and progress
    bar are read here."""
    options = resolve_options(options, overrides)
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    shard_size, progress, memory_budget = options.shard_size, options.progress, options.memory_budget
    workers = options.workers or available_cores()
    clock = _PhaseClock()
    hasher = ThreadPoolExecutor(1, thread_name_prefix="mergegate-hash")

    def timed_hash_inputs() -> dict:
        since = time.perf_counter()
        try:
            return hash_inputs(plan)
        finally:
            clock.add("hash", since)

    input_hashes = hasher.submit(timed_hash_inputs)
    threads_before = torch.get_num_threads()
    # One intra-op thread per worker, so workers x threads = the cores without oversubscription. Parallelism
    # comes from the pool (and from row spans of one tensor, see methods._parallel); reductions (norms, sums)
    # then run in a fixed order, so the bytes do not depend on the machine's core count. (torch's thread count
    # is process-wide: it cannot differ per worker anyway.)
    torch.set_num_threads(1)
    try:
        with staged(out_dir, overwrite=True) as staging:
            writer = ShardedWriter(staging, plan.outputs, parse_size(shard_size))
            try:
                _stream(plan, writer, workers, memory_budget, progress, torch.device(options.device), clock)
                finishing = time.perf_counter()
                writer.close()
            except BaseException:
                writer.abort()
                raise
            copy_model_files(plan.checkpoints[plan.reference],
                             None if plan.vocabulary else plan.checkpoints[plan.tokenizer_source],
                             staging, plan.out_dtype, plan.config_updates)
            if plan.vocabulary:
                plan.vocabulary.save(staging)
            hashes = input_hashes.result()
            provenance = write_provenance(plan, staging, hashes, shard_size, writer.digests())
    finally:
        torch.set_num_threads(threads_before)
        hasher.shutdown(wait=True, cancel_futures=True)
    clock.add("finish", finishing)
    clock.seconds["hash"] += writer.hash_seconds
    clock.seconds["write"] -= writer.hash_seconds  # writes hash what they complete: counted as hashing
    files = sorted(p.name for p in out_dir.iterdir())
    return MergeResult(out_dir, files, len(plan.outputs), writer.total_bytes, time.perf_counter() - started, provenance,
                       {phase: round(seconds, 3) for phase, seconds in clock.seconds.items()})


def _stream(plan: MergePlan, writer: ShardedWriter, workers: int, budget_bytes: int, progress: bool | None,
            device: torch.device, clock: _PhaseClock) -> None:
    budget = _ByteBudget(budget_bytes)
    with Progress(progress) as bar:
        advance = bar.task(f"merging {len(plan.outputs)} tensors ({plan.method.name})", plan.total_bytes,
                           unit="bytes")
        _submit_all(plan, writer, workers, budget, budget_bytes, advance, device, clock)


def _submit_all(plan: MergePlan, writer: ShardedWriter, workers: int, budget: _ByteBudget, budget_bytes: int,
                advance: Advance, device: torch.device, clock: _PhaseClock) -> None:
    pending: dict[Future, TensorJob] = {}  # future -> the job it computes
    failure: BaseException | None = None

    def finish(done: set[Future]) -> None:
        nonlocal failure
        for future in done:
            job = pending.pop(future)
            budget.release(min(job.work_bytes, budget_bytes))
            error = future.exception()
            if error is not None and failure is None:
                failure = error
            elif error is None:
                advance(job.out_bytes)

    with ThreadPoolExecutor(workers, thread_name_prefix="mergegate") as pool:
        try:
            for job in plan.jobs:
                while pending and budget.used + min(job.work_bytes, budget_bytes) > budget_bytes:
                    finish(wait(pending, return_when=FIRST_COMPLETED).done)
                if failure is not None:
                    break
                budget.acquire(min(job.work_bytes, budget_bytes))
                pending[pool.submit(_compute, plan, job, writer, device, clock)] = job
            while pending:
                finish(wait(pending, return_when=FIRST_COMPLETED).done)
        finally:
            for future in pending:
                future.cancel()
    if failure is not None:
        raise failure


def _compute(plan: MergePlan, job: TensorJob, writer: ShardedWriter, device: torch.device, clock: _PhaseClock) -> None:
    since = time.perf_counter()
    if job.passthrough:
        source = job.sources[0]
        checkpoint = plan.checkpoints[source.model]
        writer.write(job.name, checkpoint.read(source.tensor).clone())
        checkpoint.release(source.tensor)
        return
    try:
        inputs = [_load(plan, source, job) for source in job.sources]
        since = clock.add("read", since)
        if job.vocabulary and plan.vocabulary is not None:
            aligned = align(plan.vocabulary, {source.model: tensor for source, tensor in zip(job.sources, inputs)})
            inputs = [aligned[source.model] for source in job.sources]
        base = inputs.pop(0) if job.base else None
        rng = torch.Generator().manual_seed(job.seed) if plan.method.random else None  # CPU draws on any device
        stats = _statistics(plan, job)
        if device.type != "cpu":  # this chunk's inputs to the GPU; tensors the method creates land there too
            base = base.to(device) if base is not None else None
            inputs = [tensor.to(device) for tensor in inputs]
            stats = [stat.to(device) if stat is not None else None for stat in stats] if stats is not None else None
            with torch.device(device):
                merged = plan.method(base, inputs, job.per_model, job.shared, rng, stats=stats)
            merged = merged.to(job.output.dtype).cpu()
        else:
            merged = plan.method(base, inputs, job.per_model, job.shared, rng, stats=stats)
        total_rows = job.output.shape[0] if job.rows else None
        merged = merged.to(job.output.dtype)
        if merged.dtype.is_floating_point and not bool(torch.isfinite(merged).all()):
            raise MergegateError(  # the inputs were checked finite: the parameters or out_dtype overflowed
                f"tensor '{job.name}': the merge gives NaN or infinite values from finite inputs; check the "
                f"recipe's parameters (huge weights, weights summing to about 0) and out_dtype's range")
        since = clock.add("compute", since)
        writer.write(job.name, merged, job.rows, total_rows)
        clock.add("write", since)
    except NonFiniteInput as exc:
        source = job.inputs[exc.index] if exc.index >= 0 or job.base is None else job.base
        tensor = plan.checkpoints[source.model].tensors[source.tensor]
        raise IncompatibleModels(
            f"tensor '{source.tensor}' of model '{source.model}' ({tensor.file}) holds NaN or infinite values"
        ) from None
    except ValueError as exc:
        raise MergegateError(f"tensor '{job.name}': {exc}") from None
    finally:
        for source in job.sources:
            plan.checkpoints[source.model].release(source.tensor, job.rows)
        _release_statistics(plan, job)


def _load(plan: MergePlan, source: Source, job: TensorJob) -> torch.Tensor:
    """The input as stored (a page-cache view), or rounded to the recipe's `dtype` as mergekit does.

    Only the base is converted to the compute dtype: methods compute `input - base` and weighted sums,
    which promote to float32 without a float32 copy of every input.
    """
    tensor = plan.checkpoints[source.model].read(source.tensor, job.rows)
    if plan.load_dtype is not None and tensor.dtype != plan.load_dtype:
        tensor = tensor.to(plan.load_dtype)
    if source == job.base or plan.compute_dtype == torch.float64:
        tensor = tensor.to(plan.compute_dtype)
    return tensor


def _statistics(plan: MergePlan, job: TensorJob) -> list[torch.Tensor | None] | None:
    """Data-aware methods: each input's calibration statistic for this tensor (its rows), None where it has none.

    Realigned vocabulary rows get none: the statistic's rows follow the source's own vocabulary.
    """
    if plan.method.statistics is None:
        return None
    found = []
    for source in job.inputs:
        stats = plan.statistics.get(source.model)
        usable = stats is not None and source.tensor in stats.tensors and not job.vocabulary
        found.append(stats.read(source.tensor, job.rows) if stats is not None and usable else None)
    return found


def _release_statistics(plan: MergePlan, job: TensorJob) -> None:
    for source in job.inputs:
        stats = plan.statistics.get(source.model)
        if stats is not None and source.tensor in stats.tensors:
            stats.release(source.tensor, job.rows)
