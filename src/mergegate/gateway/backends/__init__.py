"""Backends behind one interface: in-process transformers models and OpenAI-compatible upstreams."""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import PlanError
from ...model_ref import ModelRef
from ...rollout import PlanModel, RolloutPlan
from ..config import GatewayConfig
from .base import Backend, Slot
from .local import LocalBackend
from .remote import RemoteBackend
from .shared import AdapterBackend, SharedBase


def build_backends(plan: RolloutPlan, config: GatewayConfig) -> dict[str, Backend]:
    """A backend per plan model. The models on one local base (`bases:`) are views of one SharedBase holding
    the base once with all their adapters; a model on a url base calls that server by the adapter's name."""
    shared: dict[str, SharedBase] = {}
    for base_name, base in plan.bases.items():
        if base.path is not None:
            adapters = {name: Path(str(spec.adapter)) for name, spec in plan.models.items()
                        if spec.base == base_name and spec.adapter is not None}
            shared[base_name] = SharedBase(base_name, base.path, adapters, queue_limit=config.local_queue_limit,
                                           device=config.device)
    backends: dict[str, Backend] = {}
    for name, spec in plan.models.items():
        if spec.base in shared:
            router = _router(name, spec, shared[spec.base]) if spec.router is not None else None
            backends[name] = AdapterBackend(name, shared[spec.base], name if spec.adapter is not None else None,
                                            router)
        else:
            backends[name] = build_backend(name, spec, config, ref=plan.model_ref(name))
    return backends


def _router(name: str, spec: PlanModel, shared: SharedBase):
    """The saved router a model names, read now (a bad one is the plan's fault, said before anything loads)."""
    from ...errors import EvaluationError
    from ...evaluate.adapter_router import AdapterRouter

    try:
        router = AdapterRouter.load(str(spec.router))
    except EvaluationError as exc:
        raise PlanError(f"model '{name}' router: {exc}") from None
    if router.base.resolve() != shared.path.resolve():
        raise PlanError(f"model '{name}' router: trained on base {router.base}, not on base '{shared.name}' "
                        f"({shared.path})")
    return router


def build_backend(name: str, spec: PlanModel, config: GatewayConfig, *, ref: ModelRef | None = None) -> Backend:
    """The backend for one plan model: a url → RemoteBackend, a path (+ adapter) → LocalBackend. `ref`: where the
    model is when the plan says it (a model on a url base); default: the entry's own location."""
    ref = ref if ref is not None else spec.to_ref(name)
    if ref.url is not None:
        api_key = None
        key_env = ref.endpoint.api_key_env if ref.endpoint is not None else None
        if key_env is not None:
            api_key = os.environ.get(key_env)
            if not api_key:
                raise PlanError(f"model '{name}': its API key variable {key_env} is not set")
        return RemoteBackend(name, ref.url, upstream_model=ref.served_model, timeout=config.backend_timeout,
                             api_key=api_key, queue_limit=config.local_queue_limit)
    assert ref.path is not None  # a ModelRef holds exactly one of url and path
    return LocalBackend(name, ref.path, adapter=ref.adapter, queue_limit=config.local_queue_limit,
                        device=config.device)


__all__ = ["AdapterBackend", "Backend", "LocalBackend", "RemoteBackend", "SharedBase", "Slot", "build_backend",
           "build_backends"]
