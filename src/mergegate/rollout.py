"""Rollout plans: cohort → model, fallback chain, mirrored share, online check. Written by the gate,
served by the gateway, changed at run time only through the gateway's admin API."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._yaml import load_yaml_model
from .addresses import check_url
from .errors import PlanError
from .model_ref import EndpointOverrides, ModelRef, Role

if TYPE_CHECKING:  # annotations only: the gateway reads plans without the gate's or the suite's modules
    from .evaluate.suite import Suite
    from .gate import GateResult, Policy

OnlineCheck = Literal["json_valid", "refusal", "tool_selection"]
# The online check a route runs, from the evaluators its cohort's suite rows use: the first one found, in this order.
ONLINE_CHECKS: dict[str, OnlineCheck] = {"json_schema": "json_valid", "json_valid": "json_valid",
                                         "tool_selection": "tool_selection", "refusal": "refusal"}


class PlanBase(BaseModel):
    """A base the plan declares once (`bases: {NAME: ...}`) for the models that name it (`base: NAME`): a local
    folder, loaded once by the gateway, each model's adapter applied per request on it (the base alone, for a model
    with no adapter); or an OpenAI-compatible server holding LoRA modules (vLLM's `--enable-lora --lora-modules
    NAME=PATH`), where a model's adapter is the module's name, sent as the request's model."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    url: str | None = None
    upstream_model: str | None = None  # the name the server knows the base alone by (a model with no adapter)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.url is None):
            raise ValueError("a base needs exactly one of 'path' or 'url'")
        if self.path is not None and (self.upstream_model is not None or self.api_key_env is not None):
            raise ValueError("'upstream_model' and 'api_key_env' apply to a 'url', not to a local 'path'")
        if self.url is not None:
            check_url(self.url)
        return self


class PlanModel(BaseModel):
    """A plan's model entry (its YAML schema): a ModelRef with its role, the name being the entry's key.
    A local folder (optionally with an adapter), a remote upstream URL, or an adapter on one of the plan's
    `bases` (`base: NAME`, `adapter`: a folder on a local base, a LoRA module's name on a url base; no adapter:
    the base alone)."""

    model_config = ConfigDict(extra="forbid")
    role: Role = "source"
    base: str | None = None  # a key of the plan's `bases`: the model is that base with `adapter` on it
    path: str | None = None
    adapter: str | None = None
    router: str | None = None  # on a local base: a saved adapter router's folder, which picks each request's adapter
    url: str | None = None  # an OpenAI-compatible upstream, e.g. http://127.0.0.1:8000/v1
    upstream_model: str | None = None  # the name the upstream knows it by (ModelRef.served_model)
    # the environment variable holding the upstream's API key (the gateway sends it as a bearer token)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _one_location(self):
        if self.base is not None:
            given = [key for key in ("path", "url", "upstream_model", "api_key_env") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"a model on a 'base' takes its location from the base: no {', '.join(given)}")
            if self.router is not None and self.adapter is not None:
                raise ValueError("a 'router' picks the adapter per request: give no 'adapter' beside it")
            return self
        if self.router is not None:
            raise ValueError("a 'router' applies to a model on a local 'base'")
        if (self.path is None) == (self.url is None):
            raise ValueError("a model needs exactly one of 'path', 'url' or 'base'")
        if self.url is not None and self.adapter is not None:
            raise ValueError("an 'adapter' applies to a local 'path', not to a 'url'")
        if self.path is not None and self.upstream_model is not None:
            raise ValueError("'upstream_model' applies to a 'url', not to a local 'path'")
        if self.path is not None and self.api_key_env is not None:
            raise ValueError("'api_key_env' applies to a 'url', not to a local 'path'")
        if self.url is not None:
            check_url(self.url)  # AddressError is a ValueError: the entry is named with it
        return self

    @classmethod
    def from_ref(cls, ref: ModelRef, role: Role) -> PlanModel:
        """The entry for `ref`; local paths made absolute (`RolloutPlan.save` writes them relative to the plan).
        Of a url model's own endpoint settings only its API key variable is kept: the gateway has its own
        timeouts and concurrency."""
        return cls(role=role, path=str(ref.path.absolute()) if ref.path is not None else None,
                   adapter=str(ref.adapter.absolute()) if ref.adapter is not None else None,
                   url=ref.url, upstream_model=ref.served_model,
                   api_key_env=ref.endpoint.api_key_env if ref.endpoint is not None else None)

    def to_ref(self, name: str) -> ModelRef:
        return ModelRef(name, Path(self.path) if self.path is not None else None,
                        adapter=Path(self.adapter) if self.adapter is not None else None,
                        url=self.url, served_model=self.upstream_model,
                        endpoint=EndpointOverrides(api_key_env=self.api_key_env) if self.api_key_env else None)


StrategyKind = Literal["hedge", "race", "vote", "cascade"]
HEDGE_DELAY_MS = 200  # a hedge's default wait before it asks the next model


class Strategy(BaseModel):
    """How a route answers with several models at once (the gateway's `ensembles` module): `hedge` (the next model
    also asked when no good answer came within `delay_ms`), `race` (all at once), `vote` (the plurality of `k`
    answers), `cascade` (the next model only when the previous one's answer fails). `models` defaults to the
    route's model then its fallback chain."""

    model_config = ConfigDict(extra="forbid")
    kind: StrategyKind
    models: list[str] | None = None
    delay_ms: int | None = Field(None, ge=0, le=600_000)  # hedge: wait before asking the next model (None: 200)
    k: int | None = Field(None, ge=1, le=16)  # vote: answers to collect (models cycled); None: one per model

    @model_validator(mode="after")
    def _own_settings(self):
        if self.k is not None and self.kind != "vote":
            raise ValueError(f"'k' applies to a vote, not to a {self.kind}")
        if self.delay_ms is not None and self.kind != "hedge":
            raise ValueError(f"'delay_ms' applies to a hedge, not to a {self.kind}")
        return self


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    fallback: list[str] = []
    mirror: float = Field(0.0, ge=0, le=1)  # share of this cohort's requests also sent to the candidate
    decision: Literal["promote", "hold", "reject", "manual"] | None = None
    check: OnlineCheck | None = None  # online check whose failure triggers fallback
    tools: list[str] | None = None  # for the tool_selection check
    strategy: Strategy | None = None  # answer with several models (None: the model, then the fallback chain)
    # a live canary (the gateway's live tests, docs/live.md): the share of this cohort's requests the plan's candidate
    # answers, drawn at random per request (its model then falls back for it); the rest go to `model`
    canary: float | None = Field(None, ge=0, le=1)  # None: no canary (written only when set)
    mirror_to: str | None = None  # the model mirrored requests go to (None: the plan's candidate)

    def strategy_models(self) -> list[str]:
        """The models a strategy asks, in order (its own list, else the route's model and fallback chain)."""
        if self.strategy is None:
            return []
        return list(dict.fromkeys(self.strategy.models or [self.model, *self.fallback]))


class RolloutPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    candidate: str
    bases: dict[str, PlanBase] = {}  # bases shared by the models that name them (written only when there are some)
    models: dict[str, PlanModel]
    routes: dict[str, Route]
    default: Route

    @model_validator(mode="after")
    def _known_models(self):
        if self.candidate not in self.models:
            raise ValueError(f"candidate '{self.candidate}' is not among models ({', '.join(self.models)})")
        for name, entry in self.models.items():
            if entry.base is not None and entry.base not in self.bases:
                raise ValueError(f"models.{name}.base: '{entry.base}' is not among bases "
                                 f"({', '.join(self.bases) or 'none declared'})")
            if entry.router is not None and self.bases[str(entry.base)].path is None:
                raise ValueError(f"models.{name}.router: a router picks among adapters on a local base, and base "
                                 f"'{entry.base}' is a url")
        for cohort, route in [*self.routes.items(), ("default", self.default)]:
            for name in [route.model, *route.fallback, *route.strategy_models(), *filter(None, [route.mirror_to])]:
                if name not in self.models:
                    raise ValueError(f"route '{cohort}' names model '{name}', which is not among models "
                                     f"({', '.join(self.models)})")
        return self

    @classmethod
    def from_decisions(cls, gate: GateResult, models: dict[str, PlanModel], suite: Suite,
                       policy: Policy) -> RolloutPlan:
        """The plan the gate decided: a route per cohort (its model, fallback chain and mirrored share), each with
        the online check its suite rows use. The default route copies the route of `policy.default_route`'s
        cohort (without its decision); without one, it is the base model, unmirrored."""
        routes = {}
        for d in gate.decisions:
            rows = suite.by_cohort(d.cohort)
            evaluators = {name for row in rows for name in row.evaluators}
            check = next((ONLINE_CHECKS[e] for e in ONLINE_CHECKS if e in evaluators), None)
            tools = sorted({t for row in rows for t in (row.tools or ())}) if check == "tool_selection" else None
            routes[d.cohort] = Route(model=d.model, fallback=list(d.fallback), mirror=d.mirror_share,
                                     decision=d.decision, check=check, tools=tools)
        if policy.default_route is None:
            default = Route(model=next(name for name, m in models.items() if m.role == "base"))
        elif policy.default_route in routes:
            default = routes[policy.default_route].model_copy(update={"decision": None})
        else:
            raise PlanError(f"policy default_route {policy.default_route!r}: the gate decided no such cohort "
                            f"(decided: {', '.join(routes)})")
        return cls(candidate=gate.candidate, models=models, routes=routes, default=default)

    @classmethod
    def single_model(cls, name: str, model: PlanModel) -> RolloutPlan:
        """A plan that answers every request with one model (`name`, the candidate): no cohorts, no fallback."""
        return cls(candidate=name, models={name: model}, routes={}, default=Route(model=name))

    def with_cascades(self, escalate_to: dict[str, str], default_cohort: str | None = None) -> RolloutPlan:
        """This plan with every cohort's route a `cascade`: the candidate answers first, and `escalate_to[cohort]`
        when that answer fails the route's online check; the rest of the route's fallback chain stays behind them,
        its mirrored share and decision go (the candidate answers every request itself). The default route becomes
        `default_cohort`'s (none: it stays as it is). Checked as a loaded plan is."""
        routes = {}
        for cohort, route in self.routes.items():
            models = list(dict.fromkeys([self.candidate, escalate_to[cohort]]))
            routes[cohort] = route.model_copy(update={"model": self.candidate, "mirror": 0.0, "decision": None,
                                                      "fallback": [m for m in route.fallback if m not in models],
                                                      "strategy": Strategy(kind="cascade", models=models)})
        return type(self)(candidate=self.candidate, models=self.models, routes=routes,
                          default=routes.get(default_cohort or "", self.default))

    def route(self, cohort: str | None) -> Route:
        return self.routes.get(cohort or "", self.default)

    def model_ref(self, name: str) -> ModelRef:
        """The plan's model `name` as a ModelRef; an adapter on a local base is `base path + adapter`, on a url base
        the server's model named as the adapter (a LoRA module) or, without one, as the base."""
        entry = self.models[name]
        if entry.base is None:
            return entry.to_ref(name)
        base = self.bases[entry.base]
        if base.path is not None:
            return ModelRef(name, Path(base.path), adapter=Path(entry.adapter) if entry.adapter else None)
        return ModelRef(name, url=base.url, served_model=entry.adapter or base.upstream_model,
                        endpoint=EndpointOverrides(api_key_env=base.api_key_env) if base.api_key_env else None)

    def adapter_path(self, name: str) -> bool:
        """Whether model `name`'s adapter is a folder (a local model's) rather than a LoRA module's name."""
        entry = self.models[name]
        return entry.adapter is not None and (entry.base is None or self.bases[entry.base].path is not None)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = self.model_dump(exclude_none=True)
        if not data["bases"]:
            del data["bases"]  # a plan without shared bases is written as it was before they existed
        for entry in [*data["models"].values(), *data.get("bases", {}).values()]:  # portable: relative paths
            for key in ("path", "adapter", "router"):
                if key in entry and Path(entry[key]).is_absolute():
                    entry[key] = os.path.relpath(entry[key], path.parent.absolute())
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


def load_plan(path: str | Path) -> RolloutPlan:
    """A rollout plan from its YAML file, local paths resolved from the plan's folder. Anything wrong raises
    PlanError naming the file and the line (UTF-8, YAML) or the field, or the model whose folder is missing."""
    path = Path(path)
    where = f"rollout plan {path}"
    plan = load_yaml_model(path, RolloutPlan, where=where, what=f"plan fields ({', '.join(RolloutPlan.model_fields)})",
                           error_cls=PlanError)
    located: list[tuple[str, PlanModel | PlanBase, tuple[str, ...]]]
    located = [(f"model '{name}'", entry, ("path", "router", *(("adapter",) if plan.adapter_path(name) else ())))
               for name, entry in plan.models.items()]
    located += [(f"base '{name}'", entry, ("path",)) for name, entry in plan.bases.items()]
    for what, entry, keys in located:
        for key in keys:
            value = getattr(entry, key)
            if value is None:
                continue
            try:
                if not Path(value).is_absolute():
                    value = str((path.parent / value).resolve())
                    setattr(entry, key, value)
                found = Path(value).is_dir()
            except (OSError, ValueError, RuntimeError) as exc:  # a NUL, a name too long, a symlink loop
                raise PlanError(f"{where}: {what} {key} {value!r} is not a usable path ({exc})") from None
            if not found:
                raise PlanError(f"rollout plan {path}: {what} {key} {value} is not a folder "
                                "(local paths are relative to the plan file; nothing is downloaded)")
    return plan
