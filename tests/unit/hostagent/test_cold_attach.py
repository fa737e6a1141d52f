"""Cold attach on fakes: a shut-off domain gets the disk in its definition, with a boot order when asked;
the host side stays connected while the definition has the disk; reconcile keeps, finishes or rolls back
by what the definition holds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from blockwire.errors import FailedPrecondition, InvalidArgument
from blockwire.runtime.failpoints import FailpointHit
from hostagent.api import FP_ATTACH_AFTER_HOTPLUG
from hostagent.model import AttachmentState, DiskOptions
from hostagent.virt.diskxml import disk_xml, parse_disk
from tests.unit.hostagent.conftest import Rig
from tests.unit.hostagent.test_api import assert_nothing_left


def test_cold_attach_writes_the_definition_and_keeps_the_host_side(rig: Rig) -> None:
    a = rig.agent.attach("stopped", volume_id="vol-1", disk=DiskOptions(boot_order=1))
    assert a.state is AttachmentState.ATTACHED
    assert a.persistent is True  # implied: the definition is where the disk goes
    (spec,) = rig.hv.disks_by_domain["stopped"]
    assert spec.boot_order == 1
    assert '<boot order="1"/>' in disk_xml(spec)
    assert len(rig.hv.secrets) == 1  # QEMU will log in at start with it
    assert rig.storage.completed == [(a.attachment_id, "sda", "")]
    # a repeat returns the attachment; another boot order is a difference
    assert rig.agent.attach("stopped", volume_id="vol-1", disk=DiskOptions(boot_order=1)) == a
    with pytest.raises(FailedPrecondition, match="boot_order is 1, asked 2"):
        rig.agent.attach("stopped", volume_id="vol-1", disk=DiskOptions(boot_order=2))
    # reconcile knows a defined-but-stopped attachment
    (action,) = rig.agent.reconcile()
    assert action.action == "kept"
    assert rig.agent.detach("stopped", "vol-1") is True
    assert_nothing_left(rig)


def test_boot_order_round_trips_through_the_disk_xml(rig: Rig) -> None:
    rig.agent.attach("stopped", volume_id="vol-1", disk=DiskOptions(boot_order=3))
    (spec,) = rig.hv.disks_by_domain["stopped"]
    assert parse_disk(disk_xml(spec)) == spec


def test_boot_order_on_a_running_domain_is_refused(rig: Rig) -> None:
    with pytest.raises(FailedPrecondition, match="shut-off domain"):
        rig.agent.attach("vm1", volume_id="vol-1", disk=DiskOptions(boot_order=1))
    assert rig.storage.calls == []


@pytest.mark.parametrize("order", [-1, 1000])
def test_boot_order_out_of_range_is_invalid(rig: Rig, order: int) -> None:
    with pytest.raises(InvalidArgument) as err:
        rig.agent.attach("stopped", volume_id="vol-1", disk=DiskOptions(boot_order=order))
    assert err.value.field == "disk.boot_order"
    assert_nothing_left(rig)


def test_crash_after_writing_the_definition_is_rolled_forward(rig: Rig) -> None:
    with rig.agent.failpoints.armed(f"{FP_ATTACH_AFTER_HOTPLUG}=raise"), pytest.raises(FailpointHit):
        rig.agent.attach("stopped", volume_id="vol-1")
    # the raise unwound it (an in-process failure is undone, not a crash) ...
    assert_nothing_left(rig)
    # ... a kill at that point leaves the record ATTACHING and the disk in the definition
    done = rig.agent.attach("stopped", volume_id="vol-1")
    rig.journal.put(replace(done, state=AttachmentState.ATTACHING, target_dev=""))
    (action,) = rig.agent.reconcile()
    assert (action.action, action.detail) == ("finished", "sda")
    assert rig.journal.get("vol-1", "stopped").state is AttachmentState.ATTACHED  # type: ignore[union-attr]


def test_disk_removed_from_a_shut_off_definition_is_rolled_back(rig: Rig) -> None:
    rig.agent.attach("stopped", volume_id="vol-1")
    rig.hv.disks_by_domain["stopped"].clear()  # virsh detach-disk --config behind our back
    (action,) = rig.agent.reconcile()
    assert action.action == "rolled back"
    assert_nothing_left(rig)


def test_undefined_domain_is_cleaned_only_when_no_domain_has_the_disk(rig: Rig) -> None:
    a = rig.agent.attach("stopped", volume_id="vol-1")
    (spec,) = rig.hv.disks_by_domain["stopped"]
    # undefined, and defined again under the same name (another UUID) with the disk in it
    old = rig.hv.domains["stopped"]
    rig.hv.domains["stopped"] = replace(old, uuid=old.uuid.replace("0000-0000-0000", "0000-0000-0001"))
    rig.hv.disks_by_domain["stopped"] = [spec]
    (action,) = rig.agent.reconcile()
    assert action.action == "kept"
    assert "has the disk" in action.detail
    assert rig.journal.get("vol-1", "stopped") == a
    assert len(rig.hv.secrets) == 1
    # now undefined for good: nothing is left
    del rig.hv.domains["stopped"]
    del rig.hv.disks_by_domain["stopped"]
    (action,) = rig.agent.reconcile()
    assert action.action == "rolled back"
    assert_nothing_left(rig)
