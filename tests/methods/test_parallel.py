"""The shared span pool: results in item order, errors raised, nested calls run serially (no pool exhaustion)."""

from __future__ import annotations

import threading

import pytest

from mergegate.methods._parallel import available_cores, parallel_map


def test_results_come_back_in_item_order_and_errors_are_raised():
    assert parallel_map(lambda x: x * x, range(20)) == [x * x for x in range(20)]

    def fail_on_seven(x):
        if x == 7:
            raise ValueError("seven")
        return x

    with pytest.raises(ValueError, match="seven"):
        parallel_map(fail_on_seven, range(10))


def test_nested_calls_run_on_the_calling_thread():
    def inner(_):
        return parallel_map(lambda _: threading.current_thread().name, range(3))

    for names in parallel_map(inner, range(available_cores() * 2)):
        assert len(set(names)) == 1  # each inner map ran on one thread, never queued behind its own caller
