"""ScsiDevices.remove: `multipath -f` retried while the map is in use (udev's blkid after a writer closed
it), up to the device deadline, on the injected clock. Only the volume's devices are removed: disks with
its WWN and disks the failed connect itself made (with a map multipathd built over them alone), never a
disk or map of another identity, nor one with no WWN to compare; a device held open is refused without
force, naming the holder."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from blockwire.errors import FailedPrecondition
from hostagent.connectors.scsi import FLUSH_RETRY_MAX, USERS_GRACE, ScsiDevices
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevDevice
from hostagent.tools.multipath import Multipath
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.openers import FakeOpeners
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
    """sd disks, each with its WWN and a map over it: disk -> (dm-N, map name, the map's WWID); the
    disk's `holders/` and the map's `slaves/` entries, as the kernel links them."""
    for dev, (dm, name, wwid) in holders.items():
        _disk(root, dev, wwid)
        (root / f"block/{dev}/holders/{dm}").mkdir(parents=True)
        (root / f"block/{dm}/slaves/{dev}").mkdir(parents=True)
        (root / f"block/{dm}/dm").mkdir(parents=True, exist_ok=True)
        (root / f"block/{dm}/dm/name").write_text(name + "\n")
        (root / f"block/{dm}/dm/uuid").write_text(f"mpath-{wwid}\n")
    return Sysfs(root)


def _disk(root: Path, dev: str, wwid: str) -> None:
    """An sd disk whose VPD 0x83 identity is the WWN of multipath's `wwid`."""
    (root / f"block/{dev}/device").mkdir(parents=True, exist_ok=True)
    (root / f"block/{dev}/device/wwid").write_text(f"naa.{wwid[1:]}\n")
    (root / f"block/{dev}/device/delete").write_text("")


def _deleted(devices: ScsiDevices, dev: str) -> bool:
    return devices.sysfs.read(f"block/{dev}/device/delete") == "1"


def _rig(
    tmp_path: Path,
    flush_replies: list[Reply],
    *,
    wwid: str = WWID,
    name: str = "mpatha",
    openers: FakeOpeners | None = None,
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
    devices = ScsiDevices(
        sysfs,
        udev,
        Multipath(runner),
        clock,
        openers=openers or FakeOpeners(),
        device_timeout=10.0,
        use_multipath=True,
    )
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


def test_a_map_multipathd_built_over_disks_a_failed_connect_made_is_flushed(tmp_path: Path) -> None:
    # The refused-identity case: this connect's scan brought disks of another WWID, multipathd mapped them.
    devices, runner, udev, _ = _rig(tmp_path, [Reply(0)], wwid=OTHER_WWID, name="mpathb")
    runner.on(r"multipathd show maps", Reply(0, "name uuid sysfs paths\n"))
    assert devices.holder_maps(["sda", "sdb", "sdz"]) == {"mpathb": f"mpath-{OTHER_WWID}"}
    assert devices.remove(WWN, ["sda", "sdb"], force=True, made={"sda", "sdb"}) == []
    assert runner.ran(r"multipath -f mpathb")
    assert not udev.find("block", lambda d: d.sys_name == "dm-0")
    assert _deleted(devices, "sda")
    assert _deleted(devices, "sdb")


@pytest.mark.parametrize("force", [False, True], ids=["plain", "forced"])
def test_another_volumes_disks_and_map_are_left_alone(tmp_path: Path, force: bool) -> None:
    # A reused LUN: the disks at the volume's address carry another WWN, in a map that is open.
    openers = FakeOpeners()
    openers.hold("dm-0", comm="qemu-system-x86")
    devices, runner, udev, _ = _rig(tmp_path, [Reply(0)], wwid=OTHER_WWID, name="mpathb", openers=openers)
    runner.on(r"multipathd show maps", Reply(0, "name uuid sysfs paths\n"))
    assert devices.remove(WWN, ["sda", "sdb"], force=force) == ["sda", "sdb"]
    assert not runner.ran(r"multipath -f")
    assert udev.find("block", lambda d: d.sys_name == "dm-0")
    assert not _deleted(devices, "sda")
    assert not _deleted(devices, "sdb")


def test_without_a_wwn_no_disk_is_removed(tmp_path: Path) -> None:
    devices, runner, _, _ = _rig(tmp_path, [Reply(0)])
    assert devices.remove("", ["sda", "sdb"], force=True) == ["sda", "sdb"]
    assert not runner.ran(r"multipath -f")
    assert not _deleted(devices, "sda")


def test_a_made_disk_another_volumes_map_took_as_a_path_goes_alone(tmp_path: Path) -> None:
    # multipathd added the disk this connect brought (sdb) to the map of the volume whose WWN it shows.
    devices, runner, udev, _ = _rig(tmp_path, [Reply(0)], wwid=OTHER_WWID, name="mpathb")
    assert devices.remove(WWN, ["sdb"], force=True, made={"sdb"}) == []
    assert not runner.ran(r"multipath -f")  # sda is still a path of mpathb
    assert _deleted(devices, "sdb")
    assert not _deleted(devices, "sda")
    assert udev.find("block", lambda d: d.sys_name == "dm-0")


def test_an_open_map_is_refused_naming_the_holder_and_nothing_is_touched(tmp_path: Path) -> None:
    openers = FakeOpeners()
    openers.hold("dm-0", pid=3141, comm="qemu-system-x86")
    devices, runner, udev, _ = _rig(tmp_path, [Reply(0)], openers=openers)
    with pytest.raises(FailedPrecondition, match=r"/dev/dm-0 \(mpatha\): process 3141 \(qemu-system-x86\)"):
        devices.remove(WWN, ["sda", "sdb"], force=False)
    assert not runner.ran(r"multipath -f")
    assert not _deleted(devices, "sda")
    devices.remove(WWN, ["sda", "sdb"], force=True)  # force: the volume's own devices go anyway
    assert runner.ran(r"multipath -f mpatha")
    assert not udev.find("block", lambda d: d.sys_name == "dm-0")
    assert _deleted(devices, "sda")
    assert _deleted(devices, "sdb")


def test_a_disk_held_open_is_refused_and_so_is_one_with_a_dm_device_built_on_it(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    _disk(root, "sdc", WWID)
    _disk(root, "sdd", WWID)
    (root / "block/sdd/holders/dm-7").mkdir(parents=True)  # LVM over the disk, not a multipath map
    (root / "block/dm-7/dm").mkdir(parents=True)
    (root / "block/dm-7/dm/name").write_text("vg-data\n")
    (root / "block/dm-7/dm/uuid").write_text("LVM-abc\n")
    openers = FakeOpeners()
    openers.hold("sdc", pid=777, comm="dd")
    devices = ScsiDevices(
        Sysfs(root), FakeUdev(), Multipath(FakeRunner()), FakeClock(),
        openers=openers, device_timeout=10.0, use_multipath=True,
    )  # fmt: skip
    with pytest.raises(FailedPrecondition, match=r"/dev/sdc: process 777 \(dd\) holds it open"):
        devices.remove(WWN, ["sdc"], force=False)
    with pytest.raises(FailedPrecondition, match=r"/dev/sdd: /dev/dm-7 \(vg-data\) is built on it"):
        devices.remove(WWN, ["sdd"], force=False)
    assert not _deleted(devices, "sdc")
    assert not _deleted(devices, "sdd")


def test_a_holder_that_lets_go_within_the_grace_is_no_refusal(tmp_path: Path) -> None:
    # QEMU finishing its blockdev-del after the unplug: it closes the map a moment later.
    openers = FakeOpeners()
    openers.hold("dm-0", comm="qemu-system-x86", asks=3)
    devices, runner, udev, clock = _rig(tmp_path, [Reply(0)], openers=openers)
    devices.remove(WWN, ["sda", "sdb"], force=False)
    assert clock.sleeps == [0.1, 0.2, 0.4]
    assert runner.ran(r"multipath -f mpatha")
    assert not udev.find("block", lambda d: d.sys_name == "dm-0")


def test_a_holder_that_stays_is_refused_after_the_grace(tmp_path: Path) -> None:
    openers = FakeOpeners()
    openers.hold("dm-0", comm="qemu-system-x86")
    devices, runner, _, clock = _rig(tmp_path, [Reply(0)], openers=openers)
    with pytest.raises(FailedPrecondition, match=r"qemu-system-x86\) holds it open.*or force"):
        devices.remove(WWN, ["sda", "sdb"], force=False)
    assert 1.0 <= sum(clock.sleeps) <= USERS_GRACE
    assert not runner.ran(r"multipath -f")
