"""A smoke of the boot-storm benchmark's harness (bench/storm_guest.py): two volumes at once to one
domain, the raw floor (iscsiadm + attachDeviceFlags) and AttachVolume. Asserts that both produced
results and left nothing behind; the numbers are not checked (`python -m bench.attach --plan storm` is
the benchmark)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.storm_guest import StormPlan, run_storm
from tests.host.daemons import Tgtd

pytestmark = pytest.mark.skipif(os.environ.get("BLOCKWIRE_IN_GUEST") != "1", reason="inside the guest only")


def test_storm_bench_harness(clean_host: None, tgtd: Tgtd, tmp_path: Path) -> None:
    plan = StormPlan(volumes=2, domains=1, contenders=("floor", "bw-e2e"))
    results = run_storm(plan, tmp_path, tgtd)
    assert [r["contender"] for r in results["rows"]] == ["floor", "bw-e2e"]
    for r in results["rows"]:
        assert r["errors"] == [], (r["contender"], r["errors"])
        assert r["leftovers"] == {}, (r["contender"], r["leftovers"])
        for op in ("attach", "detach"):
            assert r[op]["n"] == 2, (r["contender"], op, r[op])
            assert 0 < r[op]["p50"] <= r[op]["wall"] + 0.01, (r["contender"], op, r[op])
