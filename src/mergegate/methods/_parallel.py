"""One tensor's work spread over the cores: independent pieces (row spans, per-model selections) on a shared pool.

The engine runs one tensor per worker; when one tensor dominates (an embedding, a TIES merge that cannot be
cut into row jobs because its top-k needs the whole tensor), its pieces run here instead of on one thread.
A worker waits while its pieces run, so at most about the cores are busy however many workers submit.
Each piece writes its own rows and reads nothing another piece writes, so the bytes do not depend on how
many run at once.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(available_cores(), thread_name_prefix="mergegate-span")
        return _pool


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`[fn(item) for item in items]`, the items on the shared pool (in order; the first error is raised).

    Called from a span-pool thread itself it runs serially, so nested calls cannot exhaust the pool.
    """
    items = list(items)
    if len(items) < 2 or available_cores() < 2 or threading.current_thread().name.startswith("mergegate-span"):
        return [fn(item) for item in items]
    device = torch.get_default_device()  # a merge on a GPU sets it per worker thread (`with torch.device`)
    if device.type == "cpu":
        return list(_shared_pool().map(fn, items))

    def on_device(item: T) -> R:
        with torch.device(device):
            return fn(item)

    return list(_shared_pool().map(on_device, items))
