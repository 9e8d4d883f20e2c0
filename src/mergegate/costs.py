"""What a model costs to serve per cohort: latency percentiles and mean token counts from its rows.

Pure and small so both the report and the gate's policy bounds can use it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from .registry import RowResult


@dataclass(frozen=True)
class CohortCost:
    """One model's serving cost over one cohort's rows."""

    rows: int
    latency_p50_ms: float
    latency_p99_ms: float
    prompt_tokens_mean: float
    completion_tokens_mean: float


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not sorted_values:
        return math.nan
    position = fraction * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] * (1.0 - weight) + sorted_values[upper] * weight


def cohort_cost(rows: list[RowResult]) -> CohortCost:
    """The cost of one set of rows (one model, one cohort); NaN latencies and means when there are none."""
    latencies = sorted(float(row.latency_ms) for row in rows)
    count = len(rows)
    return CohortCost(
        rows=count,
        latency_p50_ms=_percentile(latencies, 0.50),
        latency_p99_ms=_percentile(latencies, 0.99),
        prompt_tokens_mean=sum(row.prompt_tokens for row in rows) / count if count else math.nan,
        completion_tokens_mean=sum(row.completion_tokens for row in rows) / count if count else math.nan,
    )


def cohort_costs(results: dict[str, list[RowResult]]) -> dict[str, dict[str, CohortCost]]:
    """model → cohort → CohortCost, cohorts in sorted order, from each model's rows."""
    costs: dict[str, dict[str, CohortCost]] = {}
    for model, rows in results.items():
        by_cohort: dict[str, list[RowResult]] = defaultdict(list)
        for row in rows:
            by_cohort[row.cohort].append(row)
        costs[model] = {cohort: cohort_cost(by_cohort[cohort]) for cohort in sorted(by_cohort)}
    return costs
