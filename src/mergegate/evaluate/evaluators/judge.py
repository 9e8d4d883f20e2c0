"""A judge model grades the answer against the row's rubric (`llm_judge`), through `serving.client`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import SuiteError
from .base import EvalResult, Observation

if TYPE_CHECKING:  # rows are only read here: suite.py imports the evaluators (for their names), not back
    from ..suite import SuiteRow


JUDGE_BACKOFF_S = 0.5  # the first retry's wait (see serving.client), as the endpoint runner's default
JUDGE_ANSWER_TOKENS = 4096  # a verdict is a sentence: its answer's bound (serving.bounds.answer_limit) is generous
JUDGE_PROMPT = (
    "You grade an AI assistant's answer against a rubric. Reply with one JSON object and nothing else: "
    '{{"verdict": "pass" or "fail", "score": a number from 0 to 1, "reason": "one sentence"}}.\n\n'
    "Rubric:\n{rubric}\n\nQuestion:\n{prompt}\n\nAnswer:\n{answer}"
)
_RAW_KEPT = 2000  # characters of the judge's raw answer kept in the reason (and so in the registry)


def parse_verdict(text: str) -> tuple[dict[str, Any] | None, str]:
    """The judge's {"verdict", "score", "reason"}: the whole text as JSON, else the first {...} in it (a fence or
    prose around it is forgiven); a missing score follows the verdict. (None, why) when there is no usable verdict."""
    candidates = [text.strip()]
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match:
        candidates.append(match.group(0))
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        if not isinstance(value, dict):
            continue
        verdict = str(value.get("verdict", "")).strip().lower()
        if verdict not in ("pass", "fail"):
            return None, f"verdict {value.get('verdict')!r} is neither 'pass' nor 'fail'"
        score = value.get("score", 1.0 if verdict == "pass" else 0.0)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            return None, f"score {score!r} is not a number within [0, 1]"
        return {"verdict": verdict, "score": float(score), "reason": str(value.get("reason", ""))}, ""
    return None, "no JSON object with a verdict in the judge's answer"


@dataclass(frozen=True)
class LlmJudge:
    """A judge model grades the output against the row's `rubric`, through any OpenAI-compatible endpoint.

    Settings, first found wins: the row's `judge` object, this evaluator's options, then the environment
    (MERGEGATE_JUDGE_URL, MERGEGATE_JUDGE_MODEL, and MERGEGATE_JUDGE_API_KEY_ENV naming the variable that holds the
    key, MERGEGATE_JUDGE_API_KEY by default). A garbled verdict fails the row, with the judge's raw answer in the
    reason; a judge that cannot be reached (after `retries`) raises EvaluationError naming it, so an outage never
    scores rows 0 and the run is not recorded as finished. The judge is asked through `serving.client` (its bounds,
    its retry rule, no proxy settings read from the environment). Needs httpx (the `serve` extra).
    """

    name: ClassVar[str] = "llm_judge"
    version: ClassVar[str] = "1"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 60.0
    retries: int = 2

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or self.retries < 0:
            raise ValueError(f"llm_judge needs timeout_s > 0 and retries >= 0, got {self.timeout_s!r}, {self.retries!r}")

    def settings(self, row: SuiteRow) -> tuple[str, str, str | None, float, int]:
        """(base URL, model, API key or None, timeout, retries) for this row; EvaluationError when unset, or when
        the URL (the row's, the evaluator's or MERGEGATE_JUDGE_URL) is not one (`addresses.check_url`)."""
        from ...addresses import check_url
        from ...errors import AddressError, EvaluationError

        judge = row.judge
        base_url = (judge and judge.base_url) or self.base_url or os.environ.get("MERGEGATE_JUDGE_URL")
        model = (judge and judge.model) or self.model or os.environ.get("MERGEGATE_JUDGE_MODEL")
        if not base_url or not model:
            raise EvaluationError(f"row {row.id!r}: llm_judge has no judge; set MERGEGATE_JUDGE_URL and "
                                  "MERGEGATE_JUDGE_MODEL, or the row's judge.base_url and judge.model")
        try:
            check_url(base_url)
        except AddressError as exc:
            raise EvaluationError(f"row {row.id!r}: llm_judge: {exc}") from None
        key_env = ((judge and judge.api_key_env) or self.api_key_env
                   or os.environ.get("MERGEGATE_JUDGE_API_KEY_ENV") or "MERGEGATE_JUDGE_API_KEY")
        timeout = (judge.timeout_s if judge and judge.timeout_s is not None else self.timeout_s)
        retries = (judge.retries if judge and judge.retries is not None else self.retries)
        return base_url.rstrip("/"), model, os.environ.get(key_env) or None, timeout, retries

    def ask(self, row: SuiteRow, answer: str) -> tuple[str, str]:
        """(judge model, the judge's raw reply content). EvaluationError when the judge cannot be asked."""
        from ...errors import EvaluationError

        if importlib.util.find_spec("httpx") is None:
            raise EvaluationError("llm_judge needs httpx: pip install 'mergegate[serve]'")
        from ...serving.bounds import AnswerTooLarge, answer_limit
        from ...serving.client import Request, Settings, Unanswered, call_blocking

        base_url, model, api_key, timeout, retries = self.settings(row)
        prompt = JUDGE_PROMPT.format(rubric=row.rubric, prompt=row.asked, answer=answer)
        body: dict[str, Any] = {"model": model, "temperature": 0, "messages": [{"role": "user", "content": prompt}],
                                "response_format": {"type": "json_object"}}
        url = f"{base_url}/chat/completions"
        settings = Settings(base_url, timeout, retries, JUDGE_BACKOFF_S, api_key)
        limit = answer_limit(JUDGE_ANSWER_TOKENS)
        try:
            response = call_blocking(settings, Request("POST", "chat/completions", limit, "a verdict", body))
            if response.status_code == 400:  # a server without JSON mode: ask again, parse leniently
                body = {k: v for k, v in body.items() if k != "response_format"}
                response = call_blocking(settings, Request("POST", "chat/completions", limit, "a verdict", body))
        except Unanswered as exc:
            raise EvaluationError(f"judge {model!r} at {url} did not answer after {exc.tries} attempt(s) "
                                  f"({exc.last}); no row was scored by it") from None
        except AnswerTooLarge as exc:
            raise EvaluationError(f"judge {model!r} at {url}: {exc}") from None
        if response.status_code != 200:
            raise EvaluationError(f"judge {model!r} at {url}: HTTP {response.status_code}: "
                                  f"{settings.shown(response.text)[:300]}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return model, response.text  # a reply, but not an OpenAI one: the row fails with it shown
        return model, content if isinstance(content, str) else json.dumps(content)

    def __call__(self, row: SuiteRow, obs: Observation) -> EvalResult:
        if not (row.rubric or "").strip():
            raise SuiteError(f"row {row.id!r}: evaluator 'llm_judge' needs a 'rubric'")
        model, raw = self.ask(row, obs.output)
        verdict, why = parse_verdict(raw)
        record = json.dumps({"judge_model": model, "rubric": row.rubric, "judge_raw": raw[:_RAW_KEPT]},
                            ensure_ascii=False)
        if verdict is None:
            return EvalResult(0.0, False, f"judge answer unusable: {why}; {record}")
        passed = verdict["verdict"] == "pass"
        return EvalResult(verdict["score"], passed, f"judge {verdict['verdict']} ({verdict['score']:.2f}): "
                                                    f"{verdict['reason']}; {record}")
