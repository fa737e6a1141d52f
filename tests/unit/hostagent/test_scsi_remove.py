"""ScsiDevices.remove: `multipath -f` retried while the map is in use (udev's blkid after a writer closed
it), up to the device deadline, on the injected clock; maps found by the disks' holders are flushed
whatever their WWID (multipathd may build a map over a disk whose identity was refused)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from blockwire.errors import FailedPrecondition
from hostagent.connectors.scsi import FLUSH_RETRY_MAX, ScsiDevices
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevDevice
from hostagent.tools.multipath import Multipath
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.udev import FakeUdev
from tests.unit.hostagent.test_tools import WWID, WWN, recorded

IN_USE = Reply(1, "", "mpatha: map in use\n")
# multipath's open-count check passed, then the remove ioctl met an opener (recorded on a guest run).
REMOVE_BUSY = Reply(
    1,
    "",
    "307.543790 | libdevmapper: ioctl/libdm-iface.c(1980): device-mapper: remove ioctl on mpatha  "
    "failed: Device or resource busy\n",
)
OTHER_WWID = "36001405bbbbbbbbbbbbbbbbbbbb00000"


def _dm(name: str, map_name: str, wwid: str) -> UdevDevice:
    props = {"DEVTYPE": "disk", "DM_UUID": f"mpath-{wwid}", "DM_NAME": map_name}
    return UdevDevice(name, sys_path=f"/devices/virtual/block/{name}", properties=MappingProxyType(props))


def _sysfs(root: Path, holders: dict[str, tuple[str, str, str]]) -> Sysfs:
    """sd disks with a `holders/` entry each: disk -> (dm-N, map name, WWID)."""
    for dev, (dm, name, wwid) in holders.items():
        (root / f"block/{dev}/holders/{dm}").mkdir(parents=True)
        (root / f"block/{dm}/dm").mkdir(parents=True, exist_ok=True)
        (root / f"block/{dm}/dm/name").write_text(name + "\n")
        (root / f"block/{dm}/dm/uuid").write_text(f"mpath-{wwid}\n")
    return Sysfs(root)


def _rig(
    tmp_path: Path, flush_replies: list[Reply], *, wwid: str = WWID, name: str = "mpatha"
) -> tuple[ScsiDevices, FakeRunner, FakeUdev, FakeClock]:
    udev = FakeUdev()
    udev.add(_dm("dm-0", name, wwid))
    replies = iter(flush_replies)
    runner = FakeRunner().on(r"multipathd show maps", Reply(0, recorded("multipathd_show_maps.txt")))
    runner.on(rf"multipath -f {name}", lambda argv: next(replies))

    def react(u: FakeUdev) -> None:
        last = runner.ran(r"multipath -f")
        if last and len(last) == len(flush_replies) and flush_replies[-1].returncode == 0:
            u.remove("dm-0")

    udev.on_trigger.append(react)
    clock = FakeClock()
    sysfs = _sysfs(tmp_path / "sys", {"sda": ("dm-0", name, wwid), "sdb": ("dm-0", name, wwid)})
    devices = ScsiDevices(sysfs, udev, Multipath(runner), clock, device_timeout=10.0, use_multipath=True)
    return devices, runner, udev, clock


@pytest.mark.parametrize(
    "refusals",
    [[IN_USE, IN_USE, IN_USE], [REMOVE_BUSY, IN_USE, REMOVE_BUSY]],
    ids=["map-in-use", "remove-ioctl-busy"],
)
def test_a_map_in_use_is_flushed_again_with_backoff_until_it_goes(
    tmp_path: Path, refusals: list[Reply]
) -> None:
    devices, runner, udev, clock = _rig(tmp_path, [*refusals, Reply(0)])
    devices.remove(WWN, ["sda", "sdb"], force=False)
    assert len(runner.ran(r"multipath -f mpatha")) == 4
    assert clock.sleeps == [0.1, 0.2, 0.4]
    assert not udev.find("block", lambda d: d.sys_name == "dm-0")


def test_a_map_still_in_use_at_the_deadline_is_failed_precondition(tmp_path: Path) -> None:
    devices, runner, _, clock = _rig(tmp_path, [IN_USE] * 100)
    with pytest.raises(FailedPrecondition, match="mpatha is in use"):
        devices.remove(WWN, ["sda", "sdb"], force=False)
    assert sum(clock.sleeps) <= 10.0
    assert max(clock.sleeps) == FLUSH_RETRY_MAX
    assert 5 < len(runner.ran(r"multipath -f mpatha")) < 30  # bounded by the deadline


def test_other_flush_failures_are_not_retried(tmp_path: Path) -> None:
    devices, runner, _, clock = _rig(tmp_path, [Reply(1, "", "mpatha: some other failure\n")] * 3)
    with pytest.raises(FailedPrecondition):
        devices.remove(WWN, ["sda", "sdb"], force=False)
    assert len(runner.ran(r"multipath -f")) == 1
    assert clock.sleeps == []


def test_a_map_over_the_disks_with_another_wwid_is_flushed_too(tmp_path: Path) -> None:
    # The refused-identity case: the disks carry another volume's WWID, multipathd mapped them.
    devices, runner, udev, _ = _rig(tmp_path, [Reply(0)], wwid=OTHER_WWID, name="mpathb")
    runner.on(r"multipathd show maps", Reply(0, "name uuid sysfs paths\n"))
    assert devices.holder_maps(["sda", "sdb", "sdz"]) == {"mpathb": f"mpath-{OTHER_WWID}"}
    devices.remove(WWN, ["sda", "sdb"], force=False)
    assert runner.ran(r"multipath -f mpathb")
    assert not udev.find("block", lambda d: d.sys_name == "dm-0")
