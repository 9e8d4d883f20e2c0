"""Trials as Ray tasks: a local Ray bounded to the cores the search is given, or a cluster at `ray_address`.

Each trial declares its resources (CPUs, GPUs, memory for its merge and evaluation) and runs once: a crashed
worker or an out-of-memory kill is the trial's outcome (failed, with Ray's reason), never a retry that could
crash again. On a cluster the search's output folder must be on storage every node sees (the trials write their
merged folders there), and every node needs mergegate installed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .._extras import install_hint
from .._ray import import_ray, ray_session
from ..errors import SearchError
from .trial import TrialOutcome, TrialSpec, run_trial

if TYPE_CHECKING:
    from .run import SearchOptions


def _carrying_key(spec: TrialSpec) -> TrialSpec:
    """The spec with its endpoint's API key read here and carried inside the task's arguments (kept in Ray's
    memory, never in its logs, as a runtime environment variable would be), for a node that lacks the variable."""
    return replace(spec, eval=replace(spec.eval, endpoint=spec.eval.endpoint.with_key()))


def _ray():
    return import_ray(SearchError(f"search: trials run on Ray, which is not installed ({install_hint('search')})"))


class TrialRunner:
    """Runs rounds of trials on Ray; Ray is started on entry (unless already running) and stopped on exit only
    if this runner started it."""

    def __init__(self, options: SearchOptions):
        self.options = options
        self._session = ray_session(_ray(), options.ray_address, num_cpus=options.parallel * options.cpus_per_trial,
                                    num_gpus=int(options.parallel * options.gpus_per_trial + 0.999))

    def __enter__(self) -> TrialRunner:
        self._session.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._session.__exit__(*exc)

    def run(self, specs: list[TrialSpec]) -> dict[int, TrialOutcome]:
        """Every spec's outcome, by trial number; a task Ray could not finish is a failed outcome."""
        ray = _ray()
        task = ray.remote(run_trial).options(
            num_cpus=self.options.cpus_per_trial, num_gpus=self.options.gpus_per_trial,
            memory=self.options.memory_per_trial, max_retries=0)
        pending = {task.remote(_carrying_key(spec)): spec.number for spec in specs}
        outcomes: dict[int, TrialOutcome] = {}
        for ref, number in pending.items():
            try:
                outcomes[number] = ray.get(ref)
            except ray.exceptions.RayError as exc:  # worker crashed, killed for memory, task cancelled
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                outcomes[number] = TrialOutcome(number, "failed", reason=f"{type(exc).__name__}: {first}"[:500])
        return outcomes
