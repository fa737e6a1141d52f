"""NVMe/TCP without native NVMe multipath (nvme_core multipath=N): every portal connected, each controller's
namespace device verified, a dm-multipath map over them (the maps code the kernel iSCSI path uses), the map
flushed on disconnect under the same rules; on the fake kernel (tests/fakes/nvme.py, multipath=False) and
a fake multipathd (tests/fakes/multipathd.py) behind the Runner seam. The parsers and what the connector
relies on (the map's WWID is the namespace's sysfs wwid = udev's ID_WWN) on output recorded in the guest
(tests/data/recorded/nvme_mp_*)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from blockwire.errors import FailedPrecondition, IdentityMismatch
from hostagent.connectors.dm_multipath import MultipathMaps
from hostagent.connectors.nvme import NvmeConnector
from hostagent.host.nvme import NvmeHost
from hostagent.host.sysfs import Sysfs
from hostagent.tools.multipath import Multipath, parse_multipath_ll, parse_show_maps, parse_show_paths
from hostagent.tools.nvme import Timeouts
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner
from tests.fakes.multipathd import FakeMultipathd
from tests.fakes.nvme import FakeNs, FakeNvmeKernel
from tests.fakes.openers import FakeOpeners
from tests.fakes.udev import FakeUdev
from tests.unit.hostagent.test_nvme import HOSTID, HOSTNQN, NGUID, NQN, P1, P2, UUID, info

REC = Path(__file__).resolve().parents[2] / "data" / "recorded"
WWID = f"uuid.{UUID}"
NGUID_ONLY = "7a1b2c3d4e5f60718293a4b5c6d7e8f9"


def recorded(name: str) -> str:
    return (REC / f"nvme_mp_{name}").read_text()


def attrs(name: str) -> dict[str, str]:
    return dict(line.split(" ", 1) if " " in line else (line, "") for line in recorded(name).splitlines())


def udev_props(name: str) -> dict[str, str]:
    return dict(
        line[3:].split("=", 1)
        for line in recorded(name).splitlines()
        if line.startswith("E: ") and "=" in line
    )


# -- recorded: what multipathd makes of NVMe namespace devices ----------------------------------------------


def test_the_recording_is_of_native_multipath_off() -> None:
    assert recorded("module_nvme_core_multipath.txt").strip() == "N"
    assert "nvme0n1" in recorded("ls_class_nvme_nvme0.txt")  # the controller's own namespace device


def test_multipathd_paths_and_maps_of_nvme_namespaces_parse() -> None:
    paths = parse_show_paths(recorded("multipathd_show_paths_format.txt"))
    assert [(p.dev, p.wwid, p.dm_state, p.checker) for p in paths] == [
        ("nvme0n1", WWID, "active", "ready"),
        ("nvme1n1", WWID, "active", "ready"),
        ("nvme2n1", f"eui.{NGUID_ONLY}", "active", "ready"),
    ]
    assert parse_show_paths(recorded("multipathd_show_paths.txt")) == []  # the default layout is not ours
    maps = parse_show_maps(recorded("multipathd_show_maps_format.txt"))
    assert [(m.name, m.wwid, m.sysfs, m.paths) for m in maps] == [
        ("mpatha", WWID, "dm-0", 2),
        ("mpathb", f"eui.{NGUID_ONLY}", "dm-1", 1),
    ]


def test_multipath_ll_of_nvme_maps_parses_with_a_faulty_path() -> None:
    a, b = parse_multipath_ll(recorded("multipath_ll.txt"))
    assert (a.name, a.wwid, a.sysfs, a.size) == ("mpatha", WWID, "dm-0", "32M")
    assert [p[1] for p in a.paths] == ["nvme0n1", "nvme1n1"]
    assert (b.wwid, [p[1] for p in b.paths]) == (f"eui.{NGUID_ONLY}", ["nvme2n1"])
    down, _ = parse_multipath_ll(recorded("multipath_ll_one_down.txt"))
    assert [(p[1], p[2]) for p in down.paths] == [
        ("nvme0n1", "active ready  running"),
        ("nvme1n1", "active faulty running"),
    ]


def test_the_map_wwid_is_the_namespace_wwid_which_udev_calls_id_wwn() -> None:
    """What the connector relies on: multipathd's WWID of an NVMe namespace is its sysfs `wwid` (udev's
    ID_WWN; uuid.<UUID> when the namespace has a UUID, eui.<NGUID> otherwise), the map's dm uuid
    mpath-<that>; the sysfs nguid/uuid are those the target announced."""
    ns = attrs("sysfs_block_nvme0n1.txt")
    assert ns["wwid"] == WWID == udev_props("udevadm_info_nvme0n1.txt")["ID_WWN"]
    assert (ns["nguid"].replace("-", ""), ns["uuid"]) == (NGUID, UUID)
    assert attrs("sysfs_block_nvme1n1.txt")["wwid"] == WWID
    assert attrs("sysfs_block_nvme2n1.txt")["wwid"] == f"eui.{NGUID_ONLY}"
    assert attrs("sysfs_block_dm-0.txt") == {
        "dm/name": "mpatha",
        "dm/uuid": f"mpath-{WWID}",
        "slaves": "nvme0n1 nvme1n1",
    }
    assert udev_props("udevadm_info_dm-0.txt")["DM_UUID"] == f"mpath-{WWID}"
    assert ns["holders"] == "dm-0"
    assert "rc: 1" in recorded("multipath_f_again_rc.txt")
    assert "is not a multipath device" in recorded("multipath_f_again_rc.txt")  # Multipath.flush: False


# -- the connector on the fake kernel ---------------------------------------------------------------------


class Rig:
    def __init__(
        self, tmp_path: Path, *, auto: bool = False, identify: bool = False, map_single_path: bool = False
    ) -> None:
        root = tmp_path / "sys"
        self.udev = FakeUdev()
        self.kernel = FakeNvmeKernel(root, self.udev, multipath=False)
        self.openers = FakeOpeners()
        self.clock = FakeClock()
        self.runner = FakeRunner()
        self.mpd = FakeMultipathd(root, self.udev, self.runner, self.openers, auto=auto)
        sysfs = Sysfs(root)
        self.maps = MultipathMaps(
            sysfs, self.udev, Multipath(self.runner), self.clock, openers=self.openers, device_timeout=5,
            use_multipath=True, map_single_path=map_single_path,
        )  # fmt: skip
        self.conn = NvmeConnector(
            NvmeHost(sysfs, self.kernel.identify if identify else lambda c, n: None),
            self.kernel, self.udev, self.clock,
            openers=self.openers, host_nqn=HOSTNQN, host_id=HOSTID,
            timeouts=Timeouts(ctrl_loss_tmo=1800, reconnect_delay=2), device_timeout=5, maps=self.maps,
        )  # fmt: skip

    def export(self, nguid: str = NGUID, uuid: str = UUID, portals: tuple[str, ...] = (P1, P2)) -> None:
        self.kernel.export(NQN, portals, HOSTNQN, FakeNs(1, nguid, uuid, 16 << 20))

    def namespace_devices(self) -> list[str]:
        return [d for d in self.kernel.heads() if d.startswith("nvme")]

    def nothing_left(self) -> None:
        assert self.kernel.controllers() == []
        assert self.kernel.heads() == []  # no namespace device, no dm map
        assert self.mpd.maps() == {}


@pytest.mark.parametrize("auto", [False, True], ids=["agent-adds-paths", "multipathd-maps-by-itself"])
def test_two_portals_one_map_then_nothing_left(tmp_path: Path, auto: bool) -> None:
    r = Rig(tmp_path, auto=auto)
    r.export()
    dev = r.conn.connect(info())
    assert (dev.path, dev.multipath_name, dev.wwn, dev.size_bytes) == ("/dev/dm-0", "mpatha", NGUID, 16 << 20)
    assert sorted(dev.path_devices) == ["/dev/nvme0", "/dev/nvme1"]
    assert len(r.kernel.written) == 2  # both portals connected
    assert r.mpd.maps() == {"mpatha": ["nvme0n1", "nvme1n1"]}
    if not auto:
        assert r.runner.ran(rf"multipath -a {WWID}")
        assert len(r.runner.ran("multipathd add path")) == 2
    assert r.conn.paths(info()) == ["/dev/nvme0", "/dev/nvme1"]
    assert r.conn.connect(info()) == dev  # a repeat: the same map, no new controller
    assert len(r.kernel.written) == 2
    r.conn.disconnect(info())
    assert r.runner.ran("multipath -f mpatha")
    r.nothing_left()
    r.conn.disconnect(info())  # idempotent


@pytest.mark.parametrize("identify", [False, True], ids=["sysfs-check", "identify-first"])
def test_each_controllers_namespace_is_verified_and_only_what_the_call_made_is_removed(
    tmp_path: Path, identify: bool
) -> None:
    """A controller on P1 exists already (the volume's namespace on it); the target now offers another
    namespace (a stale re-export) at the same nsid: the new controller on P2 sees it, the connect is
    refused, the controller it made goes with any map multipathd built over its device alone; the
    controller on P1, its device and its map stay."""
    r = Rig(tmp_path, auto=True, identify=identify)
    r.export()
    r.kernel.connect(
        f"traddr=127.0.0.1,trsvcid=4420,nqn={NQN},hostnqn={HOSTNQN},hostid={HOSTID},transport=tcp"
    )
    r.kernel.sync()
    for react in r.udev.on_trigger:  # udev's add event reaches multipathd
        react(r.udev)
    assert r.mpd.maps() == {"mpatha": ["nvme0n1"]}
    other = "55" * 16
    r.kernel.targets[NQN].namespaces[0] = FakeNs(1, other, "55555555-5555-4555-8555-555555555555", 16 << 20)
    with pytest.raises(IdentityMismatch, match=other):
        r.conn.connect(info())
    assert [c["name"] for c in r.kernel.controllers()] == ["nvme0"]
    assert r.namespace_devices() == ["nvme0n1"]
    assert r.mpd.maps() == {"mpatha": ["nvme0n1"]}
    assert not r.runner.ran("multipath -f mpatha")


def test_a_refused_second_path_removes_the_map_multipathd_built_over_it(tmp_path: Path) -> None:
    """Both controllers new, the namespace not the volume's: everything the call made goes, also the map
    multipathd built over the refused devices by itself (find_multipaths no)."""
    r = Rig(tmp_path, auto=True)
    r.export(nguid="66" * 16, uuid="66666666-6666-4666-8666-666666666666")
    with pytest.raises(IdentityMismatch):
        r.conn.connect(info())
    assert r.runner.ran("multipath -f mpatha")
    r.nothing_left()


def test_an_open_map_is_refused_naming_the_holder_unless_forced(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.export()
    r.conn.connect(info())
    r.openers.hold("dm-0", comm="qemu-system-x86")
    with pytest.raises(FailedPrecondition, match=r"/dev/dm-0 \(mpatha\): process 4242 \(qemu-system-x86\)"):
        r.conn.disconnect(info())
    assert not r.runner.ran("multipath -f")
    assert len(r.kernel.controllers()) == 2
    assert r.mpd.maps() == {"mpatha": ["nvme0n1", "nvme1n1"]}
    r.openers.release("dm-0")
    r.openers.hold("dm-0", comm="blkid", asks=2)  # udev's probe after a writer closed it: waited out
    r.conn.disconnect(info())
    r.nothing_left()


def test_a_forced_disconnect_of_a_map_that_stays_in_use_deletes_the_controllers(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.export()
    r.conn.connect(info())
    r.openers.hold("dm-0")
    with pytest.raises(FailedPrecondition, match="in use"):
        r.conn.disconnect(info())
    r.conn.disconnect(info(), force=True)
    assert r.kernel.controllers() == []
    assert r.runner.ran("multipath -f mpatha")


def test_another_volumes_namespaces_keep_the_controllers_but_this_volumes_map_goes(tmp_path: Path) -> None:
    """A per-host subsystem with volumes A (nsid 1) and B (nsid 2): A's detach flushes A's map only."""
    r = Rig(tmp_path)
    b_uuid = "33333333-3333-4333-8333-333333333333"
    r.kernel.export(
        NQN, (P1, P2), HOSTNQN, FakeNs(1, NGUID, UUID, 8 << 20), FakeNs(2, "33" * 16, b_uuid, 8 << 20)
    )
    a = info()
    b = info("vol-b", nguid="33" * 16, uuid=b_uuid, nsid=2)
    assert r.conn.connect(a).multipath_name == "mpatha"
    assert r.conn.connect(b).multipath_name == "mpathb"
    r.conn.disconnect(a)
    assert r.mpd.maps() == {"mpathb": ["nvme0n2", "nvme1n2"]}
    assert len(r.kernel.controllers()) == 2
    r.conn.disconnect(b)  # A's namespace devices are still on the controllers: they stay, B's map goes
    assert len(r.kernel.controllers()) == 2
    assert r.mpd.maps() == {}
    r.kernel.remove_namespace(NQN, 1)  # storage removed A's namespace; the host drops its devices
    r.conn.disconnect(b)
    r.nothing_left()


def test_extend_grows_every_path_and_resizes_the_map(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.export()
    i = replace(info(), size_bytes=16 << 20)
    r.conn.connect(i)
    r.kernel.targets[NQN].namespaces[0].size = 24 << 20
    assert r.conn.extend(replace(i, size_bytes=24 << 20)) == 24 << 20
    assert r.runner.ran("multipathd resize map mpatha")
    assert [r.maps.sysfs.block_size_bytes(d) for d in ("nvme0n1", "nvme1n1", "dm-0")] == [24 << 20] * 3
    r.conn.disconnect(i)
    r.nothing_left()


def test_a_lost_path_is_restored_into_the_map(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.export()
    r.conn.connect(info())
    r.kernel.drop("nvme1")  # ctrl_loss_tmo ran out
    assert r.conn.restore_paths(info()) == ["/dev/nvme2"]
    assert r.mpd.maps() == {
        "mpatha": ["nvme0n1", "nvme1n1", "nvme2n1"]
    }  # nvme1n1: the fake keeps the stale slave
    assert r.runner.ran("multipathd add path nvme2n1")


def test_one_portal_is_its_plain_device_unless_every_volume_is_mapped(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.export(portals=(P1,))
    assert r.conn.connect(info(portals=(P1,))).path == "/dev/nvme0n1"
    assert r.mpd.maps() == {}
    r.conn.disconnect(info(portals=(P1,)))
    r.nothing_left()
    r = Rig(tmp_path / "always", map_single_path=True)
    r.export(portals=(P1,))
    assert r.conn.connect(info(portals=(P1,))).path == "/dev/dm-0"
    r.conn.disconnect(info(portals=(P1,)))
    r.nothing_left()


def test_a_map_left_without_paths_is_flushed_by_a_disconnect_with_no_controller_left(tmp_path: Path) -> None:
    """The kernel gave up on every controller (ctrl_loss_tmo) while the map was held: the map of the
    volume's WWID is left with no path. A later disconnect flushes it (not while it is held); a map of
    the volume's WWID that still has paths is not this connection's to flush."""
    r = Rig(tmp_path)
    r.export()
    r.conn.connect(info())
    for c in ("nvme0", "nvme1"):
        r.kernel.drop(c)
    for slave in (r.kernel.root / "block/dm-0/slaves").iterdir():
        slave.rmdir()
    r.openers.hold("dm-0")
    with pytest.raises(FailedPrecondition, match=r"/dev/dm-0 \(mpatha\)"):
        r.conn.disconnect(info())
    r.openers.release("dm-0")
    r.conn.disconnect(info())
    r.nothing_left()
    r.conn.disconnect(info())  # idempotent


def test_the_subsystem_of_a_namespace_device_is_read_from_its_recorded_sysfs_path() -> None:
    """The udev wait tells a volume's namespace device from another's by its sysfs path (no scan of every
    subsystem per event): a head under its subsystem, a controller's own device under the controller."""
    from hostagent.connectors.nvme import _HEAD_PATH, _OWN_PATH  # noqa: PLC0415

    head = (REC / "nvme_udevadm_info_nvme0n1.txt").read_text().splitlines()[0].removeprefix("P: ")
    own = recorded("udevadm_info_nvme0n1.txt").splitlines()[0].removeprefix("P: ")
    m = _HEAD_PATH.search(head)
    assert m
    assert m[1] == "nvme-subsys0"
    assert not _OWN_PATH.search(head)
    m = _OWN_PATH.search(own)
    assert m
    assert m[1] == "nvme0"
    assert not _HEAD_PATH.search(own)
