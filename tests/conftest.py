"""Test tiers: unit, contract, host, guest (see pyproject's markers).

Each test is marked by the folder it lives in. A tier whose requirements are missing is skipped with
the reason printed (pytest runs with -ra). When BLOCKWIRE_REQUIRE_TIERS names a tier (CI sets
"host,guest"), a missing requirement fails the run instead: a skipped test never passes for a run one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TIERS = ("unit", "contract", "host", "guest")
ROOT = Path(__file__).resolve().parent


def required_tiers() -> set[str]:
    return {t.strip() for t in os.environ.get("BLOCKWIRE_REQUIRE_TIERS", "").split(",") if t.strip()}


def tier_unavailable(tier: str, reason: str) -> None:
    """Skip (loudly) or, when the tier is required, fail: call from fixtures that find a missing need."""
    message = f"[{tier} tier] {reason}"
    if tier in required_tiers():
        pytest.fail(f"{message} (required by BLOCKWIRE_REQUIRE_TIERS)", pytrace=False)
    pytest.skip(message)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT)
        tier = rel.parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
