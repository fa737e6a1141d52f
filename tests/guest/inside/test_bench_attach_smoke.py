"""A smoke of the attach benchmark's harness (bench/attach_guest.py): one volume, one path, one round of
the raw iscsiadm floor, os-brick and blockwire's connector. Asserts only that it produced results and
left nothing behind; the numbers are not checked (`python -m bench.attach` is the benchmark)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.attach_guest import SMOKE, run_and_write
from tests.host.daemons import Tgtd

pytestmark = pytest.mark.skipif(os.environ.get("BLOCKWIRE_IN_GUEST") != "1", reason="inside the guest only")


def test_attach_bench_harness(clean_host: None, tgtd: Tgtd, tmp_path: Path) -> None:
    results = run_and_write(SMOKE, tmp_path, "attach-smoke", tgtd)
    rounds = results["scenarios"]
    assert sorted(r["contender"] for r in rounds) == sorted(SMOKE.contenders)
    for r in rounds:
        assert r["errors"] == [], (r["contender"], r["errors"])
        assert r["leftovers"] == {}, (r["contender"], r["leftovers"])
        assert len(r["connect_s"]) == 1
        assert r["connect_s"][0] > 0
        assert len(r["disconnect_s"]) == 1
        assert r["disconnect_s"][0] > 0
