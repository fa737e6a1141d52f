"""Host tier: a short soak (bench/soak.py has the long one): 40 attach/detach cycles over 8 volumes in
parallel through the real daemons (QEMU-native iSCSI, CHAP), then zero leaks and flat memory and fds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from bench.soak import run_soak
from tests.fakes.daemon_rig import Rig
from tests.host.daemons import Started, Tgtd

MIB = 1 << 20


@pytest.fixture
def rig(host_daemons: Started, tgtd: Tgtd, tmp_path: Path) -> Iterator[Rig]:
    virt = libvirt.open("qemu:///system")
    try:
        with Rig(work=tmp_path, tgtd=tgtd, virt=virt).running() as r:
            yield r
    finally:
        virt.close()


def test_soak_40_cycles_8_volumes_no_leaks_flat_memory(rig: Rig) -> None:
    r = run_soak(rig, cycles=40, volumes=8)
    print(f"\nsoak: {r}")
    assert r["errors"] == []
    assert r["measured_cycles"] == 32  # 40 minus the 8 warm-up cycles
    assert r["leaks"] == {}
    warm, end = r["after_warmup"], r["end"]
    assert end["agent_rss"] - warm["agent_rss"] < 10 * MIB
    assert end["storage_rss"] - warm["storage_rss"] < 10 * MIB
    assert end["agent_fds"] <= warm["agent_fds"] + 2
    assert end["storage_fds"] <= warm["storage_fds"] + 2
