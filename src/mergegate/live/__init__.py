"""Decisions from live traffic: a per-cohort sequential test on paired (shadow) or randomized (canary) scores
that stays valid however often it is read, and family-wise control across cohorts (`sequential`)."""

from .sequential import (
    CanaryEvidence,
    CohortEvidence,
    Decision,
    Outcome,
    SequentialParams,
    decide,
    family_decisions,
    record_canary,
    start,
    start_canary,
    update,
)

__all__ = ["CanaryEvidence", "CohortEvidence", "Decision", "Outcome", "SequentialParams", "decide",
           "family_decisions", "record_canary", "start", "start_canary", "update"]
