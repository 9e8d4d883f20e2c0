"""Tests of mergegate.gateway (a package, so its modules' names do not clash with tests/test_*.py)."""
