"""Host tier: the real `blockwire-storage` daemon (subprocess, unix socket) exporting through the real tgtd
fixture, checked with real initiators: libiscsi (iscsi-inq, iscsi-readcapacity16, and its C API for the raw
VPD 0x83 designators) and QEMU's iSCSI block driver (qemu-io) for data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from storagesvc.targets.tgt import TgtLun, parse_targets
from tests.conftest import tier_unavailable
from tests.host import libiscsi
from tests.host.daemons import Tgtd
from tests.rig import Daemon

MIB = 1024 * 1024
HOST_IQN = "iqn.2026-01.io.blockwire.test:host-a"
OTHER_IQN = "iqn.2026-01.io.blockwire.test:host-b"


# -- a real initiator: libiscsi's C API, for the raw designators iscsi-inq prints as text


class _Designator(ctypes.Structure):
    pass


_Designator._fields_ = [
    ("next", ctypes.POINTER(_Designator)),
    ("protocol_identifier", ctypes.c_int),
    ("code_set", ctypes.c_int),
    ("piv", ctypes.c_int),
    ("association", ctypes.c_int),
    ("designator_type", ctypes.c_int),
    ("designator_length", ctypes.c_int),
    ("designator", ctypes.POINTER(ctypes.c_ubyte)),
]


class _DeviceIdentification(ctypes.Structure):
    _fields_ = [
        ("qualifier", ctypes.c_int),
        ("device_type", ctypes.c_int),
        ("pagecode", ctypes.c_int),
        ("designators", ctypes.POINTER(_Designator)),
    ]


def _libiscsi() -> ctypes.CDLL:
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        tier_unavailable("host", "libiscsi not found: apt-get install libiscsi7 libiscsi-bin")
    lib.iscsi_create_context.restype = ctypes.c_void_p
    lib.iscsi_create_context.argtypes = [ctypes.c_char_p]
    lib.iscsi_destroy_context.argtypes = [ctypes.c_void_p]
    lib.iscsi_set_targetname.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.iscsi_set_session_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_set_initiator_username_pwd.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.iscsi_full_connect_sync.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.iscsi_get_error.restype = ctypes.c_char_p
    lib.iscsi_get_error.argtypes = [ctypes.c_void_p]
    lib.iscsi_inquiry_sync.restype = ctypes.c_void_p
    lib.iscsi_inquiry_sync.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.scsi_datain_unmarshall.restype = ctypes.c_void_p
    lib.scsi_datain_unmarshall.argtypes = [ctypes.c_void_p]
    lib.scsi_free_scsi_task.argtypes = [ctypes.c_void_p]
    lib.iscsi_logout_sync.argtypes = [ctypes.c_void_p]
    return lib


def lun_designators(
    portal: str, target: str, lun: int, initiator: str, user: str, password: str
) -> list[tuple[int, int, str]]:
    """(designator type, association, hex) of every designator in VPD page 0x83, read over iSCSI."""
    lib = _libiscsi()
    ctx = lib.iscsi_create_context(initiator.encode())
    try:
        lib.iscsi_set_targetname(ctx, target.encode())
        lib.iscsi_set_session_type(ctx, 2)  # ISCSI_SESSION_NORMAL
        lib.iscsi_set_initiator_username_pwd(ctx, user.encode(), password.encode())
        if lib.iscsi_full_connect_sync(ctx, portal.encode(), lun) != 0:
            raise AssertionError(f"login to {target} on {portal} failed: {lib.iscsi_get_error(ctx).decode()}")
        task = lib.iscsi_inquiry_sync(ctx, lun, 1, 0x83, 255)
        assert task, lib.iscsi_get_error(ctx).decode()
        try:
            page = ctypes.cast(
                lib.scsi_datain_unmarshall(task), ctypes.POINTER(_DeviceIdentification)
            ).contents
            out = []
            d = page.designators
            while d:
                x = d.contents
                out.append(
                    (x.designator_type, x.association, bytes(x.designator[: x.designator_length]).hex())
                )
                d = x.next
            return out
        finally:
            lib.scsi_free_scsi_task(task)
            lib.iscsi_logout_sync(ctx)
    finally:
        lib.iscsi_destroy_context(ctx)


class InquirySession:
    """One libiscsi login kept open, asking the LUN for its VPD page 0x83 again and again: what a logged-in
    host sees of the LUN's identity while storage works on its target."""

    def __init__(self, path: pb.IscsiPath, initiator: str, user: str, password: str) -> None:
        self.lib = _libiscsi()
        self.lun = path.lun
        self.ctx = self.lib.iscsi_create_context(initiator.encode())
        self.lib.iscsi_set_targetname(self.ctx, path.target_iqn.encode())
        self.lib.iscsi_set_session_type(self.ctx, 2)
        self.lib.iscsi_set_initiator_username_pwd(self.ctx, user.encode(), password.encode())
        if self.lib.iscsi_full_connect_sync(self.ctx, path.portal.encode(), path.lun) != 0:
            error = self.lib.iscsi_get_error(self.ctx).decode()
            self.lib.iscsi_destroy_context(self.ctx)
            raise AssertionError(f"login to {path.target_iqn} failed: {error}")

    def identity(self) -> str:
        """The LUN's NAA-6 designators, or what went wrong ("error: ...", "status N")."""
        task = self.lib.iscsi_inquiry_sync(self.ctx, self.lun, 1, 0x83, 255)
        if not task:
            return "error: " + self.lib.iscsi_get_error(self.ctx).decode()
        try:
            status = ctypes.cast(task, ctypes.POINTER(ctypes.c_int))[0]  # struct scsi_task starts with it
            if status != 0:
                return f"status {status}"
            page = ctypes.cast(self.lib.scsi_datain_unmarshall(task), ctypes.POINTER(_DeviceIdentification))
            found = []
            d = page.contents.designators
            while d:
                x = d.contents
                if x.designator_type == 3 and x.association == 0:
                    found.append(bytes(x.designator[: x.designator_length]).hex())
                d = x.next
            return ",".join(h for h in found if h.startswith("6") and len(h) == 32) or ",".join(found)
        finally:
            self.lib.scsi_free_scsi_task(task)

    def close(self) -> None:
        self.lib.iscsi_logout_sync(self.ctx)
        self.lib.iscsi_destroy_context(self.ctx)


def naa_wwn(designators: list[tuple[int, int, str]]) -> str:
    """What Linux takes as the LUN's identity here: the LUN-associated NAA IEEE Registered Extended one."""
    naa6 = [h for t, assoc, h in designators if t == 3 and assoc == 0 and h.startswith("6") and len(h) == 32]
    assert len(naa6) == 1, designators
    return naa6[0]


def run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def qemu_io(
    path: pb.IscsiPath, chap: pb.ChapCredentials, initiator: str, command: str
) -> subprocess.CompletedProcess[str]:
    host, _, port = path.portal.rpartition(":")
    opts = (
        f"driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={host}:{port},"
        f"file.target={path.target_iqn},file.lun={path.lun},file.user={chap.username},"
        f"file.password-secret=chap,file.initiator-name={initiator}"
    )
    return run(
        "qemu-io", "--object", f"secret,id=chap,data={chap.password}", "--image-opts", opts, "-c", command
    )


# -- the daemon


def stub(daemon: Daemon) -> storage_pb2_grpc.StorageServiceStub:
    return storage_pb2_grpc.StorageServiceStub(daemon.channel)


def write_config(tmp: Path, prefix: str, tgtd: Tgtd) -> Path:
    config = tmp / "storage.toml"
    portals = ", ".join(f'"{p}"' for p in tgtd.portals)
    control_port = tgtd.control_port
    config.write_text(
        f"""
[server]
unix_socket = "{tmp}/storage.sock"
log_format = "kv"
log_level = "DEBUG"

[service]
catalog_path = "{tmp}/catalog.db"
iqn_prefix = "{prefix}"

[[backends]]
name = "file"
kind = "file"
path = "{tmp}/volumes"
exporter = "tgt"

[exporters.tgt]
control_port = {control_port}
portals = [{portals}]
"""
    )
    return config


@pytest.fixture
def prefix() -> str:
    """The IQN prefix of the daemon's targets, our own: reconcile removes unknown targets under it, and
    only under it."""
    return f"iqn.2026-01.io.blockwire.t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def storaged(tgtd: Tgtd, tmp_path: Path, prefix: str) -> Iterator[Daemon]:
    daemon = Daemon.storage(
        write_config(tmp_path, prefix, tgtd),
        tmp_path / "storage.sock",
        start_timeout=30,
        health_service="blockwire.v1.StorageService",
    )
    daemon.start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
        # leave tgtd as we found it: no target, no account of ours
        for tid, iqn in targets(tgtd):
            if iqn.startswith(prefix):
                tgtd.adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force", check=False)
                volume_id = iqn.rpartition(":")[2]
                for user in (f"in-{volume_id[:24]}", f"out-{volume_id[:24]}"):
                    tgtd.adm("--op", "delete", "--mode", "account", "--user", user, check=False)
        assert code == 0, daemon.tail(2000)


def targets(tgtd: Tgtd) -> list[tuple[int, str]]:
    out = tgtd.adm("--op", "show", "--mode", "target").stdout
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^Target (\d+): (\S+)$", out, re.M)]


def lun_of(tgtd: Tgtd, target_iqn: str, lun: int = 1) -> TgtLun | None:
    """A LUN of a target as tgtd shows it (backing, identity, state); None when it has none."""
    out = tgtd.adm("--op", "show", "--mode", "target").stdout
    (target,) = [t for t in parse_targets(out) if t.iqn == target_iqn]
    return target.unit(lun)


def accounts(tgtd: Tgtd) -> list[str]:
    out = tgtd.adm("--op", "show", "--mode", "account").stdout
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]


def connector(iqn: str = HOST_IQN, host: str = "host-a") -> pb.Connector:
    return pb.Connector(
        host=host, initiator_iqn=iqn, ips=["127.0.0.1"], multipath=True, transports=[pb.TRANSPORT_ISCSI]
    )


def attach(daemon: Daemon, name: str, size: int = 64 * MIB) -> tuple[pb.Volume, pb.Attachment]:
    vol = stub(daemon).CreateVolume(spb.CreateVolumeRequest(name=name, size_bytes=size), timeout=30).volume
    att = (
        stub(daemon)
        .CreateAttachment(spb.CreateAttachmentRequest(volume_id=vol.id, connector=connector()), timeout=30)
        .attachment
    )
    return vol, att


def detach(daemon: Daemon, vol: pb.Volume, att: pb.Attachment) -> None:
    stub(daemon).DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=30)
    stub(daemon).DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=30)


# -- the tests


def test_lun_is_visible_on_every_portal_with_the_announced_identity_and_size(
    storaged: Daemon, tgtd: Tgtd
) -> None:
    vol, att = attach(storaged, "identity")
    ci = att.connection_info
    assert [p.portal for p in ci.iscsi.paths] == list(tgtd.portals)
    assert len({p.target_iqn for p in ci.iscsi.paths}) == 1
    assert ci.wwn == vol.wwn
    assert len(ci.wwn) == 32
    assert ci.wwn.startswith("6")
    chap = ci.iscsi.chap
    assert len(chap.password) == 16
    for path in ci.iscsi.paths:
        designators = lun_designators(
            path.portal, path.target_iqn, path.lun, HOST_IQN, chap.username, chap.password
        )
        assert naa_wwn(designators) == ci.wwn, path.portal
        cap = run("iscsi-readcapacity16", "-i", HOST_IQN, libiscsi.url(path, chap.username, chap.password))
        assert cap.returncode == 0, cap.stderr
        assert f"Total size:{64 * MIB}" in cap.stdout
        assert ci.size_bytes == 64 * MIB
        inq = libiscsi.inquiry(
            HOST_IQN, libiscsi.url(path, chap.username, chap.password), "-e", "1", "-c", "128"
        )
        assert inq.returncode == 0, inq.stderr
        serial = re.search(r"Unit Serial Number:\[\s*(\S+)\]", inq.stdout)
        assert serial is not None
        assert serial.group(1) == ci.serial == vol.serial
    detach(storaged, vol, att)


def test_data_written_through_one_portal_reads_back_through_the_other(storaged: Daemon) -> None:
    vol, att = attach(storaged, "data")
    first, second = att.connection_info.iscsi.paths
    chap = att.connection_info.iscsi.chap
    wrote = qemu_io(first, chap, HOST_IQN, "write -P 0x5a 1M 2M")
    assert wrote.returncode == 0, wrote.stderr
    read = qemu_io(second, chap, HOST_IQN, "read -P 0x5a 1M 2M")
    assert read.returncode == 0, read.stdout + read.stderr
    assert "Pattern verification failed" not in read.stdout
    zeros = qemu_io(second, chap, HOST_IQN, "read -P 0 0 1M")
    assert zeros.returncode == 0
    assert "Pattern verification failed" not in zeros.stdout
    detach(storaged, vol, att)


def test_an_initiator_outside_the_acl_is_refused(storaged: Daemon) -> None:
    vol, att = attach(storaged, "acl")
    chap = att.connection_info.iscsi.chap
    for path in att.connection_info.iscsi.paths:
        url = libiscsi.url(path, chap.username, chap.password)
        assert "Target not found" in libiscsi.refused(OTHER_IQN, url)
        libiscsi.accepted(HOST_IQN, url)
    detach(storaged, vol, att)


def test_wrong_chap_is_refused_and_the_right_one_accepted(storaged: Daemon) -> None:
    vol, att = attach(storaged, "chap")
    path = att.connection_info.iscsi.paths[0]
    chap = att.connection_info.iscsi.chap
    assert "Authentication failure" in libiscsi.refused(HOST_IQN, libiscsi.url(path, chap.username, "x" * 16))
    libiscsi.refused(HOST_IQN, libiscsi.url(path))
    libiscsi.accepted(HOST_IQN, libiscsi.url(path, chap.username, chap.password))
    detach(storaged, vol, att)


def test_deleting_the_attachment_removes_the_export(storaged: Daemon, tgtd: Tgtd) -> None:
    vol, att = attach(storaged, "teardown")
    iqn = att.connection_info.iscsi.paths[0].target_iqn
    assert iqn in [t for _, t in targets(tgtd)]
    assert att.connection_info.iscsi.chap.username in accounts(tgtd)
    stub(storaged).DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=30)
    stub(storaged).DeleteAttachment(
        spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=30
    )  # repeat: OK
    assert iqn not in [t for _, t in targets(tgtd)]
    assert att.connection_info.iscsi.chap.username not in accounts(tgtd)
    again = stub(storaged).GetVolume(spb.GetVolumeRequest(volume_id=vol.id), timeout=10).volume
    assert again.state == pb.VOLUME_STATE_AVAILABLE
    assert not again.attachment_ids
    stub(storaged).DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=30)


def test_a_tgtd_restart_then_a_service_restart_brings_every_export_back(
    storaged: Daemon, tgtd: Tgtd, prefix: str
) -> None:
    exports = [attach(storaged, f"restart-{i}") for i in range(2)]
    stub(storaged).CompleteAttachment(
        spb.CompleteAttachmentRequest(attachment_id=exports[0][1].id), timeout=10
    )
    tgtd.restart()
    assert not [t for _, t in targets(tgtd) if t.startswith(prefix)]
    # a stray target under our prefix, unknown to the catalog: removed on start
    stray = f"{prefix}:{'f' * 32}"
    tgtd.adm("--op", "new", "--mode", "target", "--tid", "999", "-T", stray)
    assert storaged.stop() == 0
    storaged.start()
    live = [t for _, t in targets(tgtd)]
    assert stray not in live
    for _vol, att in exports:
        ci = att.connection_info
        chap = ci.iscsi.chap
        for path in ci.iscsi.paths:
            assert path.target_iqn in live
            designators = lun_designators(
                path.portal, path.target_iqn, path.lun, HOST_IQN, chap.username, chap.password
            )
            assert naa_wwn(designators) == ci.wwn
        libiscsi.refused(OTHER_IQN, libiscsi.url(ci.iscsi.paths[0], chap.username, chap.password))
    states = [
        stub(storaged).GetVolume(spb.GetVolumeRequest(volume_id=v.id), timeout=10).volume.state
        for v, _ in exports
    ]
    assert states == [pb.VOLUME_STATE_IN_USE, pb.VOLUME_STATE_ATTACHING]
    for vol, att in exports:
        detach(storaged, vol, att)
    assert not [t for _, t in targets(tgtd) if t.startswith(prefix)]


def test_an_extend_keeps_the_luns_identity_for_a_logged_in_host(storaged: Daemon, tgtd: Tgtd) -> None:
    """ExtendVolume re-opens LUN 1 in place (issue 11, item 7): a host that stays logged in and asks
    for the LUN's identity all through a series of extends never sees it missing or with tgt's
    default identity, and sees the new size."""
    vol, att = attach(storaged, "extend", size=16 * MIB)
    ci = att.connection_info
    path, chap = ci.iscsi.paths[0], ci.iscsi.chap
    session = InquirySession(path, HOST_IQN, chap.username, chap.password)
    seen: list[str] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            seen.append(session.identity())

    poller = threading.Thread(target=ask)
    poller.start()
    size = 16 * MIB
    try:
        for _ in range(20):
            size += MIB
            stub(storaged).ExtendVolume(
                spb.ExtendVolumeRequest(volume_id=vol.id, new_size_bytes=size), timeout=30
            )
    finally:
        stop.set()
        poller.join(30)
        session.close()
    assert len(seen) > 20  # the host asked all along
    assert set(seen) == {ci.wwn}, sorted(set(seen))
    unit = lun_of(tgtd, path.target_iqn)
    assert unit is not None
    assert (unit.scsi_id, unit.scsi_sn, unit.online) == (ci.wwn, ci.serial, True)
    cap = run("iscsi-readcapacity16", "-i", HOST_IQN, libiscsi.url(path, chap.username, chap.password))
    assert f"Total size:{size}" in cap.stdout, cap.stdout + cap.stderr
    detach(storaged, vol, att)


def test_a_lun_deleted_behind_storages_back_comes_back_by_the_export_checks(
    storaged: Daemon, tgtd: Tgtd
) -> None:
    """The export supervision looks at each live export's LUN too, not only its target and ACL."""
    vol, att = attach(storaged, "lost-lun")
    ci = att.connection_info
    path, chap = ci.iscsi.paths[0], ci.iscsi.chap
    (tid,) = [t for t, iqn in targets(tgtd) if iqn == path.target_iqn]
    tgtd.adm("--op", "delete", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1")
    assert lun_of(tgtd, path.target_iqn) is None
    deadline = time.monotonic() + 20  # export_check_interval is 2 s
    while (unit := lun_of(tgtd, path.target_iqn)) is None or unit.scsi_id != ci.wwn:
        assert time.monotonic() < deadline, "the export checks did not put LUN 1 back"
        time.sleep(0.2)
    assert [t for t, iqn in targets(tgtd) if iqn == path.target_iqn] == [tid]  # the same target
    for p in ci.iscsi.paths:
        designators = lun_designators(p.portal, p.target_iqn, p.lun, HOST_IQN, chap.username, chap.password)
        assert naa_wwn(designators) == ci.wwn
    inq = libiscsi.inquiry(HOST_IQN, libiscsi.url(path, chap.username, chap.password), "-e", "1", "-c", "128")
    assert re.search(rf"Unit Serial Number:\[\s*{ci.serial}\]", inq.stdout), inq.stdout
    ops = stub(storaged).GetBackendStats(spb.GetBackendStatsRequest(), timeout=10).operations
    assert [(o.count, o.errors) for o in ops if o.operation == "export_repair"] == [(1, 0)]
    assert "has no LUN 1" in storaged.log.read_text()
    detach(storaged, vol, att)


def test_sigterm_stops_the_daemon_cleanly(storaged: Daemon) -> None:
    assert storaged.stop() == 0
    assert 'msg="stopped"' in storaged.log.read_text()
    assert not os.path.exists(storaged.socket) or storaged.socket.is_socket()
    storaged.start()  # the fixture stops it again
