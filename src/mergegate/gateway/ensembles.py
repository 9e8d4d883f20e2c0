"""Ensembles at the gateway: a route whose plan entry has a `strategy` answers with several models.

  * `hedge`: ask the first model; when no good answer has come `delay_ms` after the last model was asked (or
    every model asked so far has failed), also ask the next; the first good answer wins, the others are cancelled.
  * `race`: ask every model at once; the first good answer wins, the others are cancelled.
  * `vote`: collect `k` answers (the models in turn, cycled when k exceeds them: k samples); the good ones vote by
    their canonical form — the parsed JSON object on a `json_valid` route, the tool calls on a `tool_selection`
    route, else the text without surrounding whitespace (as `exact_match` reads it). The form with the most votes
    wins, ties going to the form whose first vote came from the earlier model; its earliest answer is returned.
    Once one form holds a strict majority of k the rest are cancelled.
  * `cascade`: ask the models one after another, escalating only when an answer fails (an error, a failed check).

A good answer passes the route's online check (checks.py; a refusal counts only with `fallback_on_refusal`) and
has content. When the strategy finds none, the route's own `fallback` models that the strategy did not ask are
tried in order, as on a plain route. Every call goes through `Dispatcher.attempt`: breakers, timeouts, spans and
`mergegate_fallbacks_total` are as on a plain route (a cancelled loser releases its breaker and ends its span
as "cancelled").

What the strategy cost is recorded per request: `mergegate_strategy_requests_total{cohort,strategy,winner}`,
`mergegate_strategy_calls_total{cohort,strategy,model,outcome}` (won, answered, rejected, failed, cancelled: each
call counted once, under how it ended — a losing call whose answer came before it could be cancelled is `answered`,
its tokens among the extra tokens),
`mergegate_strategy_extra_calls_total{cohort,strategy}` (calls beyond the one a plain route makes) and
`mergegate_strategy_extra_tokens_total{cohort,strategy,type}` (tokens of answers not returned), and the same on
the request's span as `mergegate.strategy.*` attributes. A route without a strategy never reaches this module.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from ..evaluate.evaluators import parse_json_object, parse_tool_calls
from ..rollout import HEDGE_DELAY_MS, Route
from .answers import Answer, Skip
from .dispatch import Dispatcher
from .protocol import GenRequest
from .routing import Target

# how one call of a strategy ended (the `outcome` label)
WON, ANSWERED, REJECTED, FAILED, CANCELLED = "won", "answered", "rejected", "failed", "cancelled"


@dataclass
class Call:
    """One model's part in a strategy: its answer (good or not) and how the call ended."""

    model: str
    index: int
    answer: Answer | None = None  # a good answer
    rejected: Answer | None = None  # an answer that failed its check or had no content
    skipped: list[Skip] = field(default_factory=list)
    outcome: str = FAILED
    started: bool = True  # False when its breaker was open: no upstream call was made


@dataclass
class Ledger:
    """Every call a strategy made, for the cost it records."""

    kind: str
    calls: list[Call] = field(default_factory=list)
    votes: int | None = None  # vote: the winning form's votes

    def skipped(self) -> list[Skip]:
        return [s for call in sorted(self.calls, key=lambda c: c.index) for s in call.skipped]


async def run_strategy(dispatcher: Dispatcher, target: Target, request: GenRequest, parent=None) -> Answer:
    route = target.route
    assert route.strategy is not None
    kind, members = route.strategy.kind, route.strategy_models()
    ledger = Ledger(kind)
    started = time.perf_counter()
    if kind == "cascade":
        winner = await _cascade(dispatcher, target, request, parent, members, ledger)
    elif kind == "vote":
        winner = await _vote(dispatcher, target, request, parent, members, route.strategy.k or len(members),
                             ledger)
    else:
        delay_ms = route.strategy.delay_ms if route.strategy.delay_ms is not None else HEDGE_DELAY_MS
        delay = 0.0 if kind == "race" else delay_ms / 1000
        winner = await _first_good(dispatcher, target, request, parent, members, delay, ledger)
    if winner is None:  # the route's own fallback models the strategy did not ask, as on a plain route
        rest = [name for name in route.fallback if name not in members]
        winner = await _cascade(dispatcher, target, request, parent, rest, ledger, first_index=len(members))
    _record(dispatcher, target, ledger, winner, parent, time.perf_counter() - started)
    if winner is None:
        raise dispatcher._exhausted(target, ledger.skipped())
    return Answer(winner.model, winner.completion, winner.attempt, winner.checks, ledger.skipped())


async def _ask(dispatcher: Dispatcher, target: Target, request: GenRequest, parent, call: Call) -> Call:
    rejected: list[Answer] = []
    try:
        answer = await dispatcher.attempt(target, request, call.model, call.index, parent, call.skipped,
                                          answered=rejected)
    except asyncio.CancelledError:
        call.outcome = CANCELLED
        raise
    call.started = not (call.skipped and call.skipped[-1].reason == "circuit_open")
    if answer is not None and not answer.completion.text.strip():
        rejected.append(answer)
        dispatcher._skip(target, call.skipped, Skip(call.model, "empty", "answered with no content"))
        answer = None
    call.answer, call.rejected = answer, (rejected[0] if rejected else None)
    call.outcome = ANSWERED if answer is not None else REJECTED if rejected else FAILED
    return call


async def _cascade(dispatcher, target, request, parent, members: list[str], ledger: Ledger,
                   first_index: int = 0) -> Answer | None:
    for offset, name in enumerate(members):
        call = Call(name, first_index + offset)
        ledger.calls.append(call)
        await _ask(dispatcher, target, request, parent, call)
        if call.answer is not None:
            return call.answer
    return None


async def _first_good(dispatcher, target, request, parent, members: list[str], delay: float,
                      ledger: Ledger) -> Answer | None:
    """hedge (delay > 0) and race (delay 0): the first good answer; the calls still running are cancelled."""
    running: dict[asyncio.Task, Call] = {}
    following, next_at = 0, 0.0

    def launch() -> None:
        nonlocal following, next_at
        call = Call(members[following], following)
        ledger.calls.append(call)
        running[asyncio.ensure_future(_ask(dispatcher, target, request, parent, call))] = call
        following += 1
        next_at = time.monotonic() + delay

    try:
        while True:
            while following < len(members) and (not running or time.monotonic() >= next_at):
                launch()
            if not running:
                return None
            wait = max(0.0, next_at - time.monotonic()) if following < len(members) else None
            done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: running[t].index):
                call = running.pop(task)
                task.result()
                if call.answer is not None:
                    return call.answer
    finally:
        await _cancel(running)


async def _vote(dispatcher, target, request, parent, members: list[str], k: int, ledger: Ledger) -> Answer | None:
    running: dict[asyncio.Task, Call] = {}
    for index in range(k):
        call = Call(members[index % len(members)], index)
        ledger.calls.append(call)
        running[asyncio.ensure_future(_ask(dispatcher, target, request, parent, call))] = call
    forms: dict[str, list[Call]] = {}
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                call = running.pop(task)
                task.result()
                if call.answer is not None:
                    forms.setdefault(canonical(target.route, call.answer.completion.text), []).append(call)
            if any(len(voters) * 2 > k for voters in forms.values()):
                break  # a strict majority: the answers still out cannot change the result
    finally:
        await _cancel(running)
    if not forms:
        return None
    voters = min(forms.values(), key=lambda calls: (-len(calls), min(c.index for c in calls)))
    ledger.votes = len(voters)
    return min(voters, key=lambda c: c.index).answer


async def _cancel(running: dict[asyncio.Task, Call]) -> None:
    """Cancel the calls still running and wait for them to release their breakers and end their spans."""
    for task in running:
        task.cancel()
    if running:
        await asyncio.wait(running)
    for task, call in running.items():
        if task.cancelled():
            call.outcome = CANCELLED


def canonical(route: Route, text: str) -> str:
    """The form a vote compares: the JSON object (keys sorted), the tool calls, else the stripped text."""
    if route.check == "json_valid":
        value, _ = parse_json_object(text)
        if value is not None:
            return "json:" + json.dumps(value, sort_keys=True, separators=(",", ":"))
    elif route.check == "tool_selection":
        calls, _ = parse_tool_calls(text)
        if calls:
            return "tools:" + json.dumps([[c.name, c.arguments] for c in calls], sort_keys=True)
    return "text:" + text.strip()


def _record(dispatcher: Dispatcher, target: Target, ledger: Ledger, winner: Answer | None, parent,
            seconds: float) -> None:
    metrics, cohort, kind = dispatcher.metrics, target.cohort, ledger.kind
    made = [call for call in ledger.calls if call.started]
    extra_in = extra_out = 0
    for call in made:
        if winner is not None and call.answer is winner:
            call.outcome = WON
        metrics.strategy_calls.inc(cohort, kind, call.model, call.outcome)
        answered = call.answer or call.rejected
        if answered is not None and answered is not winner:
            extra_in += answered.completion.prompt_tokens
            extra_out += answered.completion.completion_tokens
    extra_calls = max(0, len(made) - 1)
    metrics.strategy_requests.inc(cohort, kind, winner.model if winner is not None else "-")
    metrics.strategy_extra_calls.inc(cohort, kind, amount=extra_calls)
    metrics.strategy_extra_tokens.inc(cohort, kind, "input", amount=extra_in)
    metrics.strategy_extra_tokens.inc(cohort, kind, "output", amount=extra_out)
    if parent is None:
        return
    attributes = {
        "mergegate.strategy": kind, "mergegate.strategy.calls": len(made),
        "mergegate.strategy.extra_calls": extra_calls,
        "mergegate.strategy.models": [call.model for call in made],
        "mergegate.strategy.outcomes": [call.outcome for call in made],
        "mergegate.strategy.cancelled": sum(call.outcome == CANCELLED for call in made),
        "mergegate.strategy.extra_input_tokens": extra_in, "mergegate.strategy.extra_output_tokens": extra_out,
        "mergegate.strategy.winner": winner.model if winner is not None else "", "mergegate.strategy.seconds": seconds,
    }
    if ledger.votes is not None:
        attributes["mergegate.strategy.votes"] = ledger.votes
    parent.set_attributes(attributes)
