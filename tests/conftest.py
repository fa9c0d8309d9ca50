"""Shared pytest set-up: tier markers by folder, and a guard against empty tiers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "vm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts and not item.get_closest_marker(tier):
                item.add_marker(getattr(pytest.mark, tier))


def pytest_collection_finish(session: pytest.Session) -> None:
    """With P2V_REQUIRE_TIERS=unit,integration,vm, refuse to pass when a tier has no tests."""
    required = [t for t in os.environ.get("P2V_REQUIRE_TIERS", "").split(",") if t]
    if not required:
        return
    counts = {t: 0 for t in required}
    for item in session.items:
        for t in required:
            if item.get_closest_marker(t):
                counts[t] += 1
    empty = [t for t, n in counts.items() if n == 0]
    if empty:
        raise pytest.UsageError(f"no tests collected for tier(s): {', '.join(empty)}")
