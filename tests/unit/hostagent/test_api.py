"""HostAgent on fakes: attach/detach, idempotency, undo on every failure, journal, reconcile, events."""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import replace
from types import MappingProxyType

import pytest

from blockwire.errors import (
    Aborted,
    FailedPrecondition,
    IdentityMismatch,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from blockwire.model import ConnectionInfo, IoTune, IscsiConnection, LocalConnection, NvmeofConnection
from hostagent.api import combine_iotune
from hostagent.host.udev import UdevDevice
from hostagent.model import AttachmentState, Bus, DiskOptions, EventType
from hostagent.virt.diskxml import BlockSource, NetworkSource
from tests.fakes.executor import Reply
from tests.unit.hostagent.conftest import HOST_IQN, TARGET, Rig, iscsi_info


def assert_nothing_left(rig: Rig, volume: str = "vol-1") -> None:
    assert rig.journal.of_volume(volume) == []
    assert rig.storage.exports == {}
    assert rig.hv.secrets == {}
    assert all(d == [] for d in rig.hv.disks_by_domain.values())


def test_attach_by_volume_id_qemu_iscsi_with_chap(rig: Rig) -> None:
    a = rig.agent.attach("vm1", volume_id="vol-1")
    assert a.state is AttachmentState.ATTACHED
    assert a.target_dev == "sda"
    assert a.attachment_id in rig.storage.exports
    assert rig.storage.completed == [(a.attachment_id, "sda", "")]
    (spec,) = rig.hv.disks_by_domain["vm1"]
    assert isinstance(spec.source, NetworkSource)
    assert spec.source.name == f"{TARGET}/1"
    assert spec.source.initiator_iqn == HOST_IQN
    assert spec.source.auth is not None
    assert spec.serial == "SERIAL1"
    usage = spec.source.auth.usage
    assert rig.hv.secrets[(usage, "iscsi")].reveal() == "secretpass12"
    # the password reached iscsi-inq through its environment, never argv
    assert all("secretpass12" not in " ".join(c) for c in rig.runner.revealed)

    assert rig.agent.detach("vm1", "vol-1") is True
    assert_nothing_left(rig)


def test_attach_and_detach_are_idempotent(rig: Rig) -> None:
    first = rig.agent.attach("vm1", volume_id="vol-1")
    again = rig.agent.attach("vm1", volume_id="vol-1")
    assert again == first
    assert len(rig.hv.disks_by_domain["vm1"]) == 1
    assert rig.agent.detach("vm1", "vol-1") is True
    assert rig.agent.detach("vm1", "vol-1") is False
    assert rig.agent.detach("no-such-domain", "vol-1") is False
    assert_nothing_left(rig)


def test_same_volume_on_another_domain_is_refused_unless_shareable(rig: Rig) -> None:
    rig.agent.attach("vm1", volume_id="vol-1")
    with pytest.raises(FailedPrecondition, match="vm1"):
        rig.agent.attach("vm2", volume_id="vol-1")


def test_unknown_domain_touches_nothing(rig: Rig) -> None:
    with pytest.raises(NotFound, match="nope"):
        rig.agent.attach("nope", volume_id="vol-1")
    assert rig.storage.calls == []
    assert_nothing_left(rig)


def test_stopped_transient_domain_is_a_failed_precondition(rig: Rig) -> None:
    rig.hv.add_domain("gone", running=False, persistent=False)
    with pytest.raises(FailedPrecondition, match="neither running nor defined"):
        rig.agent.attach("gone", volume_id="vol-1")
    assert rig.storage.calls == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "volume"),
        ({"volume_id": "vol-1", "connection_info": iscsi_info()}, "volume"),
        ({"connection_info": replace(iscsi_info(), volume_id="")}, "connection_info.volume_id"),
        ({"volume_id": "vol-1", "disk": DiskOptions(serial="bad serial!")}, "disk.serial"),
        ({"volume_id": "vol-1", "disk": DiskOptions(target_dev="xyz")}, "disk.target_dev"),
        ({"volume_id": "vol-1", "disk": DiskOptions(logical_block_size=1000)}, "disk.logical_block_size"),
    ],
)
def test_invalid_arguments(rig: Rig, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        rig.agent.attach("vm1", **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
    assert_nothing_left(rig)


NVME = ConnectionInfo(transport=NvmeofConnection("nqn x", ()), volume_id="vol-1")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda a: a.attach("vm1/x", volume_id="vol-1"), "domain"),
        (lambda a: a.attach("d" * 256, volume_id="vol-1"), "domain"),
        (lambda a: a.attach("vm1\x00", volume_id="vol-1"), "domain"),
        (lambda a: a.attach("", volume_id="vol-1"), "domain"),
        (lambda a: a.attach("vm1", volume_id="../x"), "volume_id"),
        (lambda a: a.attach("vm1", volume_id="v" * 129), "volume_id"),
        (
            lambda a: a.attach("vm1", connection_info=replace(iscsi_info(), volume_id="a/b")),
            "connection_info.volume_id",
        ),
        (lambda a: a.attach("vm1", connection_info=NVME), "connection_info.nvmeof.subsystem_nqn"),
        (
            lambda a: a.attach("vm1", volume_id="vol-1", disk=DiskOptions(iotune=IoTune(group_name="<x>"))),
            "disk.iotune.group_name",
        ),
        (lambda a: a.detach("vm1", "../x"), "volume_id"),
        (lambda a: a.detach("a/b", "vol-1"), "domain"),
        (lambda a: a.extend("../x"), "volume_id"),
        (lambda a: a.get("../x"), "volume_id"),
        (lambda a: a.get("vol-1", "a/b"), "domain"),
        (lambda a: a.list_attachments("a/b"), "domain"),
        (lambda a: a.connect_volume(replace(iscsi_info(), wwn="6001405;id")), "connection_info.wwn"),
        (lambda a: a.disconnect_volume(ConnectionInfo(LocalConnection("rel"))), "connection_info.local.path"),
    ],
)
def test_an_embedder_gets_the_checks_a_grpc_caller_gets(rig: Rig, call: object, field: str) -> None:
    """HostAgent checks its arguments on entry (blockwire.validate); the servicer only converts, so
    these are the fields AttachVolume & co. name too (tests/contract/test_hostile_agent.py)."""
    with pytest.raises(InvalidArgument) as err:
        call(rig.agent)  # type: ignore[operator]
    assert err.value.field == field
    assert rig.storage.calls == []
    assert rig.runner.revealed == []
    assert_nothing_left(rig)


def test_malformed_portal_in_connection_info(rig: Rig) -> None:
    info = iscsi_info()
    t = info.transport
    assert isinstance(t, IscsiConnection)
    bad = replace(info, transport=replace(t, paths=(replace(t.paths[0], portal="::1"),)))
    with pytest.raises(InvalidArgument, match="brackets"):
        rig.agent.attach("vm1", connection_info=bad)
    assert_nothing_left(rig)


def test_wrong_chap_is_permission_denied_and_undone(rig: Rig) -> None:
    rig.runner.on(
        r"iscsi-inq",
        Reply(10, stderr="Login Failed. Failed to log in to target. Status: Authentication failure(513)\n"),
    )
    with pytest.raises(PermissionDenied, match="CHAP"):
        rig.agent.attach("vm1", volume_id="vol-1")
    assert_nothing_left(rig)
    assert rig.storage.calls[-1].startswith("delete")


def test_identity_mismatch_is_refused_and_undone(rig: Rig) -> None:
    rig.storage.infos["vol-1"] = iscsi_info(wwn="6001405000000000000000000000beef")
    rig.runner.on(r"iscsi-inq -e 1 -c 128", Reply(stdout="Unit Serial Number:[  OTHER]\n"))
    with pytest.raises(IdentityMismatch, match="OTHER"):
        rig.agent.attach("vm1", volume_id="vol-1")
    assert_nothing_left(rig)


def test_serial_identifies_when_the_naa_designator_is_unreadable(rig: Rig) -> None:
    rig.storage.infos["vol-1"] = iscsi_info(wwn="6000000000000b000f3c2a9e5d7b4c61")
    rig.runner.on(r"iscsi-inq -e 1 -c 128", Reply(stdout="Unit Serial Number:[             SERIAL1]\n"))
    assert rig.agent.attach("vm1", volume_id="vol-1").state is AttachmentState.ATTACHED


def test_hotplug_failure_undoes_export_and_secret(rig: Rig) -> None:
    rig.hv.fail_attach = PermissionDenied("Authentication failure(513)")
    events = rig.agent.events.subscribe()
    with pytest.raises(PermissionDenied):
        rig.agent.attach("vm1", volume_id="vol-1")
    assert_nothing_left(rig)
    seen = []
    while (e := events.get(0)) is not None:
        seen.append(e.type)
    assert seen[0] is EventType.ATTACH_STARTED
    assert seen[-1] is EventType.ATTACH_FAILED


def test_complete_failure_unplugs_again(rig: Rig) -> None:
    rig.storage.fail_complete = Unavailable("storage went away")
    with pytest.raises(Unavailable):
        rig.agent.attach("vm1", volume_id="vol-1")
    assert_nothing_left(rig)


def test_failed_undo_keeps_an_error_record_that_detach_finishes(rig: Rig) -> None:
    rig.storage.fail_complete = Unavailable("storage went away")
    rig.hv.fail_detach = Unavailable("libvirtd went away")
    with pytest.raises(Unavailable):
        rig.agent.attach("vm1", volume_id="vol-1")
    (record,) = rig.journal.of_volume("vol-1")
    assert record.state is AttachmentState.ERROR
    assert "hot-plug" in record.error_message
    rig.hv.fail_detach = None
    assert rig.agent.detach("vm1", "vol-1") is True
    assert_nothing_left(rig)


def test_local_attach_waits_for_udev(rig: Rig) -> None:
    info = ConnectionInfo(transport=LocalConnection("/dev/loop9"), volume_id="loc-1")
    rig.udev.add(UdevDevice("loop9", device_node="/dev/loop9", size_bytes=1 << 20))
    a = rig.agent.attach("vm1", connection_info=info, disk=DiskOptions(bus=Bus.SCSI))
    (spec,) = rig.hv.disks_by_domain["vm1"]
    assert spec.source == BlockSource("/dev/loop9")
    assert a.host_device == "/dev/loop9"
    assert not a.owns_export
    assert rig.storage.calls == []
    assert rig.agent.detach("vm1", "loc-1")
    assert_nothing_left(rig, "loc-1")


def test_the_record_keeps_the_wwn_connect_found_when_the_info_had_none(rig: Rig) -> None:
    # Connectors remove only devices whose WWN they can match: detach needs the identity connect saw.
    info = ConnectionInfo(transport=LocalConnection("/dev/sdq"), volume_id="loc-1")
    props = MappingProxyType({"ID_WWN_WITH_EXTENSION": "0x6001405abcdef0123456789abcdef012"})
    rig.udev.add(UdevDevice("sdq", device_node="/dev/sdq", size_bytes=1 << 20, properties=props))
    a = rig.agent.attach("vm1", connection_info=info, disk=DiskOptions(bus=Bus.SCSI))
    assert a.connection_info.wwn == "0x6001405abcdef0123456789abcdef012"
    (record,) = rig.journal.of_volume("loc-1")
    assert record.connection_info.wwn == a.connection_info.wwn
    assert rig.agent.detach("vm1", "loc-1")


def test_local_device_that_never_comes_times_out_and_leaves_nothing(rig: Rig) -> None:
    info = ConnectionInfo(transport=LocalConnection("/dev/loop9"), volume_id="loc-1")
    rig.udev.add(UdevDevice("loop9", device_node="/dev/loop9", size_bytes=0))  # no media yet
    with pytest.raises(Exception, match="did not appear within 5s"):
        rig.agent.attach("vm1", connection_info=info)
    assert_nothing_left(rig, "loc-1")


def test_concurrent_call_on_same_volume_is_aborted(rig: Rig) -> None:
    with rig.agent._locks.hold_or_abort("vol-1", "volume vol-1"):
        result: list[BaseException] = []

        def other() -> None:
            try:
                rig.agent.attach("vm1", volume_id="vol-1")
            except Aborted as exc:
                result.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
    assert len(result) == 1


def test_journal_is_private_and_holds_the_secret_for_recovery(rig: Rig) -> None:
    a = rig.agent.attach("vm1", volume_id="vol-1")
    d = rig.state / "attachments"
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    (f,) = list(d.glob("*.json"))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert rig.journal.get("vol-1", "vm1") == a


def test_reconcile_finishes_and_rolls_back(rig: Rig) -> None:
    done = rig.agent.attach("vm1", volume_id="vol-1")
    # crash after hot-plug, before complete: record still ATTACHING, disk present
    rig.journal.put(replace(done, state=AttachmentState.ATTACHING))
    # crash after the export, before connect: no disk
    rig.storage.infos["vol-2"] = iscsi_info("vol-2")
    sa = rig.storage.create_attachment("vol-2", rig.agent.connector, done.access_mode, "vm2")
    rig.journal.put(
        replace(
            done,
            volume_id="vol-2",
            domain="vm2",
            attachment_id="",
            connection_info=sa.connection_info,
            connector_kind=None,
            serial="vol-2",
            target_dev="",
        )
    )
    actions = {a.volume_id: a.action for a in rig.agent.reconcile()}
    assert actions == {"vol-1": "finished", "vol-2": "rolled back"}
    assert rig.journal.get("vol-1", "vm1") is not None
    assert rig.journal.get("vol-1", "vm1").state is AttachmentState.ATTACHED  # type: ignore[union-attr]
    assert rig.journal.of_volume("vol-2") == []
    assert list(rig.storage.exports.values()) == ["vol-1"]


def test_reconcile_rolls_back_attached_record_whose_disk_vanished(rig: Rig) -> None:
    rig.agent.attach("vm1", volume_id="vol-1")
    rig.hv.disks_by_domain["vm1"].clear()  # someone detached it behind our back
    (action,) = rig.agent.reconcile()
    assert action.action == "rolled back"
    assert_nothing_left(rig)


def test_extend_resizes_the_domain_disk(rig: Rig) -> None:
    rig.agent.attach("vm1", volume_id="vol-1")
    rig.runner.on(r"iscsi-readcapacity16", Reply(stdout="Total size:33554432\n"))
    assert rig.agent.extend("vol-1", 32 << 20) == 32 << 20
    assert rig.hv.resized == [("vm1", "sda", 32 << 20)]
    with pytest.raises(FailedPrecondition, match="still sees"):
        rig.agent.extend("vol-1", 64 << 20)
    with pytest.raises(NotFound):
        rig.agent.extend("vol-9")


def test_get_and_list(rig: Rig) -> None:
    a = rig.agent.attach("vm1", volume_id="vol-1")
    assert rig.agent.get("vol-1") == a
    assert rig.agent.get("vol-1", "vm1") == a
    assert rig.agent.list_attachments("vm1") == [a]
    assert rig.agent.list_attachments("vm2") == []
    with pytest.raises(NotFound):
        rig.agent.get("vol-1", "vm2")


def test_combine_iotune_takes_the_stricter_limit() -> None:
    a = IoTune(total_iops_sec=1000, read_bytes_sec=5, group_name="g")
    b = IoTune(total_iops_sec=500, write_bytes_sec=7)
    assert combine_iotune(a, b) == IoTune(
        total_iops_sec=500, read_bytes_sec=5, write_bytes_sec=7, group_name="g"
    )


def test_default_tgt_identity_falls_back_to_the_serial(rig: Rig) -> None:
    from tests.unit.hostagent.conftest import sample  # noqa: PLC0415

    rig.runner.on(r"iscsi-inq -e 1 -c 131", Reply(stdout=sample("iscsi_inq_vpd83_tgt.txt")))
    assert rig.agent.attach("vm1", volume_id="vol-1").state is AttachmentState.ATTACHED
    assert rig.runner.ran(r"-c 128")
