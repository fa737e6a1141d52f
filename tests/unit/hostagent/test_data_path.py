"""The data-path guarantees on fakes: a volume reaches one domain unless storage says multiattach;
journal names cannot collide; nothing under a disk a domain holds is undone; a shut-off domain's
definition loses the disk on detach; a repeat with other options is refused; connection info without
an identity is refused unless the caller opts out. The host tier proves the same on the real stack
(tests/host/test_data_path.py)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from blockwire.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from blockwire.model import AccessMode, ConnectionInfo, LocalConnection
from hostagent.host.udev import UdevDevice
from hostagent.journal import Journal
from hostagent.model import AttachmentState, Bus, Cache, DiskOptions
from hostagent.virt.diskxml import BlockSource
from tests.unit.hostagent.conftest import Rig, iscsi_info


def shared_volume(rig: Rig) -> None:
    rig.storage.infos["vol-1"] = replace(iscsi_info(), multiattach=True)


# -- one domain unless multiattach -------------------------------------------------------------------


def test_shareable_flag_does_not_make_a_volume_multiattach(rig: Rig) -> None:
    rig.agent.attach("vm1", volume_id="vol-1")
    with pytest.raises(FailedPrecondition, match="not created multiattach"):
        rig.agent.attach("vm2", volume_id="vol-1", disk=DiskOptions(shareable=True))
    assert rig.hv.disks_by_domain["vm2"] == []
    assert len(rig.hv.disks_by_domain["vm1"]) == 1
    assert len(rig.storage.exports) == 1


def test_shareable_on_a_volume_that_is_not_multiattach_is_refused_and_leaves_nothing(rig: Rig) -> None:
    with pytest.raises(FailedPrecondition, match="cannot be shareable"):
        rig.agent.attach("vm1", volume_id="vol-1", disk=DiskOptions(shareable=True))
    assert rig.storage.exports == {}
    assert rig.journal.all() == []
    assert rig.hv.secrets == {}


def test_multiattach_volume_on_two_domains_shares_and_detach_keeps_the_other(rig: Rig) -> None:
    shared_volume(rig)
    a = rig.agent.attach("vm1", volume_id="vol-1")
    b = rig.agent.attach("vm2", volume_id="vol-1")
    assert a.attachment_id != b.attachment_id
    assert [s.shareable for s in rig.hv.disks_by_domain["vm1"] + rig.hv.disks_by_domain["vm2"]] == [
        True,
        True,
    ]
    rig.agent.detach("vm1", "vol-1")
    assert list(rig.storage.exports) == [b.attachment_id]
    assert len(rig.hv.disks_by_domain["vm2"]) == 1
    # vm2's QEMU logs in with its own secret: vm1's detach did not take it
    (usage,) = {u for u, _ in rig.hv.secrets}
    assert b.attachment_id in usage


def test_connection_info_attach_to_a_second_domain_needs_multiattach(rig: Rig) -> None:
    rig.udev.add(UdevDevice("loop9", device_node="/dev/loop9", size_bytes=1 << 20))
    info = ConnectionInfo(transport=LocalConnection("/dev/loop9"), volume_id="loc-1")
    rig.agent.attach("vm1", connection_info=info)
    with pytest.raises(FailedPrecondition, match="not multiattach"):
        rig.agent.attach("vm2", connection_info=info, disk=DiskOptions(shareable=True))
    rig.agent.attach("vm2", connection_info=replace(info, multiattach=True))
    assert rig.hv.disks_by_domain["vm2"][0].shareable


def test_a_shared_host_device_stays_until_its_last_domain_detaches(rig: Rig) -> None:
    rig.udev.add(UdevDevice("loop9", device_node="/dev/loop9", size_bytes=1 << 20))
    info = ConnectionInfo(transport=LocalConnection("/dev/loop9"), volume_id="loc-1", multiattach=True)
    rig.agent.attach("vm1", connection_info=info)
    rig.agent.attach("vm2", connection_info=info)
    disconnected: list[str] = []
    local = rig.agent.connectors[info.kind]
    real = local.disconnect
    local.disconnect = lambda i, force=False: (disconnected.append(i.volume_id), real(i, force))  # type: ignore[method-assign]
    rig.agent.detach("vm1", "loc-1")
    assert disconnected == []  # vm2 still has /dev/loop9
    rig.agent.detach("vm2", "loc-1")
    assert disconnected == ["loc-1"]


# -- names cannot collide ---------------------------------------------------------------------------


def test_domain_names_differing_in_unsafe_characters_are_two_records(rig: Rig) -> None:
    rig.hv.add_domain("hv 1")
    rig.hv.add_domain("hv_1")
    rig.agent.attach("hv 1", volume_id="vol-1")
    with pytest.raises(FailedPrecondition, match="hv 1"):
        rig.agent.attach("hv_1", volume_id="vol-1")
    (record,) = rig.journal.all()
    assert record.domain == "hv 1"
    assert record.state is AttachmentState.ATTACHED
    assert len(rig.hv.disks_by_domain["hv 1"]) == 1
    assert rig.agent.detach("hv_1", "vol-1") is False  # not attached there: hv 1 keeps its disk
    assert len(rig.hv.disks_by_domain["hv 1"]) == 1


def test_journal_keys_are_collision_free_and_checked(tmp_path: os.PathLike[str]) -> None:
    j = Journal(tmp_path)
    info = iscsi_info()
    pairs = [("v", "hv 1"), ("v", "hv_1"), ("v", "hv%201"), ("v@x", "y"), ("v", "x@y"), ("v", "é/..")]
    for vol, dom in pairs:
        j.put(_record(vol, dom, info))
    assert sorted((a.volume_id, a.domain) for a in j.all()) == sorted(pairs)
    for vol, dom in pairs:
        got = j.get(vol, dom)
        assert got is not None
        assert (got.volume_id, got.domain) == (vol, dom)
    long = "d" * 300
    j.put(_record("v", long, info))
    got = j.get("v", long)
    assert got is not None
    assert got.domain == long


def test_journal_refuses_a_record_of_another_pair(tmp_path: os.PathLike[str]) -> None:
    j = Journal(tmp_path)
    j.put(_record("v", "a", iscsi_info()))
    path = j._path("v", "a")
    data = json.loads(path.read_text())
    data["domain"] = "b"
    path.write_text(json.dumps(data))
    with pytest.raises(FailedPrecondition, match="not 'v' on 'a'"):
        j.get("v", "a")


def test_journal_renames_records_of_the_old_lossy_naming(tmp_path: os.PathLike[str]) -> None:
    j = Journal(tmp_path)
    j.put(_record("v", "hv 1", iscsi_info()))
    new = j._path("v", "hv 1")
    old = new.with_name("v@hv_1.json")
    new.rename(old)
    j2 = Journal(tmp_path)
    assert not old.exists()
    got = j2.get("v", "hv 1")
    assert got is not None
    assert got.domain == "hv 1"


def test_journal_completes_short_writes(tmp_path: os.PathLike[str]) -> None:
    def short(fd: int, data: memoryview) -> int:
        return os.write(fd, data[:7])

    j = Journal(tmp_path, write=short)
    j.put(_record("v", "a", iscsi_info()))
    assert Journal(tmp_path).get("v", "a") == _record("v", "a", iscsi_info())


def _record(volume: str, domain: str, info: ConnectionInfo):  # type: ignore[no-untyped-def]
    from hostagent.model import JournalRecord  # noqa: PLC0415

    return JournalRecord(
        volume_id=volume, domain=domain, state=AttachmentState.ATTACHED, connection_info=info
    )


def test_a_record_of_a_domain_since_redefined_never_touches_the_new_one(rig: Rig) -> None:
    rig.agent.attach("vm1", volume_id="vol-1")
    old = rig.hv.domains["vm1"]
    # vm1 undefined and defined again: same name, another UUID, a disk with the same serial
    rig.hv.domains["vm1"] = replace(old, uuid="99999999-0000-0000-0000-000000000000")
    # the record's domain is gone; the new one is not unplugged, and since it holds the volume's disk
    # (its definition came with it), nothing under that disk is disconnected or unexported either
    with pytest.raises(FailedPrecondition, match=r"'vm1' .sda. still holds volume vol-1"):
        rig.agent.detach("vm1", "vol-1")
    assert len(rig.hv.disks_by_domain["vm1"]) == 1
    assert len(rig.storage.exports) == 1
    # once it lets go, the detach finishes
    rig.hv.disks_by_domain["vm1"] = []
    assert rig.agent.detach("vm1", "vol-1") is True
    assert rig.storage.exports == {}


# -- never undo under a disk a domain holds ---------------------------------------------------------


def test_failed_attach_whose_unplug_times_out_keeps_connection_and_export(rig: Rig) -> None:
    rig.storage.fail_complete = Unavailable("storage went away")
    rig.hv.fail_detach = DeadlineExceeded("domain 'vm1' did not release sda within 30s")
    with pytest.raises(Unavailable):
        rig.agent.attach("vm1", volume_id="vol-1")
    (record,) = rig.journal.of_volume("vol-1")
    assert record.state is AttachmentState.ERROR
    assert "still holds the disk" in record.error_message
    assert len(rig.hv.disks_by_domain["vm1"]) == 1  # the guest still has it ...
    assert record.attachment_id in rig.storage.exports  # ... its export ...
    assert rig.hv.secrets  # ... and QEMU's credentials to reach it
    assert not any(c.startswith("delete") for c in rig.storage.calls)
    rig.hv.fail_detach = None
    rig.storage.fail_complete = None
    assert rig.agent.detach("vm1", "vol-1") is True
    assert rig.storage.exports == {}
    assert rig.hv.secrets == {}
    assert rig.journal.all() == []


def test_a_failing_hotplug_that_left_the_device_is_unplugged(rig: Rig) -> None:
    """libvirt can fail after QEMU added the device: the undo finds it by its serial."""
    real = rig.hv.attach_disk

    def attach_then_fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        real(*args, **kwargs)
        raise Unavailable("libvirtd connection lost after the hot-plug")

    rig.hv.attach_disk = attach_then_fail  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        rig.agent.attach("vm1", volume_id="vol-1")
    assert rig.hv.disks_by_domain["vm1"] == []
    assert rig.storage.exports == {}
    assert rig.journal.all() == []


def test_detach_never_disconnects_what_another_domain_holds(rig: Rig) -> None:
    rig.udev.add(UdevDevice("loop9", device_node="/dev/loop9", size_bytes=1 << 20))
    info = ConnectionInfo(transport=LocalConnection("/dev/loop9"), volume_id="loc-1")
    rig.agent.attach("vm1", connection_info=info)
    # someone attached the same device to vm2 behind the agent's back
    rig.hv.disks_by_domain["vm2"].append(replace(rig.hv.disks_by_domain["vm1"][0], serial="other"))
    with pytest.raises(FailedPrecondition, match="'vm2'"):
        rig.agent.detach("vm1", "loc-1", force=True)
    assert rig.hv.disks_by_domain["vm2"][0].source == BlockSource("/dev/loop9")
    (record,) = rig.journal.all()
    assert record.state is AttachmentState.DETACHING


# -- shut-off persistent domain ---------------------------------------------------------------------


def test_detach_from_a_shut_off_domain_removes_the_disk_from_its_definition(rig: Rig) -> None:
    rig.agent.attach("vm1", volume_id="vol-1", persistent=True)
    rig.hv.domains["vm1"] = replace(rig.hv.domains["vm1"], running=False)  # virsh destroy
    assert rig.agent.detach("vm1", "vol-1") is True
    assert rig.hv.disks_by_domain["vm1"] == []
    assert rig.storage.exports == {}


# -- repeats with other options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"access_mode": AccessMode.READ_ONLY}, "access_mode is rw, asked ro"),
        ({"disk": DiskOptions(bus=Bus.VIRTIO)}, "bus is scsi, asked virtio"),
        ({"disk": DiskOptions(cache=Cache.WRITEBACK)}, "cache is none, asked writeback"),
        ({"disk": DiskOptions(read_only=True)}, "read_only is False, asked True"),
        ({"persistent": True}, "persistent is False, asked True"),
        ({"disk": DiskOptions(serial="other")}, "serial"),
    ],
)
def test_repeat_with_other_options_names_the_difference(
    rig: Rig, kwargs: dict[str, object], named: str
) -> None:
    first = rig.agent.attach("vm1", volume_id="vol-1")
    with pytest.raises(FailedPrecondition, match=named):
        rig.agent.attach("vm1", volume_id="vol-1", **kwargs)  # type: ignore[arg-type]
    assert rig.agent.attach("vm1", volume_id="vol-1") == first
    assert len(rig.hv.disks_by_domain["vm1"]) == 1


# -- identity must be announced ---------------------------------------------------------------------


def test_connection_info_without_identity_is_refused_unless_opted_out(rig: Rig) -> None:
    info = replace(iscsi_info(), wwn="", serial="")
    with pytest.raises(FailedPrecondition, match="announces no identity"):
        rig.agent.attach("vm1", connection_info=info)
    with pytest.raises(FailedPrecondition, match="announces no identity"):
        rig.agent.connect_volume(info)
    assert rig.journal.all() == []
    assert rig.hv.secrets == {}
    a = rig.agent.attach("vm1", connection_info=info, allow_unverified_identity=True)
    assert a.state is AttachmentState.ATTACHED


def test_storage_announcing_no_identity_is_refused_and_undone(rig: Rig) -> None:
    rig.storage.infos["vol-1"] = replace(iscsi_info(), wwn="", serial="")
    with pytest.raises(FailedPrecondition, match="announces no identity"):
        rig.agent.attach("vm1", volume_id="vol-1")
    assert rig.storage.exports == {}
    assert rig.journal.all() == []
