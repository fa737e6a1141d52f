"""os-brick and blockwire's os-brick facade (`hostagent.brick`) run the same scenario on the same LUN, with
the same connection properties (Cinder's `data`, two portals, CHAP-less tgt): connect -> a multipath
device with the LUN's WWN -> data written and read back (and found in the backing file) -> the volume
paths -> disconnect -> nothing left. The results must agree, and neither may leave anything behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.attach_guest import OsBrick
from hostagent.brick import Brick
from hostagent.config import AgentConfig
from hostagent.wiring import build_agent
from tests.guest.inside import kernel
from tests.guest.inside.kernel import PORTALS

MiB = 1024 * 1024


def _props(lun: kernel.Lun) -> dict[str, Any]:
    return {
        "target_discovered": False,
        "target_portal": PORTALS[0],
        "target_iqn": lun.iqn,
        "target_lun": lun.lun,
        "target_portals": list(PORTALS),
        "target_iqns": [lun.iqn] * len(PORTALS),
        "target_luns": [lun.lun] * len(PORTALS),
        "volume_id": f"brick-{lun.tid}",
        "encrypted": False,
        "qos_specs": None,
        "access_mode": "rw",
        "discard": False,
    }


def _wwid(path: str) -> str:
    """The SCSI wwid under a device: a path's own, or a multipath map's first path's."""
    name = os.path.basename(os.path.realpath(path))
    slaves = Path(f"/sys/block/{name}/slaves")
    return kernel.sysfs_wwid(sorted(os.listdir(slaves))[0] if slaves.is_dir() else name)


def _scenario(conn: Any, lun: kernel.Lun, offset_mib: int, *, pass_device_info: bool) -> dict[str, Any]:
    """`pass_device_info=False` disconnects as Nova does: `disconnect_volume(data, None)`."""
    props = _props(lun)
    device = conn.connect_volume(props)
    try:
        path = device["path"]
        again = conn.connect_volume(props)  # os-brick's connect is repeatable; so is blockwire's
        assert again["path"] == path
        size = int(subprocess.run(["blockdev", "--getsize64", path], capture_output=True, text=True,
                                  check=True).stdout)  # fmt: skip
        pattern = kernel.write_pattern(path, offset_mib)
        assert kernel.read_at(path, offset_mib) == pattern
        assert kernel.read_at(lun.backing, offset_mib) == pattern, "the data is not in the LUN's backing file"
        paths = conn.get_volume_paths(props)
        wwid = _wwid(path)
    finally:
        conn.disconnect_volume(props, device if pass_device_info else None)
    kernel.settle()
    return {
        "type": device["type"],
        "multipath": os.path.basename(os.path.realpath(path)).startswith("dm-"),
        "scsi_wwn": device.get("scsi_wwn", ""),
        "size": size,
        "wwid": wwid,
        "paths": len(paths),
        "left": kernel.leftovers(),
    }


@pytest.mark.usefixtures("libvirtd")
def test_the_facade_and_os_brick_agree_and_leave_nothing(lun: kernel.Lun, tmp_path: Path) -> None:
    brick = OsBrick(multipath=True, lock_dir=tmp_path / "locks").conn
    agent, hypervisor = build_agent(
        AgentConfig(state_dir=str(tmp_path / "agent"), iscsi_mode="kernel", multipath="auto"), storage=None
    )
    try:
        facade = Brick(agent).InitiatorConnector.factory("ISCSI", "sudo", use_multipath=True)
        theirs = _scenario(brick, lun, offset_mib=1, pass_device_info=True)
        ours = _scenario(facade, lun, offset_mib=3, pass_device_info=False)
    finally:
        hypervisor.close()
    assert theirs["left"] == {}, f"os-brick left {theirs['left']}"
    assert ours["left"] == {}, f"the facade left {ours['left']}"
    assert ours["wwid"] == theirs["wwid"] == f"naa.{lun.naa}"
    assert ours["multipath"], "the facade returned a single path, not the map"
    assert theirs["multipath"], "os-brick returned a single path, not the map"
    assert ours["size"] == theirs["size"] == 64 * MiB
    assert ours["type"] == theirs["type"] == "block"
    assert ours["scsi_wwn"].removeprefix("3").endswith(lun.naa[-16:])
    assert ours["paths"] >= 1
