"""Which cohort a request belongs to, and so which models answer it.

The request's `model` decides first:
  * one of the plan's models → pinned: that model answers, with no fallback and no mirroring (the caller
    asked for it by name); the cohort (from the header or metadata, else "default") is kept for metrics;
  * `mergegate` or `auto` → routed by cohort;
  * `cohort/NAME` → routed as cohort NAME (a virtual model; `/v1/models` lists one per route);
  * anything else → 404 model_not_found.
A routed request's cohort is, in order: the `X-Cohort` header, `metadata.cohort`, the `cohort/NAME` model,
the classifier (when a suite was given), else the plan's default route. A cohort the plan does not route is
ignored and the next signal decides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..rollout import RolloutPlan, Route
from .classifier import CohortClassifier
from .errors import APIError
from .protocol import GenRequest

AUTO_MODELS = ("mergegate", "auto")
VIRTUAL_PREFIX = "cohort/"
DEFAULT = "default"


@dataclass(frozen=True)
class Target:
    cohort: str  # a cohort the plan routes, or "default"
    source: str  # header | metadata | model | classifier | default | pinned
    route: Route
    chain: tuple[str, ...]  # models to try, in order
    pinned: bool = False
    score: float | None = None  # the classifier's cosine, when it decided
    arm: str | None = None  # on a route with a live canary: "candidate" or "served", drawn for this request

    def is_fallback(self, attempt: int) -> bool:
        """Whether the chain's `attempt`-th model answers as a fallback: on a route with a strategy, only a model of
        the route's own fallback list that the strategy did not ask (its members are the strategy's choice)."""
        if self.route.strategy is not None and not self.pinned:
            return attempt >= len(self.route.strategy_models())
        return attempt > 0


class Router:
    def __init__(self, classifier: CohortClassifier | None = None):
        self.classifier = classifier

    @staticmethod
    def virtual_models(plan: RolloutPlan) -> list[str]:
        return [*AUTO_MODELS, *(VIRTUAL_PREFIX + c for c in [*plan.routes, DEFAULT] if c)]

    async def resolve(self, plan: RolloutPlan, model: str, request: GenRequest, *, header: str | None,
                      metadata: dict[str, str] | None) -> Target:
        def routed(cohort: str | None) -> bool:
            return bool(cohort) and (cohort == DEFAULT or cohort in plan.routes)

        signals = [("header", (header or "").strip()), ("metadata", (metadata or {}).get("cohort", "").strip())]
        if model in plan.models:
            cohort = next((value for _, value in signals if routed(value)), DEFAULT)
            return Target(cohort, "pinned", Route(model=model), (model,), pinned=True)
        if model.startswith(VIRTUAL_PREFIX):
            name = model[len(VIRTUAL_PREFIX):]
            if not routed(name):
                raise _unknown_model(plan, model)
            signals.append(("model", name))
        elif model not in AUTO_MODELS:
            raise _unknown_model(plan, model)
        for source, value in signals:
            if routed(value):
                return self._target(plan, value, source)
        if self.classifier is not None:
            found = await self.classifier.classify_async(request.routing_text())
            if found.cohort is not None and routed(found.cohort):
                return self._target(plan, found.cohort, "classifier", found.score)
            return self._target(plan, DEFAULT, "default", found.score)
        return self._target(plan, DEFAULT, "default")

    @staticmethod
    def _target(plan: RolloutPlan, cohort: str, source: str, score: float | None = None) -> Target:
        route = plan.route(cohort)
        chain = tuple(dict.fromkeys([*route.strategy_models(), route.model, *route.fallback]))
        if route.canary and route.strategy is None and plan.candidate != route.model:
            # a canary: the candidate answers a random share, falling back along the route's chain
            if random.random() < route.canary:
                return Target(cohort, source, route, tuple(dict.fromkeys([plan.candidate, *chain])), score=score,
                              arm="candidate")
            return Target(cohort, source, route, chain, score=score, arm="served")
        return Target(cohort, source, route, chain, score=score)


def _unknown_model(plan: RolloutPlan, model: str, *, only_models: bool = False) -> APIError:
    """404 model_not_found listing what may be asked for: the plan's models, and (unless `only_models`, for
    requests a route cannot answer, such as /tokenize) the virtual ones."""
    names = ", ".join([*plan.models, *([] if only_models else Router.virtual_models(plan))])
    return APIError(404, f"The model '{model}' does not exist on this gateway. Available: {names}.",
                    param="model", code="model_not_found")
