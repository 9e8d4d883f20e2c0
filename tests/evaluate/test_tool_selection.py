"""tool_selection on every accepted form: OpenAI tool calls, the call form, the bare name (the demo's form);
arguments checked against the tool's JSON Schema and the case's expected values; suite rows validated on load."""

from __future__ import annotations

import json

import pytest

from mergegate.evaluate.evaluators import Observation, ToolSelection, parse_tool_calls
from mergegate.evaluate.suite import SuiteError, SuiteRow, load_suite

WEATHER = {"type": "function", "function": {"name": "weather", "description": "the forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


def row(expected="weather", tools=(WEATHER, SEARCH), **fields) -> SuiteRow:
    return SuiteRow.model_validate({"id": "t1", "cohort": "tools", "prompt": "Q", "expected": expected,
                                    "evaluators": ["tool_selection"], "tools": list(tools), **fields})


def judge(output: str, **fields):
    return ToolSelection()(row(**fields), Observation(output))


def openai_call(name: str, arguments: dict) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


@pytest.mark.parametrize("output", [
    json.dumps({"role": "assistant", "content": None, "tool_calls": [openai_call("weather", {"city": "Oslo"})]}),
    json.dumps({"name": "weather", "arguments": {"city": "Oslo", "days": 3}}),
    json.dumps({"name": "weather", "arguments": '{"city": "Oslo"}'}),
    json.dumps([openai_call("search", {"query": "oslo"}), openai_call("weather", {"city": "Oslo"})]),
    '```json\n{"name": "weather", "arguments": {"city": "Oslo"}}\n```',
    'weather(city="Oslo", days=3)',
    "weather(city=Oslo)",
    'weather({"city": "Oslo"})',
    "`weather`(city='oslo')",
])
def test_right_tool_with_right_arguments_passes_in_every_form(output):
    result = judge(output, expected_arguments={"city": "Oslo"})
    assert result.passed, result.reason
    assert result.reason == "called 'weather' and its arguments"


@pytest.mark.parametrize(("output", "reason"), [
    ('weather(city="Bergen")', "called 'weather' with city='Bergen', expected 'Oslo'"),
    ('weather(days=2)', "called 'weather' with arguments that break its parameters: 'city' is a required property"),
    ('weather(city="Oslo", days=0)', "break its parameters at $.days: 0 is less than the minimum of 1"),
    ('weather(city="Oslo", units="C")', "Additional properties are not allowed ('units' was unexpected)"),
    (json.dumps({"tool_calls": [openai_call("search", {"query": "oslo weather"})]}),
     "expected tool 'weather', got 'search'"),
    ("weather", "named 'weather' without arguments, but the case checks them"),
    (json.dumps({"name": "browse", "arguments": {}}),
     "named 'browse', which is not among the listed tools (weather, search)"),
    (json.dumps({"tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{oops"}}]}),
     "tool call 1: arguments are not valid JSON"),
    (json.dumps({"answer": "sunny"}), "tool call 1: no function name"),
    ("weather(1, 2)", "weather(...): arguments are neither key=value pairs nor a JSON object"),
])
def test_wrong_tool_or_arguments_fail_and_say_why(output, reason):
    result = judge(output, expected_arguments={"city": "Oslo"})
    assert not result.passed and result.score == 0.0
    assert reason in result.reason


def test_schema_alone_is_checked_without_expected_arguments():
    assert judge('weather(city="anywhere")').passed
    assert not judge("weather(days=1)").passed
    assert not judge("weather").passed  # the tool has a required parameter, and a bare name gives none


def test_names_only_rows_keep_the_first_word_form():
    names = row(expected=" search", tools=["music", "search"])
    assert ToolSelection()(names, Observation(" search")).passed
    assert ToolSelection()(names, Observation(" search the web")).passed
    assert ToolSelection()(names, Observation('search(query="sharks")')).passed
    assert not ToolSelection()(names, Observation(" music")).passed


DEMO = "examples/demo/suite.jsonl"


def test_demo_answers_score_as_before():
    """What the demo's models answer on tool_required rows: the bare tool name after a space."""
    rows = {r.id: r for r in load_suite(DEMO).rows if r.cohort == "tool_required"}
    for row_id, output, passed in [("tool_required-000", " search", True), ("tool_required-001", " search", False),
                                   ("tool_required-001", " email", True), ("tool_required-003", " email", False),
                                   ("tool_required-004", " music", True), ("tool_required-005", " calculator", True)]:
        assert ToolSelection()(rows[row_id], Observation(output)).passed is passed, row_id


def test_parse_tool_calls_reads_arguments_as_python_would():
    calls, why = parse_tool_calls('calculator(expression="2+2", precise=True, digits=3)')
    assert why == "" and calls[0].arguments == {"expression": "2+2", "precise": True, "digits": 3}
    assert parse_tool_calls("search()")[0][0].arguments == {}
    assert parse_tool_calls("")[1] == "names no tool"


def write(tmp_path, *rows) -> str:
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


BASE = {"cohort": "tools", "prompt": "Q", "expected": "weather", "evaluators": ["tool_selection"]}


def test_tool_definitions_are_kept_as_names_plus_parameters():
    r = row()
    assert r.tools == ("weather", "search")
    assert r.tool_parameters is not None and r.tool_parameters["weather"]["required"] == ["city"]
    assert row(tools=["weather", SEARCH]).tools == ("weather", "search")  # names and definitions mix


@pytest.mark.parametrize(("fields", "message"), [
    ({"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters is not a valid JSON Schema"),
    ({"tools": [{"function": {"name": "weather"}}]}, "tools[0]: an OpenAI tool definition is"),
    ({"tools": ["weather", {"type": "function", "function": {"name": ""}}]}, "tools[1].function.name"),
    ({"tools": ["weather", "weather"]}, "names a tool twice"),
    ({"tools": [WEATHER], "expected_arguments": {"days": 2}}, "do not fit tool 'weather''s parameters"),
    ({"tools": [WEATHER], "expected_arguments": {"city": "Oslo"}, "evaluators": ["exact_match"]},
     "checked by evaluator 'tool_selection', which the row lacks"),
])
def test_bad_tool_fields_are_reported_by_line(tmp_path, fields, message):
    path = write(tmp_path, {**BASE, "id": "ok", "tools": ["weather"]}, {**BASE, "id": "bad", **fields})
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert "line 2:" in str(info.value) and message in str(info.value)
