"""Plain helpers the gateway tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import time

MESSAGES = [{"role": "user", "content": "hello there"}]
# two cohorts' prompts for the classifier: weather questions and SQL requests
WEATHER = ["What's the weather in Paris tomorrow?", "Will it rain in London this weekend?",
           "How hot will it be in Madrid today?", "Is there a storm warning for Miami tonight?",
           "What is the temperature forecast for Tokyo on Monday?", "Do I need an umbrella in Seattle today?"]
SQL = ["Write a SQL query that selects all users older than 30.", "Join the orders and customers tables in SQL.",
       "How do I write a GROUP BY query counting rows per country?", "Write SQL to delete duplicate rows from a table.",
       "Create a SQL index on the email column of the users table.",
       "Select the top 5 products by revenue with a SQL query."]


def route_of(headers) -> dict[str, str]:
    """x-mergegate-route → {key: value}."""
    return dict(part.strip().split("=", 1) for part in headers["x-mergegate-route"].split(";"))


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples named `name` in a /metrics text whose labels include `labels`: [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()]


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples `samples` finds (0 when there are none)."""
    return sum(value for _, value in samples(text, name, **labels))


def buckets(text: str, name: str, **labels: str) -> dict[float, float]:
    """A histogram series' cumulative bucket counts: upper bound (le) → observations at or below it."""
    return {float(found["le"]): value for found, value in samples(text, f"{name}_bucket", **labels)}
