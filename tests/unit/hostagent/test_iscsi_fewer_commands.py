"""The kernel iSCSI connector's short paths: node settings in one iscsiadm run per path, the session's
SCSI host read from sysfs (no `iscsiadm -m session -P 3` during connect), the map found in sysfs."""

from __future__ import annotations

from dataclasses import replace

from blockwire.model import ConnectionInfo, IscsiConnection
from tests.unit.hostagent.test_scsi_connectors import TARGET, WWID, Kernel, dm, info, kernel, rig

__all__ = ["kernel"]  # the fixture, shared with test_scsi_connectors


def sessions_in_sysfs(k: Kernel) -> None:
    for sid, host, address in ((1, 6, "127.0.0.1"), (2, 7, "127.0.0.2")):
        k.write(f"class/iscsi_session/session{sid}/targetname", TARGET + "\n")
        k.write(f"class/iscsi_connection/connection{sid}:0/persistent_address", address + "\n")
        k.write(f"class/iscsi_connection/connection{sid}:0/persistent_port", "3260\n")
        (k.root / f"class/scsi_host/host{host}/device/session{sid}").mkdir(parents=True)


def test_node_settings_are_one_update_per_path(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    conn.connect(info(mutual=True))
    updates = runner.ran(r"-o update")
    assert len(updates) == 2
    for argv in updates:
        names = [argv[i + 1] for i, a in enumerate(argv) if a == "-n"]
        assert names == [
            "node.startup",
            "node.session.scan",
            "node.session.initial_login_retry_max",
            "node.session.auth.authmethod",
            "node.session.auth.username",
            "node.session.auth.password",
            "node.session.auth.username_in",
            "node.session.auth.password_in",
        ]


def test_the_session_host_comes_from_sysfs(kernel: Kernel) -> None:
    sessions_in_sysfs(kernel)
    conn, runner, _ = rig(kernel)
    dev = conn.connect(info())
    assert dev.path_devices == ("/dev/sda", "/dev/sdb")
    assert not runner.ran(r"-m session -P 3")


def test_a_map_multipathd_built_is_used_as_it_is(kernel: Kernel) -> None:
    conn, runner, udev = rig(kernel)
    built: list[bool] = []

    def multipathd_maps_both(u: object) -> None:
        if (kernel.root / "block/sdb").exists() and not built:
            built.append(True)
            kernel.write("block/dm-0/dm/uuid", f"mpath-{WWID}\n")
            kernel.write("block/dm-0/dm/name", "mpatha\n")
            (kernel.root / "block/dm-0/slaves/sda").mkdir(parents=True)
            (kernel.root / "block/dm-0/slaves/sdb").mkdir(parents=True)
            udev.add(dm())

    udev.on_trigger.append(multipathd_maps_both)
    dev = conn.connect(info())
    assert dev.multipath_name == "mpatha"
    assert not runner.ran(r"multipath -a")
    assert not runner.ran(r"multipathd add path")
    conn.disconnect(info())
    assert runner.ran(r"multipath -f mpatha")
    assert not runner.ran(r"multipathd show maps")


def test_disconnect_finds_sessions_and_disks_in_sysfs(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    conn.connect(info())
    conn.disconnect(info())
    assert not runner.ran(r"-m session")  # no `iscsiadm -m session -P 3` walk of every session
    assert len(runner.ran(r"--logout")) == 2
    assert not list((kernel.root / "class/iscsi_session").iterdir())
    conn.disconnect(info())  # a repeat: the sessions are gone, so no logout is tried again
    assert len(runner.ran(r"--logout")) == 2
    assert len(runner.ran(r"-o delete")) == 2  # one per-target delete each time, again idempotently


def single_path() -> ConnectionInfo:
    two = info()
    assert isinstance(two.transport, IscsiConnection)
    return replace(two, transport=replace(two.transport, paths=two.transport.paths[:1]))


def test_a_volume_announced_with_one_path_is_its_disk_without_a_map(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    dev = conn.connect(single_path())
    assert dev.path == "/dev/sda"
    assert dev.multipath_name == ""
    assert not runner.ran(r"multipath")  # no WWID allowed, no path added, no map waited for
    conn.disconnect(single_path())
    assert not runner.ran(r"multipath")
    assert not (kernel.root / "block/sda").exists()
    assert len(runner.ran(r"--logout")) == 1


def test_multipath_always_maps_a_single_path_volume(kernel: Kernel) -> None:
    conn, runner, udev = rig(kernel)
    conn.scsi.map_single_path = True

    def multipathd_maps_sda(u: object) -> None:
        added = runner.ran(r"multipathd add path sda") and not runner.ran(r"multipath -f")
        if added and not udev.find("block", lambda d: d.sys_name == "dm-0"):
            kernel.add_map("dm-0", "mpatha", ["sda"])
            udev.add(dm())

    udev.on_trigger.append(multipathd_maps_sda)
    dev = conn.connect(single_path())
    assert dev.path == "/dev/dm-0"
    assert runner.ran(rf"multipath -a {WWID}")
    conn.disconnect(single_path())
    assert runner.ran(r"multipath -f mpatha")
