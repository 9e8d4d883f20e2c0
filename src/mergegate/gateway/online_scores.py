"""Reference-free scores of live answers, for the live tests (live.py): what can be said of an answer without a
reference answer. Per cohort, from its route, the suite's rows and the policy's `live` block:

- `json_schema` when every suite row of the cohort checks one shared schema, else `json_valid` when the route checks
  JSON (the same tests as the evaluators of those names);
- `tool_selection` when the route checks tools: the answer calls one of the route's tools;
- `refusal` when the policy says the cohort must refuse (`live.must_refuse`): 1 when the answer refuses;
- `length` and `latency` when the policy bounds them (`live.max_answer_chars`, `live.max_latency_ms`): 0 beyond.

An answer's score is the lowest of its sources' (a row is only as good as its weakest check, as in the gate); an
answer no source applies to has no score and is not counted. A pairwise judge (`PairwiseJudge`) compares two answers
to one request in both orders, so a judge that prefers whichever answer comes first scores a tie.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..evaluate.evaluators import JsonSchema, Observation, is_refusal
from .checks import json_object, tool_named

if TYPE_CHECKING:
    from ..evaluate.suite import SuiteRow
    from ..gate import JudgeSettings, LivePolicy
    from ..rollout import Route


@dataclass(frozen=True)
class Scorer:
    """How one cohort's live answers are scored."""

    json: bool = False
    schema_row: SuiteRow | None = None  # a suite row holding the cohort's one schema
    tools: tuple[str, ...] | None = None
    must_refuse: bool = False
    max_chars: int | None = None
    max_latency_ms: float | None = None

    def score(self, text: str, latency_ms: float | None) -> tuple[float | None, dict[str, float]]:
        """(the answer's score or None when no source applies, each source's score)."""
        sources: dict[str, float] = {}
        if self.schema_row is not None:
            sources["json_schema"] = JsonSchema()(self.schema_row, Observation(text)).score
        elif self.json:
            sources["json_valid"] = float(json_object(text)[0])
        if self.tools is not None:
            sources["tool_selection"] = float(tool_named(text, list(self.tools))[0])
        if self.must_refuse:
            sources["refusal"] = float(is_refusal(text))
        if self.max_chars is not None:
            sources["length"] = float(len(text) <= self.max_chars)
        if self.max_latency_ms is not None and latency_ms is not None:
            sources["latency"] = float(latency_ms <= self.max_latency_ms)
        return (min(sources.values()) if sources else None), sources

    @property
    def scores_anything(self) -> bool:
        return bool(self.json or self.schema_row or self.tools is not None or self.must_refuse or self.max_chars
                    or self.max_latency_ms)


def scorer_for(cohort: str, route: Route, live: LivePolicy, rows: list[SuiteRow] | None = None) -> Scorer:
    """The scorer of a cohort's live answers (`rows`: the cohort's suite rows, when the gateway has the suite)."""
    schema_row = None
    if rows and all("json_schema" in row.evaluators for row in rows):
        schemas = {json.dumps(row.json_schema, sort_keys=True) for row in rows}
        schema_row = rows[0] if len(schemas) == 1 else None
    return Scorer(json=route.check == "json_valid", schema_row=schema_row,
                  tools=tuple(route.tools or ()) if route.check == "tool_selection" else None,
                  must_refuse=cohort in live.must_refuse, max_chars=live.max_answer_chars,
                  max_latency_ms=live.max_latency_ms)


PAIRWISE_PROMPT = (
    "Two AI assistants answered the same request. Which answer is better? Reply with one JSON object and nothing "
    'else: {{"better": "A", "B" or "tie", "reason": "one sentence"}}.\n\nRequest:\n{prompt}\n\n'
    "Answer A:\n{a}\n\nAnswer B:\n{b}"
)


def parse_preference(text: str) -> str | None:
    """The judge's "A", "B" or "tie" (the whole text as JSON, else its first {...}); None when it gave none."""
    import re

    for candidate in (text.strip(), *(m.group(0) for m in [re.search(r"\{.*\}", text, re.DOTALL)] if m)):
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            better = str(value.get("better", "")).strip().lower()
            return {"a": "A", "b": "B", "tie": "tie"}.get(better)
    return None


@dataclass(frozen=True)
class PairwiseJudge:
    """Asks a judge endpoint which of two answers is better, in both orders (through `serving.client`, within the
    bounds every caller of a server is held to). `preference` is the candidate's share of the two verdicts: 1 when
    it wins both, 0.5 for a tie or a split, 0 when it loses both; an unusable verdict counts as a tie."""

    settings: JudgeSettings

    def _ask(self, prompt: str, a: str, b: str) -> str | None:
        import os

        from ..evaluate.evaluators.judge import JUDGE_ANSWER_TOKENS, JUDGE_BACKOFF_S
        from ..serving.bounds import answer_limit
        from ..serving.client import Request, Settings, call_blocking

        s = self.settings
        api_key = os.environ.get(s.api_key_env) if s.api_key_env else None
        body: dict[str, Any] = {"model": s.model, "temperature": 0, "messages": [
            {"role": "user", "content": PAIRWISE_PROMPT.format(prompt=prompt, a=a, b=b)}]}
        client = Settings(s.base_url.rstrip("/"), s.timeout_s, 1, JUDGE_BACKOFF_S, api_key)
        response = call_blocking(client, Request("POST", "chat/completions", answer_limit(JUDGE_ANSWER_TOKENS),
                                                 "a verdict", body))
        if response.status_code != 200:
            return None
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return parse_preference(content) if isinstance(content, str) else None

    def preference(self, prompt: str, candidate: str, served: str) -> float:
        """The candidate's share of wins over both orders, in [0, 1]. Raises what the client raises when the judge
        cannot be asked (the caller leaves the judge out of that row)."""
        first = self._ask(prompt, candidate, served)  # candidate as A
        second = self._ask(prompt, served, candidate)  # candidate as B
        wins = {"A": 1.0, "B": 0.0}.get(first or "tie", 0.5) + {"A": 0.0, "B": 1.0}.get(second or "tie", 0.5)
        return wins / 2
