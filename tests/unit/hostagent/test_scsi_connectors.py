"""Kernel iSCSI and FC connectors on FakeRunner (recorded iscsiadm output), Sysfs(tmp_path) and FakeUdev."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import MappingProxyType

import pytest

from blockwire.errors import FailedPrecondition, IdentityMismatch, PermissionDenied
from blockwire.model import Chap, ConnectionInfo, FcConnection, IscsiConnection, IscsiPath
from blockwire.secret import Secret
from hostagent.connectors.fc import FcConnector
from hostagent.connectors.iscsi import IscsiConnector
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevDevice
from hostagent.tools.iscsiadm import Iscsiadm
from hostagent.tools.multipath import Multipath
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.openers import FakeOpeners
from tests.fakes.udev import FakeUdev
from tests.unit.hostagent.test_tools import TARGET, WWID, WWN, recorded

HOST_IQN = "iqn.2026-01.io.blockwire:host-a"
TARGET_DELETE = ("iscsiadm", "-m", "node", "-T", TARGET, "-o", "delete")


def disk(host: int, lun: int, name: str) -> UdevDevice:
    path = f"/devices/platform/host{host}/session/target{host}:0:0/{host}:0:0:{lun}/block/{name}"
    return UdevDevice(
        name, sys_path=path, device_node=f"/dev/{name}", properties=MappingProxyType({"DEVTYPE": "disk"})
    )


def dm(name: str = "dm-0") -> UdevDevice:
    props = {"DEVTYPE": "disk", "DM_UUID": f"mpath-{WWID}", "DM_NAME": "mpatha"}
    return UdevDevice(name, sys_path=f"/devices/virtual/block/{name}", properties=MappingProxyType(props))


class Kernel:
    """A tiny model of the kernel's sysfs for SCSI disks, in tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sysfs = Sysfs(root)

    def write(self, rel: str, text: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def host(self, n: int) -> None:
        self.write(f"class/scsi_host/host{n}/scan", "")

    def add_disk(self, host: int, lun: int, name: str, wwid: str = f"naa.{WWN}") -> None:
        self.write(f"block/{name}/device/wwid", wwid + "\n")
        self.write(f"block/{name}/device/delete", "")
        self.write(f"block/{name}/device/rescan", "")
        self.write(f"class/block/{name}/size", "131072\n")
        (self.root / f"bus/scsi/devices/{host}:0:0:{lun}/block/{name}").mkdir(parents=True, exist_ok=True)

    def add_session(self, sid: int, host: int, address: str, target: str = TARGET) -> None:
        """What a login leaves in sysfs: the session, its connection, the SCSI host it hangs under."""
        self.write(f"class/iscsi_session/session{sid}/targetname", target + "\n")
        self.write(f"class/iscsi_session/session{sid}/state", "LOGGED_IN\n")
        self.write(f"class/iscsi_connection/connection{sid}:0/persistent_address", address + "\n")
        self.write(f"class/iscsi_connection/connection{sid}:0/persistent_port", "3260\n")
        (self.root / f"class/scsi_host/host{host}/device/session{sid}").mkdir(parents=True, exist_ok=True)

    def remove_session(self, sid: int, host: int) -> None:
        for rel in (
            f"class/iscsi_session/session{sid}",
            f"class/iscsi_connection/connection{sid}:0",
            f"class/scsi_host/host{host}/device/session{sid}",
        ):
            shutil.rmtree(self.root / rel, ignore_errors=True)

    def add_map(self, dm: str, name: str, slaves: list[str]) -> None:
        """A multipath map as sysfs shows it: its uuid and name, its slaves, and the holder links."""
        self.write(f"block/{dm}/dm/uuid", f"mpath-{WWID}\n")
        self.write(f"block/{dm}/dm/name", name + "\n")
        for sd in slaves:
            (self.root / f"block/{dm}/slaves/{sd}").mkdir(parents=True, exist_ok=True)
            (self.root / f"block/{sd}/holders/{dm}").mkdir(parents=True, exist_ok=True)

    def remove_map(self, dm: str, slaves: list[str]) -> None:
        shutil.rmtree(self.root / f"block/{dm}", ignore_errors=True)
        for sd in slaves:
            shutil.rmtree(self.root / f"block/{sd}/holders/{dm}", ignore_errors=True)

    def remove_disk(self, host: int, lun: int, name: str) -> None:
        shutil.rmtree(self.root / f"block/{name}")
        shutil.rmtree(self.root / f"bus/scsi/devices/{host}:0:0:{lun}")


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    k = Kernel(tmp_path / "sys")
    k.host(6)
    k.host(7)
    k.write("class/block/dm-0/size", "131072\n")
    return k


def info(*, wwn: str = WWN, mutual: bool = False) -> ConnectionInfo:
    return ConnectionInfo(
        transport=IscsiConnection(
            paths=(IscsiPath("127.0.0.1:3260", TARGET, 1), IscsiPath("127.0.0.2:3260", TARGET, 1)),
            chap=Chap("user1", Secret("secretpass12")),
            mutual_chap=Chap("tgt1", Secret("mutualpass12")) if mutual else None,
            initiator_iqn=HOST_IQN,
        ),
        volume_id="vol-1",
        wwn=wwn,
    )


def rig(
    kernel: Kernel,
    *,
    logged_in: bool = True,
    wwid: str = f"naa.{WWN}",
    openers: FakeOpeners | None = None,
) -> tuple[IscsiConnector, FakeRunner, FakeUdev]:
    udev = FakeUdev()
    state = {"p3": recorded("iscsiadm_session_P3.txt") if logged_in else ""}
    scanned_luns: list[int] = []
    runner = FakeRunner().on(r"-m session -P 3", lambda argv: Reply(0 if state["p3"] else 21, state["p3"]))
    sessions = {"127.0.0.1:3260": (1, 6), "127.0.0.2:3260": (2, 7)}  # portal -> (sid, SCSI host)

    def login(argv: tuple[str, ...]) -> Reply:
        portal = argv[argv.index("-p") + 1]
        kernel.add_session(*sessions[portal], portal.rsplit(":", 1)[0])
        return Reply()

    def logout(argv: tuple[str, ...]) -> Reply:
        portal = argv[argv.index("-p") + 1]
        sid, host = sessions[portal]
        if not (kernel.root / f"class/iscsi_session/session{sid}").exists():
            return Reply(21, stderr="iscsiadm: No matching sessions found")
        kernel.remove_session(sid, host)
        return Reply()

    runner.on(r"--login", login).on(r"--logout", logout)

    def scanned(u: FakeUdev) -> None:
        for host, name in ((6, "sda"), (7, "sdb")):
            scan = kernel.root / f"class/scsi_host/host{host}/scan"
            if scan.read_text() == "- - 1" and host not in scanned_luns:
                scanned_luns.append(host)  # a scan is an action: it adds the disk once
                kernel.add_disk(host, 1, name, wwid)
                u.add(disk(host, 1, name))
        if runner.ran(r"multipathd add path sdb") and not u.find("block", lambda d: d.sys_name == "dm-0"):
            kernel.add_map("dm-0", "mpatha", ["sda", "sdb"])
            u.add(dm())
        if runner.ran(r"multipath -f mpatha") and u.find("block", lambda d: d.sys_name == "dm-0"):
            kernel.remove_map("dm-0", ["sda", "sdb"])
            u.remove("dm-0")
        for host, name in ((6, "sda"), (7, "sdb")):
            if (kernel.root / f"block/{name}/device/delete").exists() and (
                kernel.root / f"block/{name}/device/delete"
            ).read_text() == "1":
                kernel.remove_disk(host, 1, name)
                u.remove(name)

    udev.on_trigger.append(scanned)
    runner.on(
        r"multipathd show maps",
        lambda argv: Reply(
            0,
            recorded("multipathd_show_maps.txt")
            if udev.find("block", lambda d: d.sys_name == "dm-0")
            else "name uuid sysfs paths\n",
        ),
    )
    conn = IscsiConnector(
        Iscsiadm(runner, FakeClock()),
        kernel.sysfs,
        udev,
        Multipath(runner),
        FakeClock(),
        initiator_iqn=HOST_IQN,
        openers=openers or FakeOpeners(),
    )
    return conn, runner, udev


def test_connect_two_portals_builds_a_verified_multipath_map(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    dev = conn.connect(info(mutual=True))
    assert dev.path == "/dev/dm-0"
    assert dev.multipath_name == "mpatha"
    assert dev.path_devices == ("/dev/sda", "/dev/sdb")
    assert dev.wwn == WWN
    assert dev.size_bytes == 64 << 20
    assert not runner.ran(r"discovery")  # static nodes only
    assert len(runner.ran(r"-o new")) == 2
    assert len(runner.ran(r"-n node.session.scan -v manual")) == 2
    assert len(runner.ran(r"-n node.session.auth.password -v \*\*\*\*\*\*\*\*")) == 2
    assert len(runner.ran(r"-n node.session.auth.password_in")) == 2
    assert any("secretpass12" in c for c in runner.revealed for c in c)
    assert all("secretpass12" not in " ".join(c) for c in runner.calls)
    assert len(runner.ran(r"--login")) == 2
    assert (kernel.root / "class/scsi_host/host6/scan").read_text() == "- - 1"  # only the announced LUN
    assert runner.ran(rf"multipath -a {WWID}")


def test_disconnect_removes_everything_and_is_idempotent(kernel: Kernel) -> None:
    conn, runner, udev = rig(kernel)
    conn.connect(info())
    conn.disconnect(info())
    assert runner.ran(r"multipath -f mpatha")
    assert not (kernel.root / "block/sda").exists()
    assert not (kernel.root / "block/sdb").exists()
    assert len(runner.ran(r"--logout")) == 2
    assert runner.ran(r"-o delete") == [TARGET_DELETE]  # both portals' records in one run
    assert udev.present["block"] == []
    conn.disconnect(info())  # a repeat: nothing to do, no error


def test_a_session_another_lun_uses_is_kept(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    conn.connect(info())
    kernel.add_disk(6, 2, "sdc")  # another LUN on the first portal's session
    conn.disconnect(info())
    assert [c for c in runner.ran(r"--logout")] == [
        ("iscsiadm", "-m", "node", "-T", TARGET, "-p", "127.0.0.2:3260", "--logout")
    ]


def test_wrong_wwn_is_refused_and_undone(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel, wwid="naa.6000000000000b00ffffffffffffffff")
    with pytest.raises(IdentityMismatch, match="refused"):
        conn.connect(info())
    assert not runner.ran(r"multipath -a")  # never mapped, never attached
    assert not (kernel.root / "block/sda").exists()
    assert len(runner.ran(r"--logout")) == 2
    assert runner.ran(r"-o delete") == [TARGET_DELETE]  # both portals' records in one run


STALE_WWN = "6001405aaaaaaaaaaaaaaaaaaaa00000"  # volume A's: its LUN now serves the volume of WWN


def one_path(*, wwn: str = WWN) -> ConnectionInfo:
    return ConnectionInfo(
        transport=IscsiConnection(paths=(IscsiPath("127.0.0.1:3260", TARGET, 1),), initiator_iqn=HOST_IQN),
        volume_id="vol-1",
        wwn=wwn,
    )


def untouched(kernel: Kernel, runner: FakeRunner, disks: tuple[str, ...] = ("sda", "sdb")) -> None:
    """The connected volume's disks, map, sessions and node records are all still there."""
    for dev in disks:
        assert (kernel.root / f"block/{dev}/device/wwid").exists(), f"/dev/{dev} was removed"
        assert (kernel.root / f"block/{dev}/device/delete").read_text() == ""
    if len(disks) > 1:
        assert (kernel.root / "block/dm-0/dm/uuid").exists(), "the map was removed"
        assert not runner.ran(r"multipath -f")
    assert not runner.ran(r"--logout")
    assert not runner.ran(r"-o delete")


def test_refusing_a_reused_lun_leaves_the_volume_now_there_alone(kernel: Kernel) -> None:
    # B (WWN) is connected at the LUN, its map open; A's stale connection info names the same LUN.
    openers = FakeOpeners()
    conn, runner, _ = rig(kernel, openers=openers)
    assert conn.connect(info()).path == "/dev/dm-0"
    openers.hold("dm-0", pid=3141, comm="qemu-system-x86")
    with pytest.raises(IdentityMismatch, match="refused"):
        conn.connect(info(wwn=STALE_WWN))
    untouched(kernel, runner)
    conn.disconnect(info(wwn=STALE_WWN))  # A is not connected here: OK, and B's devices stay
    conn.disconnect(info(wwn=STALE_WWN), force=True)  # force overrides "open", never "not A's"
    untouched(kernel, runner)
    openers.release("dm-0")
    conn.disconnect(info())  # B's own disconnect takes everything
    assert runner.ran(r"multipath -f mpatha")
    assert len(runner.ran(r"--logout")) == 2
    assert runner.ran(r"-o delete") == [TARGET_DELETE]  # both portals' records in one run


@pytest.mark.parametrize("held", ["dm-0", "sdb"])
def test_disconnect_of_an_open_device_is_refused_naming_the_holder(kernel: Kernel, held: str) -> None:
    openers = FakeOpeners()
    conn, runner, udev = rig(kernel, openers=openers)
    conn.connect(info())
    openers.hold(held, pid=4242, comm="sleep")
    with pytest.raises(FailedPrecondition, match=rf"/dev/{held}.*process 4242 \(sleep\) holds it open"):
        conn.disconnect(info())
    untouched(kernel, runner)
    conn.disconnect(info(), force=True)
    assert runner.ran(r"multipath -f mpatha")
    assert not (kernel.root / "block/sda").exists()
    assert not (kernel.root / "block/sdb").exists()
    assert udev.present["block"] == []
    assert len(runner.ran(r"--logout")) == 2


def test_a_single_path_disk_held_open_is_refused_without_force(kernel: Kernel) -> None:
    openers = FakeOpeners()
    conn, runner, _ = rig(kernel, openers=openers)
    assert conn.connect(one_path()).path == "/dev/sda"  # one path, multipath "auto": the disk itself
    openers.hold("sda", pid=4242, comm="sleep")
    with pytest.raises(FailedPrecondition, match=r"/dev/sda: process 4242 \(sleep\) holds it open"):
        conn.disconnect(one_path())
    untouched(kernel, runner, ("sda",))
    conn.disconnect(one_path(), force=True)
    assert not (kernel.root / "block/sda").exists()
    assert runner.ran(r"--logout")


def test_disconnect_without_a_wwn_leaves_the_disks_it_cannot_match(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    conn.connect(info())
    conn.disconnect(info(wwn=""), force=True)
    untouched(kernel, runner)


def test_a_failed_login_on_one_path_does_not_take_the_other_volumes_disk(kernel: Kernel) -> None:
    # B is connected on the first portal only; A's connect logs in the second one, which then fails.
    conn, runner, _ = rig(kernel)
    conn.connect(one_path())
    runner.on(r"127.0.0.2:3260 --login", Reply(24, stderr="iscsiadm: Login failed to authenticate"))
    with pytest.raises(IdentityMismatch):
        conn.connect(info(wwn=STALE_WWN))
    assert (kernel.root / "block/sda/device/delete").read_text() == ""
    assert not (kernel.root / "block/sdb").exists()
    assert not runner.ran(r"--logout")
    assert [c[6] for c in runner.ran(r"-o delete")] == ["127.0.0.2:3260"]  # the record with no session


def test_relogin_keeps_a_session_that_carries_another_volumes_disk(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    conn.connect(info())
    kernel.add_disk(7, 2, "sdc", wwid=f"naa.{STALE_WWN}")  # another volume's LUN on the second session
    conn.relogin_paths(info(), ("127.0.0.2:3260",))
    assert not runner.ran(r"--logout")
    assert (kernel.root / "block/sdc/device/wwid").exists()


def test_chap_failure_is_permission_denied_and_node_records_are_deleted(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel, logged_in=False)
    runner.on(r"--login", Reply(24, stderr="iscsiadm: Login failed to authenticate with target"))
    with pytest.raises(PermissionDenied):
        conn.connect(info())
    assert runner.ran(r"-o delete") == [TARGET_DELETE]  # both portals' records in one run


def test_fc_targeted_scan_and_zoning(kernel: Kernel) -> None:
    kernel.write("class/fc_host/host6/port_name", "0x10000090fa000001\n")
    kernel.write("class/fc_host/host6/node_name", "0x20000090fa000001\n")
    kernel.write("class/fc_transport/target6:0:3/port_name", "0x50060e8000000001\n")
    kernel.write("class/fc_transport/target6:0:4/port_name", "0x50060e80000000ff\n")  # not ours
    udev = FakeUdev()

    def scanned(u: FakeUdev) -> None:
        if (kernel.root / "class/scsi_host/host6/scan").read_text() == "0 3 5" and not u.find(
            "block", lambda d: True
        ):
            kernel.add_disk(6, 5, "sdd")
            u.add(
                UdevDevice(
                    "sdd",
                    sys_path="/devices/pci/host6/rport-6:0-0/target6:0:3/6:0:3:5/block/sdd",
                    properties=MappingProxyType({"DEVTYPE": "disk"}),
                )
            )

    udev.on_trigger.append(scanned)
    runner = FakeRunner()
    fc = FcConnector(
        kernel.sysfs, udev, Multipath(runner), FakeClock(), openers=FakeOpeners(), use_multipath=False
    )
    t = FcConnection(
        target_wwpns=("50060e8000000001",),
        lun=5,
        initiator_target_map={"10000090fa000001": ("50060e8000000001",)},
    )
    dev = fc.connect(ConnectionInfo(transport=t, volume_id="v", wwn=WWN))
    assert dev.path == "/dev/sdd"
    assert (kernel.root / "class/scsi_host/host6/scan").read_text() == "0 3 5"
    fc.disconnect(ConnectionInfo(transport=t, volume_id="v", wwn=WWN))


def test_fc_without_zoned_ports_is_a_failed_precondition(kernel: Kernel) -> None:
    fc = FcConnector(kernel.sysfs, FakeUdev(), Multipath(FakeRunner()), FakeClock(), openers=FakeOpeners())
    with pytest.raises(FailedPrecondition, match="zoning"):
        fc.connect(ConnectionInfo(transport=FcConnection(("50060e8000000001",), 1), volume_id="v"))
