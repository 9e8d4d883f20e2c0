"""Backends behind one interface: in-process transformers models and OpenAI-compatible upstreams."""

from __future__ import annotations

import os

from ...errors import PlanError
from ...rollout import PlanModel
from ..config import GatewayConfig
from .base import Backend, Slot
from .local import LocalBackend
from .remote import RemoteBackend


def build_backend(name: str, spec: PlanModel, config: GatewayConfig) -> Backend:
    """The backend for one plan model: a url → RemoteBackend, a path (+ adapter) → LocalBackend."""
    ref = spec.to_ref(name)
    if ref.url is not None:
        api_key = None
        if spec.api_key_env is not None:
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                raise PlanError(f"model '{name}': its API key variable {spec.api_key_env} is not set")
        return RemoteBackend(name, ref.url, upstream_model=ref.served_model, timeout=config.backend_timeout,
                             api_key=api_key, queue_limit=config.local_queue_limit)
    assert ref.path is not None  # a ModelRef holds exactly one of url and path
    return LocalBackend(name, ref.path, adapter=ref.adapter, queue_limit=config.local_queue_limit,
                        device=config.device)


__all__ = ["Backend", "LocalBackend", "RemoteBackend", "Slot", "build_backend"]
