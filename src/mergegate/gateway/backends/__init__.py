"""Backends behind one interface: in-process transformers models and OpenAI-compatible upstreams."""

from __future__ import annotations

from ...rollout import PlanModel
from ..config import GatewayConfig
from .base import Backend, Slot
from .local import LocalBackend
from .remote import RemoteBackend


def build_backend(name: str, spec: PlanModel, config: GatewayConfig) -> Backend:
    """The backend for one plan model: `url` → RemoteBackend, `path` (+ `adapter`) → LocalBackend."""
    if spec.url is not None:
        return RemoteBackend(name, spec.url, upstream_model=spec.upstream_model, timeout=config.backend_timeout,
                             queue_limit=config.local_queue_limit)
    assert spec.path is not None  # PlanModel holds exactly one of url and path
    return LocalBackend(name, spec.path, adapter=spec.adapter, queue_limit=config.local_queue_limit)


__all__ = ["Backend", "LocalBackend", "RemoteBackend", "Slot", "build_backend"]
