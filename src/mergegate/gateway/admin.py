"""The admin API: read the live plan, point one cohort at another model (promote or roll back), with a reason.

Both endpoints need `Authorization: Bearer <token>`: 401 without one, 403 with a wrong one (and 403 always
when the gateway was started without an admin token). A change replaces the plan in memory (copy-on-write,
so requests in flight keep the plan they started with), sets the route's `decision` to "manual", is
recorded in the registry (`plan_changes`: cohort, old and new model, reason, actor, time) and, with
`persist_plan`, written back to the plan file atomically. The route's fallback chain is left as it is; a
model that is both the route's model and in its fallback is tried once.

Bodies are read and decoded within the same bounds as the API's (bodies.py), with their own byte limit
(`max_admin_body_bytes`, 413 above it).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..rollout import RolloutPlan
from .bodies import load_json, read_body
from .errors import APIError, validation_error
from .routing import DEFAULT

router = APIRouter(prefix="/admin")


class RouteChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256, strict=True)
    reason: str = Field(min_length=1, max_length=4096, strict=True)
    actor: str = Field("admin", max_length=256, strict=True)


class PlanStore:
    """The live rollout plan and how it changes."""

    def __init__(self, plan: RolloutPlan, *, registry, path: str | Path | None = None, persist: bool = False):
        self.plan, self.registry = plan, registry
        self.path = Path(path) if path else None
        self.persist = persist and self.path is not None
        self._lock = asyncio.Lock()

    async def set_route(self, cohort: str, change: RouteChange) -> dict:
        plan = self.plan
        if cohort != DEFAULT and cohort not in plan.routes:
            raise APIError(404, f"The plan has no cohort '{cohort}'. Cohorts: {', '.join([*plan.routes, DEFAULT])}.",
                           param="cohort", code="cohort_not_found")
        if change.model not in plan.models:
            raise APIError(400, f"The plan has no model '{change.model}'. Models: {', '.join(plan.models)}.",
                           param="model", code="model_not_found")
        if not change.reason.strip():
            raise APIError(400, "A route change needs a non-empty 'reason'.", param="reason", code="invalid_value")
        async with self._lock:
            plan = self.plan
            old = plan.route(cohort)
            new = old.model_copy(update={"model": change.model, "decision": "manual"})
            if cohort in plan.routes:
                updated = plan.model_copy(update={"routes": {**plan.routes, cohort: new}})
            else:
                updated = plan.model_copy(update={"default": new})
            self.plan = updated
            await asyncio.to_thread(self.registry.record_plan_change, cohort, old.model, change.model,
                                    change.reason.strip(), change.actor)
            if self.persist:
                await asyncio.to_thread(self._save, updated)
        return {"cohort": cohort, "old_model": old.model, "new_model": change.model, "reason": change.reason.strip(),
                "actor": change.actor, "persisted": self.persist}

    async def replace(self, plan: RolloutPlan) -> None:
        """Serve `plan` from now on (the live loop's steps; requests in flight keep the plan they started with),
        written back to the plan file with `persist_plan`."""
        async with self._lock:
            self.plan = plan
            if self.persist:
                await asyncio.to_thread(self._save, plan)

    def _save(self, plan: RolloutPlan) -> None:
        assert self.path is not None, "persisting needs the plan's path"
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        plan.save(tmp)
        os.replace(tmp, self.path)


def authorize(request: Request) -> None:
    token = request.app.state.gateway.admin_token
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if not header or scheme.lower() != "bearer" or not value.strip():
        raise APIError(401, "The admin API needs 'Authorization: Bearer <token>'.", type="authentication_error",
                       code="missing_token", headers={"WWW-Authenticate": "Bearer"})
    if token is None:
        raise APIError(403, "The admin API is disabled: start the gateway with an admin token.",
                       type="permission_error", code="admin_disabled")
    if not secrets.compare_digest(value.strip().encode(), token.encode()):
        raise APIError(403, "The admin token is not valid.", type="permission_error", code="invalid_token")


@router.get("/plan")
async def get_plan(request: Request) -> dict:
    authorize(request)
    gateway = request.app.state.gateway
    return {"plan": gateway.store.plan.model_dump(exclude_none=True),
            "path": str(gateway.store.path) if gateway.store.path else None, "persist": gateway.store.persist}


@router.post("/routes/{cohort}")
async def set_route(cohort: str, request: Request) -> dict:
    authorize(request)
    raw = await read_body(request, request.app.state.gateway.config.max_admin_body_bytes)
    data = load_json(raw or b"null")  # bounded like the API's bodies: 413 / 400, never a 500
    try:
        change = RouteChange.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    gateway = request.app.state.gateway
    before = gateway.store.plan
    changed = await gateway.store.set_route(cohort, change)
    if gateway.live is not None:  # a cohort under a live test: the test ends there, recorded as a plan step
        await gateway.live.manual_route(cohort, before, change.actor, change.reason.strip())
    return changed
