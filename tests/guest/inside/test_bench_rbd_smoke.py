"""A smoke of the guest RBD benchmark's harness (bench/rbd_guest.py): one counted round of each contender
(krbd: the kernel-mode agent maps and hot-plugs /dev/rbdN; librbd: the qemu-mode agent hot-plugs a
network disk), no warm-up, on the session's Ceph cluster (shared with test_krbd.py). Asserts only that
it produced results and left nothing behind (no mapping, no secret, no disk, no journal record); the
numbers are not checked (`python -m bench.rbd_guest` is the benchmark, its full plan
`bench/rbd_guest.py::test_rbd_guest_bench[full]`)."""

from __future__ import annotations

from pathlib import Path

from bench.rbd_guest import CONTENDERS, RBD_DEVICES, SMOKE, run_and_write
from tests.ceph import CephCluster
from tests.guest.inside import kernel


def test_rbd_bench_harness(ceph_cluster: CephCluster, libvirtd: None, tmp_path: Path) -> None:
    results = run_and_write(SMOKE, tmp_path, "rbd-guest-smoke", ceph_cluster)
    rounds = results["rounds"]
    assert sorted(r["contender"] for r in rounds) == sorted(CONTENDERS)
    for r in rounds:
        assert r["errors"] == [], (r["contender"], r["errors"])
        assert r["leftovers"] == {}, (r["contender"], r["leftovers"])
        assert r["attach_s"] > 0
        assert r["detach_s"] > 0
    devices = {r["contender"]: r["host_device"] for r in rounds}
    assert devices["krbd"].startswith("/dev/rbd"), devices
    assert not devices["librbd"].startswith("/dev/"), devices  # QEMU opens the image itself
    s = results["summary"]
    assert s["krbd"]["attach"]["n"] == s["librbd"]["attach"]["n"] == 1
    assert (s["ratio_attach_p50"] or 0) > 0
    assert s["krbd"]["leftovers"] == s["librbd"]["leftovers"] == 0
    assert not (RBD_DEVICES.exists() and list(RBD_DEVICES.iterdir()))
    assert "blockwire/" not in kernel.virsh("secret-list").stdout
