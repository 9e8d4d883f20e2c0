"""The gateway's metrics objects: the numbers /metrics renders, readable as numbers by the code that needs them."""

from __future__ import annotations

from mergegate.gateway.metrics import Counter


def test_a_counter_sums_per_value_of_one_label_over_the_others():
    calls = Counter("calls_total", "calls", ("cohort", "strategy", "winner"))
    calls.inc("json", "cascade", "merged")
    calls.inc("json", "cascade", "specialist", amount=2)
    calls.inc("tools", "vote", "merged", amount=0.5)
    assert calls.totals("cohort") == {"json": 3.0, "tools": 0.5}
    assert calls.totals("winner") == {"merged": 1.5, "specialist": 2.0}
    assert Counter("empty_total", "nothing", ("cohort",)).totals("cohort") == {}
