"""The OpenAI-compatible endpoints, plus /healthz and /metrics.

Every answer carries `x-mergegate-route` ("cohort=…; source=…; model=…; fallback=…; attempt=…[; skipped=…]")
and `x-request-id`. `POST /tokenize` (vLLM's, at the root) tokenizes with a plan model's tokenizer (tokenize.py).
`/v1/models` lists the plan's models (owned_by "mergegate", with their role) and, as
virtual models, `mergegate`/`auto` (route by cohort) and `cohort/NAME` for each route (see routing.py).

A caller that hangs up while its answer is being generated (a non-streamed request, or a stream on a buffered,
checked route, before anything was sent) cancels the generation: the model stops after its current token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Awaitable, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.trace import Status, StatusCode

from .answers import Skip, StreamStart
from .bodies import read_body
from .dispatch import close_stream
from .errors import APIError, BackendError
from .hops import HOP_HEADER, hops_after
from .protocol import ChunkWriter, Completion, GenRequest, Operation, new_id, parse_body, response_body, to_gen_request
from .routing import VIRTUAL_PREFIX, Router, Target, _unknown_model
from .tokenize import parse_tokenize, tokenize

router = APIRouter()

T = TypeVar("T")


class ClientGone(Exception):
    """The caller hung up before its answer was ready."""


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _handle(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request):
    return await _handle(request, "text_completion")


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    gateway = request.app.state.gateway
    return {"object": "list", "data": _models(gateway, await asyncio.to_thread(fingerprints, gateway.plan))}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    gateway = request.app.state.gateway
    for entry in _models(gateway, await asyncio.to_thread(fingerprints, gateway.plan)):
        if entry["id"] == model_id:
            return entry
    raise APIError(404, f"The model '{model_id}' does not exist on this gateway.", param="model",
                   code="model_not_found")


@router.post("/tokenize")
async def tokenize_prompt(request: Request):
    """vLLM's /tokenize for one of the plan's models (see tokenize.py)."""
    gateway = request.app.state.gateway
    hops = hops_after(request.headers.get(HOP_HEADER), gateway.hop_id)  # a loop is refused before anything else
    body = parse_tokenize(await read_body(request, gateway.config.max_body_bytes), gateway.config)
    if body.model in Router.virtual_models(gateway.plan):
        raise APIError(404, f"The model '{body.model}' is a route, whose models may tokenize differently; /tokenize "
                            f"takes one of this gateway's models: {', '.join(gateway.plan.models)}.",
                       param="model", code="model_not_found")
    backend = gateway.backends.get(body.model) if body.model in gateway.plan.models else None
    if backend is None:
        raise _unknown_model(gateway.plan, body.model, only_models=True)
    return await tokenize(backend, body, hops)


@router.get("/healthz")
async def healthz(request: Request):
    status, body = request.app.state.gateway.health()
    return JSONResponse(body, status_code=status)


@router.get("/metrics")
async def metrics(request: Request):
    body, content_type = request.app.state.gateway.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)


# -- completions ---------------------------------------------------------------------------------------------

async def _handle(request: Request, operation: Operation):
    gateway = request.app.state.gateway
    started = time.perf_counter()
    request_id = new_id(operation)
    endpoint = request.url.path
    span = gateway.telemetry.request_span("POST", endpoint, request_id)
    outcome: dict[str, Any] = {"cohort": "-", "model": "-", "status": 500}
    target: Target | None = None
    plan_version = 0

    def finish() -> None:
        gateway.metrics.requests.inc(endpoint, outcome["cohort"], outcome["model"], outcome["status"])
        gateway.metrics.request_duration.observe(time.perf_counter() - started, endpoint, outcome["cohort"])
        span.set_attributes({"http.response.status_code": outcome["status"], "mergegate.cohort": outcome["cohort"],
                             "mergegate.model": outcome["model"]})
        if outcome["status"] >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        if gateway.live is not None and target is not None:  # the live loop scores it, off the request path
            gateway.live.observe(target, request_id, plan_version, outcome, time.perf_counter() - started)

    streaming = False
    try:
        hops = hops_after(request.headers.get(HOP_HEADER), gateway.hop_id)  # a loop is refused before anything else
        raw = await read_body(request, gateway.config.max_body_bytes)
        body = parse_body(raw, operation)
        gen = dataclasses.replace(to_gen_request(body, gateway.config), hops=hops)
        plan_version = gateway.live.version if gateway.live is not None else 0  # the version `resolve` routes by
        target = await gateway.router.resolve(gateway.plan, body.model, gen, header=request.headers.get("x-cohort"),
                                              metadata=body.metadata)
        outcome["cohort"] = target.cohort
        await _check_prompt_size(gateway, target, gen)
        if body.stream:
            start = await _unless_disconnected(request, gateway.dispatcher.open_stream(target, gen, parent=span))
            outcome["model"] = start.model
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(gateway, target, gen, request_id, start, include_usage, outcome, finish)
            streaming = True
            return StreamingResponse(events, media_type="text/event-stream", headers={
                **_route_headers(target, start.model, start.attempt, start.skipped, request_id),
                "cache-control": "no-cache"})
        answer = await _unless_disconnected(request, gateway.dispatcher.complete(target, gen, parent=span))
        outcome.update(model=answer.model, status=200, text=answer.completion.text,
                       skipped=[(s.model, s.reason) for s in answer.skipped])
        gateway.mirror.submit(candidate=gateway.plan.candidate, target=target, request_id=request_id, request=gen,
                              primary_model=answer.model, primary_text=answer.completion.text,
                              primary_checks=answer.checks)
        return JSONResponse(response_body(operation, request_id, answer.model, answer.completion),
                            headers=_route_headers(target, answer.model, answer.attempt, answer.skipped, request_id))
    except APIError as err:
        outcome["status"] = err.status
        headers = {**err.headers, "x-request-id": request_id}
        if target is not None:
            headers["x-mergegate-route"] = _route_value(target, None, None, [])
        return JSONResponse(err.body(), status_code=err.status, headers=headers)
    except ClientGone:
        outcome["status"] = 499
        return Response(status_code=499)  # nobody is listening
    finally:
        if not streaming:
            finish()


async def _sse(gateway, target: Target, gen: GenRequest, request_id: str, start: StreamStart, include_usage: bool,
               outcome: dict, finish):
    writer = ChunkWriter(gen.operation, request_id, start.model)
    final: Completion | None = None
    try:
        opener = writer.start()
        if opener:
            yield opener
        broken = None
        try:
            async for item in start.events:
                if isinstance(item, Completion):
                    final = item
                    break
                yield writer.text(item)
        except BackendError as err:
            broken = f"failed: {err}"
        if final is None:
            # the caller already has part of this model's answer: end the stream with an error event
            outcome["status"] = 502
            yield writer.error(APIError(502, f"The stream from model '{start.model}' "
                                             f"{broken or 'ended without an answer.'}",
                                        type="server_error", code="stream_interrupted"))
            yield writer.done()
            return
        outcome.update(status=200, text=final.text, skipped=[(s.model, s.reason) for s in start.skipped])
        yield writer.finish(final.finish_reason)
        if include_usage:
            yield writer.usage(final)
        yield writer.done()
        gateway.mirror.submit(candidate=gateway.plan.candidate, target=target, request_id=request_id, request=gen,
                              primary_model=start.model, primary_text=final.text, primary_checks=start.checks)
    finally:
        if final is None and outcome["status"] == 500:
            outcome["status"] = 499  # the client went away mid-stream
        finish()
        await close_stream(start.events)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or `ClientGone` once the caller hangs up — cancelling `work` (and so the model's
    generation) rather than letting it run to completion for nobody. The body must have been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself is cancelled (server shutdown)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let it clean up: free the breaker's probe, end its span
    if not task.cancelled() and task.exception() is None:
        return task.result()  # it finished just as the caller left
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _check_prompt_size(gateway, target: Target, gen: GenRequest) -> None:
    limit = gateway.config.max_prompt_tokens
    param = "messages" if gen.operation == "chat" else "prompt"
    tokens = 0
    for name in target.chain:
        try:
            tokens = max(tokens, await gateway.backends[name].count_prompt_tokens(gen))
        except Exception as exc:  # the prompt does not render or tokenize for this model: the request's fault
            raise APIError(400, f"The {param} cannot be prepared for model '{name}': {type(exc).__name__}: {exc}",
                           param=param, code="invalid_value") from None
    if tokens > limit:
        raise APIError(400, f"This request's prompt is {tokens} tokens, above this gateway's limit of {limit} "
                            f"tokens (max_prompt_tokens). Shorten the {param}.", param=param,
                       code="context_length_exceeded")


def _route_value(target: Target, model: str | None, attempt: int | None, skipped: list[Skip]) -> str:
    parts = [f"cohort={target.cohort}", f"source={target.source}"]
    if target.route.strategy is not None and not target.pinned:
        parts.append(f"strategy={target.route.strategy.kind}")
    if model is not None:
        fallback = target.is_fallback(attempt or 0)
        parts += [f"model={model}", f"fallback={'true' if fallback else 'false'}", f"attempt={attempt}"]
    if skipped:
        parts.append("skipped=" + ",".join(f"{s.model}:{s.reason}" for s in skipped))
    return "; ".join(parts)


def _route_headers(target: Target, model: str, attempt: int, skipped: list[Skip], request_id: str) -> dict:
    return {"x-mergegate-route": _route_value(target, model, attempt, skipped), "x-request-id": request_id}


def fingerprints(plan) -> dict[str, str]:
    """The content hash of each local model's files (`io.hashing.folder_hash`, its file digests cached by path,
    size, mtime and inode, so an unchanged folder is not re-read). /v1/models reports it: the endpoint runner keys
    its cache on that entry, so a folder re-merged in place under the same name is a new model to it, never a
    stale cached one. Url models have none here (their upstream reports its own identity)."""
    from pathlib import Path

    from ..io.hashing import folder_hash

    found = {}
    for name in plan.models:
        ref = plan.model_ref(name)  # a model on a shared base: the base's folder and its adapter's
        if ref.path is None:
            continue
        try:
            router = plan.models[name].router  # a router's weights decide which adapter answers
            found[name] = folder_hash(ref.path, ref.adapter, *([Path(router)] if router else []))
        except Exception as exc:  # noqa: BLE001 — a folder that cannot be read: a fingerprint that matches nothing
            found[name] = f"unreadable: {type(exc).__name__}"
    return found


def _models(gateway, fingerprints: dict[str, str]) -> list[dict]:
    plan, created = gateway.plan, gateway.started_at
    entries = [{"id": name, "object": "model", "created": created, "owned_by": "mergegate",
                "mergegate": {"kind": "model", "role": spec.role, "backend": gateway.backends[name].kind},
                **({"fingerprint": fingerprints[name]} if name in fingerprints else {})}
               for name, spec in plan.models.items()]
    for name in Router.virtual_models(plan):
        if name.startswith(VIRTUAL_PREFIX):
            route = plan.route(name[len(VIRTUAL_PREFIX):])
            info = {"kind": "route", "model": route.model, "fallback": route.fallback, "mirror": route.mirror,
                    "check": route.check}
            if route.strategy is not None:
                info["strategy"] = route.strategy.model_dump()
            # what answers this route, as a fingerprint: an evaluation of `cohort/NAME` (the gate's endpoint
            # runner keys its cache on the /models entry) is not reused once the route or its models change
            entries.append({"id": name, "object": "model", "created": created, "owned_by": "mergegate",
                            "mergegate": info, "route_digest": route_digest(plan, route, fingerprints)})
            continue
        info = {"kind": "router", "description": "routed by cohort (X-Cohort, metadata.cohort, classifier)"}
        # the router answers with every route: its digest covers the whole plan (and how requests are classified)
        entries.append({"id": name, "object": "model", "created": created, "owned_by": "mergegate",
                        "mergegate": info, "route_digest": plan_digest(gateway, fingerprints)})
    return entries


def _digest(shape: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def route_digest(plan, route, fingerprints: dict[str, str]) -> str:
    """A hash of what answers a route: its model, fallback, check, tools and strategy, and those models' entries
    with their content fingerprints."""
    shape = route.model_dump(include={"model", "fallback", "check", "tools", "strategy"}, exclude_none=True)
    names = dict.fromkeys([*route.strategy_models(), route.model, *route.fallback])
    shape["models"] = {name: [plan.models[name].model_dump(exclude_none=True), fingerprints.get(name)]
                       for name in names}
    return _digest(shape)


def plan_digest(gateway, fingerprints: dict[str, str]) -> str:
    """A hash of what answers the router model (`mergegate`/`auto`): every route's digest, the default route's, and
    what decides a request's cohort (the classifier's identity, if the gateway has one)."""
    plan = gateway.plan
    routes = {cohort: route_digest(plan, route, fingerprints) for cohort, route in plan.routes.items()}
    classifier = getattr(gateway.router, "classifier", None)
    identity = getattr(classifier, "identity", None)
    return _digest({"routes": routes, "default": route_digest(plan, plan.default, fingerprints),
                    "classifier": identity() if callable(identity) else repr(type(classifier).__name__)})
