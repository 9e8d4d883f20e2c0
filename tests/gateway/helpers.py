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
