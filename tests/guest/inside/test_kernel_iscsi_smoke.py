"""The kernel path with raw tools, end to end: tgtd with two portals -> iscsiadm login on both -> udev's
/dev/sdX and by-path links -> a multipath map with two active paths -> I/O through the map -> one path
logged out while I/O goes on -> clean up -> nothing left."""

from __future__ import annotations

import os
from pathlib import Path

from tests.guest.inside import kernel
from tests.guest.inside.kernel import PORTALS, run, wait_until

MiB = 1024 * 1024


def _write_read(device: Path, offset_mib: int, tmp_path: Path) -> None:
    """Writes 1 MiB of random data at offset (O_DIRECT, fsync), reads it back (O_DIRECT), compares."""
    pattern = os.urandom(MiB)
    src = tmp_path / f"pattern-{offset_mib}"
    src.write_bytes(pattern)
    back = tmp_path / f"back-{offset_mib}"
    run(["dd", f"if={src}", f"of={device}", "bs=1M", "count=1", f"seek={offset_mib}", "oflag=direct",
         "conv=fsync,notrunc", "status=none"])  # fmt: skip
    run(["dd", f"if={device}", f"of={back}", "bs=1M", "count=1", f"skip={offset_mib}", "iflag=direct",
         "status=none"])  # fmt: skip
    assert back.read_bytes() == pattern, f"data read back from {device} at {offset_mib} MiB differs"


def test_two_portals_multipath_io_and_clean_teardown(lun: kernel.Lun, tmp_path: Path) -> None:
    steps = kernel.Steps()
    took, timings = steps.took, steps.timings

    # Static node records (no discovery) on both portals, then log in to each.
    for portal in PORTALS:
        kernel.node_new(lun.iqn, portal)
    assert len([n for n in kernel.nodes() if lun.iqn in n]) == 2
    for portal in PORTALS:
        kernel.login(lun.iqn, portal)
    took("login x2")
    sessions = kernel.sessions()
    assert len(sessions) == 2, sessions
    assert {p for p in PORTALS if any(p in s for s in sessions)} == set(PORTALS), sessions

    # udev: one SCSI disk per path, each with its by-path link; both report the same WWID.
    disks = {portal: kernel.disk_for(portal, lun.iqn) for portal in PORTALS}
    took("by-path links")
    assert len(set(disks.values())) == 2, disks
    assert all(d.startswith("sd") for d in disks.values()), disks
    # The identity tgt announces (scsi_id, scsi_sn) is what the kernel and udev read, on both paths.
    for dev in disks.values():
        assert kernel.sysfs_wwid(dev) == f"naa.{lun.naa}"
        props = kernel.udev_properties(f"/dev/{dev}")
        assert props["ID_SERIAL"] == f"3{lun.naa}"
        assert props["ID_WWN_WITH_EXTENSION"] == f"0x{lun.naa}"
        assert props["ID_SCSI_SERIAL"] == lun.scsi_sn

    # multipath: one map over both disks with the same WWID, both paths active and ready.
    wwid = f"3{lun.naa}"
    name = wait_until("the multipath map", lambda: kernel.map_for(wwid), 60)

    def both_paths_up() -> bool:
        paths = [p for p in kernel.map_paths() if p.wwid == wwid]
        return sorted(p.dev for p in paths) == sorted(disks.values()) and all(
            p.dm_state == "active" and p.checker == "ready" for p in paths
        )

    wait_until("two active ready paths", both_paths_up, 60)
    took("multipath map")
    mapper = Path("/dev/mapper", name)
    dm = kernel.dm_device(name)
    assert sorted(os.listdir(f"/sys/block/{dm}/slaves")) == sorted(disks.values())
    ll = run(["multipath", "-ll", name]).stdout
    assert ll.count("active ready running") == 2, ll

    # I/O through the map.
    _write_read(mapper, 0, tmp_path)
    took("I/O on 2 paths")

    # Log out of the second portal: its disk goes away, the map keeps one path and I/O goes on.
    gone = disks[PORTALS[1]]
    kernel.logout(lun.iqn, PORTALS[1])
    wait_until(f"{gone} removed", lambda: not Path("/sys/block", gone).exists(), 60)

    def one_path_left() -> bool:
        paths = [p for p in kernel.map_paths() if p.wwid == wwid]
        return [p.dev for p in paths] == [disks[PORTALS[0]]] and paths[0].dm_state == "active"

    wait_until("the map down to one active path", one_path_left, 60)
    took("logout one path")
    assert not kernel.by_path_link(PORTALS[1], lun.iqn).exists()
    _write_read(mapper, 8, tmp_path)
    _write_read(mapper, 0, tmp_path)
    took("I/O on 1 path")

    # Clean up the way a connector must: flush the map, log out, delete the node records.
    kernel.flush_map(name)
    kernel.logout(lun.iqn, PORTALS[0])
    run(["iscsiadm", "-m", "node", "-o", "delete", "-T", lun.iqn])
    kernel.settle()
    took("teardown")
    assert not mapper.exists()
    assert kernel.leftovers() == {}
    print(f"timings (s): {timings}")
