"""The settings of one evaluation, in one value checked once: `evaluate_models`, `gate_release`, `release`, the
search and the CLI take it (as a merge takes `MergeOptions`). Importing it never imports torch or Ray."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from .._extras import install_hint
from ..devices import check_device, default_device
from ..errors import EvaluationError
from ..model_ref import EndpointSettings

NEEDS_RAY = f"sharded evaluation (workers > 1 or a Ray address) needs the ray extra: {install_hint('ray')}"


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation runs. Only `max_new_tokens` and the device's dtype (bfloat16 on CUDA, float32 on the
    CPU) can change an answer, and so are in the registry's cache key; the rest change only how fast answers come
    (see `evaluate.runner`).

    Refused on construction (EvaluationError naming each bad setting): a batch size, token budget, thread or
    worker count that is not a whole number of at least 1, a blank Ray address, sharding without the ray extra,
    bad endpoint settings (`EndpointSettings.problems`), and a device that is not the CPU or a CUDA GPU torch sees.
    """

    batch_size: int = 32  # rows generated together (local models)
    max_new_tokens: int = 64  # the longest completion
    device: str | None = None  # "cpu", "cuda" or "cuda:N"; None: "cuda" when torch sees a GPU, else "cpu"
    threads: int | None = None  # torch's intra-op threads during the run; None: half the cores, at least one
    progress: bool | None = None  # a progress bar; None: when stderr is a terminal
    force: bool = False  # evaluate again even when the registry holds a finished run
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)  # how url models are called
    workers: int | None = None  # > 1: Ray shards of rows × models (the ray extra)
    ray_address: str | None = None  # a Ray cluster to run the shards on

    def __post_init__(self) -> None:
        problems = self._setting_problems()
        if isinstance(self.endpoint, EndpointSettings):
            problems += self.endpoint.problems()
        else:
            problems.append(f"endpoint must be EndpointSettings, got {type(self.endpoint).__name__}")
        if problems:
            raise EvaluationError("evaluate: " + "; ".join(problems))
        if self.device is not None:
            check_device(self.device, EvaluationError)

    def _setting_problems(self) -> list[str]:
        problems = []
        for name, what, optional in (("batch_size", "batch size", False), ("max_new_tokens", "max new tokens", False),
                                     ("threads", "threads", True), ("workers", "workers", True)):
            value = getattr(self, name)
            if not (optional and value is None) and (not _whole(value) or value < 1):
                problems.append(f"{what} must be an integer >= 1, got {value!r}")
        address = self.ray_address
        if address is not None and (not isinstance(address, str) or not address.strip()):
            problems.append(f"ray address must be a Ray cluster address (e.g. ray://HOST:10001 or auto), "
                            f"got {address!r}")
        elif not problems and self.sharded and importlib.util.find_spec("ray") is None:
            problems.append(NEEDS_RAY)
        return problems

    @property
    def sharded(self) -> bool:
        """Whether rows run as Ray shards (`evaluate.sharded`) rather than in this process."""
        return self.ray_address is not None or (self.workers or 1) > 1

    @property
    def resolved_device(self) -> str:
        """`device`, or where models run when none is given ("cuda" when torch sees a GPU, else "cpu")."""
        return self.device if self.device is not None else default_device()


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
