"""Online checks on an answer, by the route's `check`: json_valid, refusal, tool_selection.

`run_checks` returns {name: {"passed": bool, "reason": str}} — always `refusal` (recorded, cheap), plus the
route's own check. `failed_check` says which result should send the request to the next model: json_valid
and tool_selection failures always do; a refusal only when the gateway is configured to
(`fallback_on_refusal`), since declining is often the right answer.
"""

from __future__ import annotations

from ..evaluate.evaluators import check_tool_call, is_refusal, parse_json_object
from ..rollout import Route


def json_object(text: str) -> tuple[bool, str]:
    """The same test as the `json_valid` evaluator: the whole answer is one JSON object."""
    value, why = parse_json_object(text)
    return value is not None, why or "valid JSON object"


def tool_named(text: str, tools: list[str] | None) -> tuple[bool, str]:
    """The `tool_selection` evaluator's test without an expected tool: the answer calls one of the route's tools,
    in any form the evaluator accepts (OpenAI tool-call JSON, `name(key=value)`, or the name first)."""
    if not tools:
        return False, "the route lists no tools"
    return check_tool_call(text, expected=None, tools=tools)


def run_checks(route: Route, text: str) -> dict[str, dict]:
    refused = is_refusal(text)
    results = {"refusal": {"passed": not refused, "refused": refused,
                           "reason": "refused" if refused else "answered"}}
    if route.check == "json_valid":
        ok, why = json_object(text)
        results["json_valid"] = {"passed": ok, "reason": why}
    elif route.check == "tool_selection":
        ok, why = tool_named(text, route.tools)
        results["tool_selection"] = {"passed": ok, "reason": why}
    return results


def failed_check(route: Route, results: dict[str, dict], *, fallback_on_refusal: bool) -> str | None:
    """The name of the check whose failure triggers fallback, or None."""
    if route.check in ("json_valid", "tool_selection") and not results[route.check]["passed"]:
        return route.check
    if route.check == "refusal" and fallback_on_refusal and results["refusal"]["refused"]:
        return "refusal"
    return None


def can_fail(route: Route, *, fallback_on_refusal: bool) -> bool:
    """Whether this route's answers must be complete before they can be sent (streaming buffers them)."""
    return route.check in ("json_valid", "tool_selection") or (route.check == "refusal" and fallback_on_refusal)
