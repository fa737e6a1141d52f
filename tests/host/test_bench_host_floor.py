"""bench/host_floor.py runs on the host tier, in both modes (QEMU-native iSCSI on tgtd; RBD on the session's
throwaway Ceph cluster): each contender attaches and detaches, the profile and the daemons' step histograms
are read, a small storm attaches everything, and nothing is left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from bench.host_floor import (
    RAW_PREFIX,
    Floor,
    RbdFloor,
    domains,
    rbd_backend,
    serial_cycles,
    storm,
    with_metrics,
)
from tests.ceph import CephCluster
from tests.conftest import tier_unavailable
from tests.fakes.daemon_rig import Rig
from tests.host.daemons import Started, Tgtd


@pytest.fixture
def rig(host_daemons: Started, tgtd: Tgtd, tmp_path: Path) -> Iterator[Rig]:
    virt = libvirt.open("qemu:///system")
    try:
        with with_metrics(Rig(work=tmp_path, tgtd=tgtd, virt=virt, log_level="INFO")).running() as r:
            yield r
    finally:
        virt.close()


def test_host_floor_bench_measures_every_contender_and_leaves_nothing(rig: Rig) -> None:
    floor = Floor(rig.tgtd, rig.lv, rig.work, initiator=f"iqn.2026-01.io.blockwire.{RAW_PREFIX}:test")
    try:
        with domains(rig.lv, 1, "bw-floor") as (dom,):
            s = serial_cycles(2, rig, floor, dom)
        c = storm(4, 2, rig, floor)
    finally:
        floor.cleanup()
    for contender in ("floor", "grpc", "lib"):
        for op in ("attach", "detach"):
            assert s[f"{contender}_{op}"]["n"] == 2
            assert s[f"{contender}_{op}"]["p50_ms"] > 0
    assert s["ratio_grpc_attach_p50"] > 0
    for step in ("export", "identity", "hotplug", "complete", "journal", "secret"):
        assert s["profile_attach_ms"][step] > 0, step
    assert s["profile_detach_ms"]["unplug"] > 0
    assert s["daemon_steps_attach"]["agent"]["export"] > 0
    assert "tgt_target_new" in s["daemon_steps_attach"]["storage"]
    assert c["errors"] == []
    assert c["grpc_attached"] == 4
    assert c["floor"]["n"] == c["grpc"]["n"] == 4
    assert c["left_after_detach"] == {}
    assert c["grpc_steps"]["agent"]["hotplug"]["calls"] == 4


@pytest.fixture
def rbd_rig(
    host_daemons: Started, tgtd: Tgtd, ceph_cluster: CephCluster, tmp_path: Path
) -> Iterator[tuple[Rig, RbdFloor]]:
    try:
        import rados  # noqa: F401, PLC0415 - the floor reads images through Debian's bindings
    except ImportError:
        tier_unavailable(
            "host", "python rados/rbd bindings not importable: apt-get install python3-rbd python3-rados"
        )
    user = ceph_cluster.create_user("bench-floor")
    virt = libvirt.open("qemu:///system")
    rig = rbd_backend(
        with_metrics(Rig(work=tmp_path, tgtd=tgtd, virt=virt, log_level="INFO")), ceph_cluster, user
    )
    floor = RbdFloor(ceph_cluster, user, rig.lv)
    try:
        with rig.running() as r:
            yield r, floor
    finally:
        floor.cleanup()
        virt.close()


def test_host_floor_bench_rbd_mode_measures_every_contender_and_leaves_nothing(
    rbd_rig: tuple[Rig, RbdFloor],
) -> None:
    rig, floor = rbd_rig
    with domains(rig.lv, 1, "bw-floor") as (dom,):
        s = serial_cycles(2, rig, floor, dom)
    c = storm(4, 2, rig, floor)
    for contender in ("floor", "grpc", "lib"):
        for op in ("attach", "detach"):
            assert s[f"{contender}_{op}"]["n"] == 2
            assert s[f"{contender}_{op}"]["p50_ms"] > 0
    assert s["ratio_grpc_attach_p50"] > 0
    for step in ("export", "rbd_identity", "hotplug", "complete", "journal", "secret"):
        assert s["profile_attach_ms"][step] > 0, step
    assert "identity" not in s["profile_attach_ms"]  # no iSCSI inquiry on the RBD path
    for step in ("unplug", "unexport", "secret"):
        assert s["profile_detach_ms"][step] > 0, step
    assert s["daemon_steps_attach"]["agent"]["rbd_identity"] > 0
    assert s["daemon_steps_attach"]["storage"]["rbd"] > 0  # storage's cluster session of CreateAttachment
    assert s["daemon_steps_attach"]["storage"]["rpc CreateAttachment"] > 0
    assert c["errors"] == []
    assert c["grpc_attached"] == 4
    assert c["floor"]["n"] == c["grpc"]["n"] == 4
    assert c["left_after_detach"] == {}
    assert c["grpc_steps"]["agent"]["rbd_identity"]["calls"] == 4
    assert c["grpc_steps"]["agent"]["hotplug"]["calls"] == 4
    assert floor.usages
    assert not [x for x in rig.lv().listAllSecrets() if x.usageID() in floor.usages]
