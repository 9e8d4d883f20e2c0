#!/usr/bin/env python
"""Simulated live cohorts: how often each rule wrongly promotes when the decision is read after every row, and
how many rows the sequential test needs against the true effect.

    .venv/bin/python benchmarks/live_simulation.py              # the table in benchmarks/README.md (~5 min)
    .venv/bin/python benchmarks/live_simulation.py --quick      # smaller, ~30 s

Each simulated cohort is a stream of paired scores (the candidate's c and the served model's s on the same
request), binary (Bernoulli: c equals s on half the rows, otherwise an independent draw) or continuous (Beta:
c = (s + b) / 2 with b an independent Beta draw), with E[c − s] set exactly. The rules compared, all at the
gate's default policy (max_drop 0.05, confidence 0.95: each one-sided conclusion allowed α = 2.5%):

- the betting test of `mergegate.live.sequential`, read after every row, stopping at its first conclusion;
  over a family of 5 cohorts, uncorrected and with Holm across the cohorts (`family_decisions`);
- the naive rule: the gate's offline bootstrap re-run every 10 rows from row 20 (its `min_rows`), promoting the
  first time its lower bound of mean(c − s) ≥ −max_drop (and rejecting the first time its upper bound
  < −max_drop) — the same percentile interval as `mergegate.gate`, 2,000 resamples. For binary scores the
  resampled mean is drawn from its exact multinomial law, (n₊ − n₋)/n, which is what resampling rows gives.

The streams run through `bet_step`, the very function `update` calls, many streams at once.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

import numpy as np

from mergegate.live.sequential import SequentialParams, bet_step, null_means, start

SERVED_MEAN = 0.6
AGREEMENT = 0.5  # binary: the share of rows where c is s (models agree on most requests)
CONCENTRATION = 4.0  # continuous: Beta(mean·κ, (1 − mean)·κ)
FAMILY = 5
PARAMS = SequentialParams(max_drop=0.05, confidence=0.95)
NAIVE_EVERY, NAIVE_MIN_ROWS, NAIVE_RESAMPLES = 10, 20, 2000


def paired_scores(kind: str, effect: float, shape: tuple[int, int], rng: np.random.Generator):
    """(candidate, served) score arrays of `shape` (streams, rows) with E[candidate − served] = effect."""
    target = SERVED_MEAN + effect
    if kind == "binary":
        served = (rng.random(shape) < SERVED_MEAN).astype(float)
        other = (target - AGREEMENT * SERVED_MEAN) / (1 - AGREEMENT)  # the draw's mean on disagreeing rows
        assert 0 <= other <= 1, effect
        drawn = (rng.random(shape) < other).astype(float)
        return np.where(rng.random(shape) < AGREEMENT, served, drawn), served
    served = rng.beta(SERVED_MEAN * CONCENTRATION, (1 - SERVED_MEAN) * CONCENTRATION, shape)
    other = 2 * target - SERVED_MEAN
    assert 0 < other < 1, effect
    return (served + rng.beta(other * CONCENTRATION, (1 - other) * CONCENTRATION, shape)) / 2, served


def sequential(candidate: np.ndarray, served: np.ndarray, family: int = 1, holm: bool = True):
    """Outcome per stream (1 promote, −1 roll back, 0 none within the rows) and the row it came at (0: none).

    Streams are grouped in families of `family` consecutive cohorts; with `holm` each family is decided by
    Holm's step-down as `family_decisions` does, otherwise each cohort alone as `decide` does. A cohort stops
    at its first conclusion (its evidence frozen, as when the gateway acts on it)."""
    streams, rows = candidate.shape
    grid = np.asarray(start(PARAMS).grid)
    nulls, below, above = null_means(grid), grid <= -PARAMS.max_drop, grid >= -PARAMS.rollback_margin
    state = {"rows": np.zeros(streams), "sum_y": np.zeros(streams), "sum_sq": np.zeros(streams),
             **{name: np.zeros((streams, grid.size)) for name in ("log_up", "peak_up", "log_down", "peak_down")}}
    outcome, at = np.zeros(streams, dtype=int), np.zeros(streams, dtype=int)
    families = np.arange(streams).reshape(-1, family)
    holm_steps = np.log(np.arange(family, 0, -1)) - math.log(PARAMS.alpha)  # log((K − rank) / α)
    for t in range(rows):
        open_families = families[(outcome[families] == 0).any(axis=1)]
        if not open_families.size:
            break
        live = open_families.ravel()
        before = {name: value[live] for name, value in state.items()}
        after = bet_step(before, (1 + candidate[live, t] - served[live, t]) / 2, nulls)
        moving = outcome[live] == 0
        for name, value in after.items():
            keep = moving if value.ndim == 1 else moving[:, None]
            state[name][live] = np.where(keep, value, before[name])
        up = _concluded(state["peak_up"][live][:, below].min(axis=1).reshape(-1, family), holm_steps, holm)
        down = _concluded(state["peak_down"][live][:, above].min(axis=1).reshape(-1, family), holm_steps, holm)
        new = np.where(down.ravel(), -1, np.where(up.ravel(), 1, 0)) * moving
        outcome[live] += new
        at[live[new != 0]] = t + 1
    return outcome, at


def _concluded(log_e: np.ndarray, steps: np.ndarray, holm: bool) -> np.ndarray:
    """Which cohorts conclude, per row of log_e (families × cohorts): each alone, e ≥ 1/α; with Holm's step-down,
    the largest e against steps[0], the next against steps[1], …, stopping at the first that falls short."""
    if not holm:
        return log_e >= -math.log(PARAMS.alpha)
    order = np.argsort(-log_e, axis=1, kind="stable")
    passed = np.logical_and.accumulate(np.take_along_axis(log_e, order, axis=1) >= steps, axis=1)
    concluded = np.empty_like(passed)
    np.put_along_axis(concluded, order, passed, axis=1)
    return concluded


def bootstrap_bounds(diffs: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[float, float]:
    """The gate's percentile interval of mean(diffs) at PARAMS.confidence (see `mergegate.gate._bootstrap`)."""
    n = diffs.size
    if kind == "binary":
        counts = np.array([(diffs == -1).sum(), (diffs == 0).sum(), (diffs == 1).sum()]) / n
        drawn = rng.multinomial(n, counts, size=NAIVE_RESAMPLES)
        means = (drawn[:, 2] - drawn[:, 0]) / n
    else:
        block = max(1, 4_000_000 // n)
        means = np.concatenate([diffs[rng.integers(0, n, size=(min(block, NAIVE_RESAMPLES - s), n))].mean(axis=1)
                                for s in range(0, NAIVE_RESAMPLES, block)])
    tail = (1 - PARAMS.confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def naive(candidate: np.ndarray, served: np.ndarray, kind: str, rng: np.random.Generator):
    """The gate's bootstrap re-run every NAIVE_EVERY rows: outcome per stream (1 promote, −1 reject, 0 none), and
    whether one look at the last of those rows alone would have promoted (the rate the interval promises)."""
    streams, rows = candidate.shape
    outcome, once = np.zeros(streams, dtype=int), np.zeros(streams, dtype=bool)
    for stream in range(streams):
        diffs = candidate[stream] - served[stream]
        for n in range(NAIVE_MIN_ROWS, rows + 1, NAIVE_EVERY):
            low, high = bootstrap_bounds(diffs[:n], kind, rng)
            if low >= -PARAMS.max_drop or high < -PARAMS.max_drop:
                outcome[stream] = 1 if low >= -PARAMS.max_drop else -1
                break
        once[stream] = bootstrap_bounds(diffs[:_last_look(rows)], kind, rng)[0] >= -PARAMS.max_drop
    return outcome, once


def _last_look(rows: int) -> int:
    return rows - (rows - NAIVE_MIN_ROWS) % NAIVE_EVERY


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def _family_any(flags: np.ndarray) -> float:
    return float(flags.reshape(-1, FAMILY).any(axis=1).mean())


def margin_table(families: int, max_rows: int, naive_families: int, rng: np.random.Generator) -> list[str]:
    lines = ["| scores | rule | wrong promotions per cohort | family of 5: any cohort wrongly promoted |",
             "|---|---|--:|--:|"]
    for kind in ("binary", "continuous"):
        candidate, served = paired_scores(kind, -PARAMS.max_drop, (families * FAMILY, max_rows), rng)
        alone, _ = sequential(candidate, served, FAMILY, holm=False)
        holm, _ = sequential(candidate, served, FAMILY, holm=True)
        lines.append(f"| {kind} | betting test, read after every row | {_pct((alone == 1).mean())} | "
                     f"{_pct(_family_any(alone == 1))} |")
        lines.append(f"| {kind} | betting test + e-Holm over the 5, every row | {_pct((holm == 1).mean())} | "
                     f"{_pct(_family_any(holm == 1))} |")
        size = naive_families * FAMILY
        boot, once = naive(candidate[:size], served[:size], kind, rng)
        lines.append(f"| {kind} | gate's bootstrap, one look at row {_last_look(max_rows)} | {_pct(once.mean())} | "
                     f"{_pct(_family_any(once))} |")
        lines.append(f"| {kind} | gate's bootstrap every {NAIVE_EVERY} rows from row {NAIVE_MIN_ROWS} (naive) | "
                     f"{_pct((boot == 1).mean())} | {_pct(_family_any(boot == 1))} |")
    return lines


def effects_table(streams: int, max_rows: int, effects, rng: np.random.Generator) -> list[str]:
    lines = ["| scores | E[c − s] | promoted | rolled back | exhausted | rows to a decision: median (10th–90th pct) |",
             "|---|--:|--:|--:|--:|--:|"]
    for kind in ("binary", "continuous"):
        for effect in effects:
            candidate, served = paired_scores(kind, effect, (streams, max_rows), rng)
            outcome, at = sequential(candidate, served)
            decided = at[outcome != 0]
            spread = (f"{np.median(decided):.0f} ({np.percentile(decided, 10):.0f}–{np.percentile(decided, 90):.0f})"
                      if decided.size else "—")
            lines.append(f"| {kind} | {effect:+.2f} | {_pct((outcome == 1).mean())} | {_pct((outcome == -1).mean())} "
                         f"| {_pct((outcome == 0).mean())} | {spread} |")
    return lines


def run(streams: int = 2000, families: int = 1000, max_rows: int = 500, naive_streams: int = 500,
        effects=(-0.20, -0.10, -0.05, 0.0, 0.05, 0.10, 0.15), seed: int = 0) -> str:
    """Both tables as markdown: wrong promotions at the margin (E[c − s] = −max_drop, `families` families of 5
    cohorts, the naive rule on the first `naive_streams` of those streams), then outcomes and rows to a decision
    against the true effect (`streams` streams each), every cohort with a budget of `max_rows` rows."""
    rng = np.random.default_rng(seed)
    naive_families = max(1, min(families, naive_streams // FAMILY))
    header = (f"Wrong promotions with the candidate exactly at the margin (E[c − s] = −{PARAMS.max_drop}), read "
              f"after every row for up to {max_rows} rows; α = {PARAMS.alpha:.3g} per side (confidence "
              f"{PARAMS.confidence}); betting: {families * FAMILY:,} cohort streams in {families:,} families of "
              f"{FAMILY}; bootstrap: the first {naive_families * FAMILY:,} of them.")
    effects_header = (f"Outcomes and rows to a decision against the true effect (max_drop {PARAMS.max_drop}, budget "
                      f"{max_rows} rows, {streams:,} streams each; served mean {SERVED_MEAN}):")
    return "\n".join([header, "", *margin_table(families, max_rows, naive_families, rng), "", effects_header, "",
                      *effects_table(streams, max_rows, effects, rng)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000, help="streams per effect in the rows-to-decision table")
    parser.add_argument("--families", type=int, default=1000, help="families of 5 cohorts at the margin")
    parser.add_argument("--naive-streams", type=int, default=500, help="streams the naive bootstrap rule runs on")
    parser.add_argument("--max-rows", type=int, default=500, help="each cohort's budget of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes")
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    began = time.perf_counter()
    tables = run(args.streams // scale, args.families // scale, args.max_rows, args.naive_streams // scale,
                 seed=args.seed)
    command = "benchmarks/live_simulation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"`{command.strip()}` on {datetime.date.today().isoformat()}, "
          f"{time.perf_counter() - began:.0f} s:\n")
    print(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
