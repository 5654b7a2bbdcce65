"""Hypothesis settings shared by the fuzz tests: bounded and derandomized, so CI runs the same examples."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def fuzz_settings(max_examples: int) -> settings:
    """No deadline (a real server answers each example), no example database, no health checks (the
    strategies are large on purpose)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
