"""Ray for mergegate's distributed work (sharded evaluation, search trials): one way to join a cluster or start a
local Ray, stopping afterwards only a Ray started here.

Ray's own logging is kept to errors (its token-authentication notice and start-up lines would otherwise print at
every local start); its token authentication itself stays on. No usage statistics are sent from a run.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from ._extras import missing_extra
from .errors import MergegateError


def import_ray(error: MergegateError) -> Any:
    """The `ray` module, or `error` raised when the ray extra is not installed."""
    try:
        import ray
    except ModuleNotFoundError as exc:
        if missing_extra(exc) != "ray":
            raise
        raise error from None
    return ray


@contextmanager
def ray_session(ray: Any, address: str | None, *, num_cpus: int | None = None,
                num_gpus: int | None = None) -> Iterator[Any]:
    """Ray ready for tasks: as it is when this process already runs one; else joined at `address`, or a local Ray
    bounded to `num_cpus` (and `num_gpus`), shut down on exit."""
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **quiet)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
