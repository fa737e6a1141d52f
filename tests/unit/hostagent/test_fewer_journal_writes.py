"""The attach and detach paths write the journal only where a record changes what a restart would do.

A QEMU-native iSCSI attach writes three records (ATTACHING; storage's export id with the connector that
connects; ATTACHED with the target name), a detach one before deleting it; a crash between any two steps
still finds what it needs (the export id before connect, the disk by its serial after the hot-plug).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from blockwire.runtime import failpoints
from hostagent.api import (
    FP_ATTACH_AFTER_CONNECT,
    HostAgent,
)
from hostagent.journal import Journal
from hostagent.model import AttachmentState, ConnectorKind, JournalRecord
from tests.fakes.executor import Reply

from .conftest import Rig, sample


class CountingWrites:
    """The journal's injected writer (os.write), counting the records written (one per put)."""

    def __init__(self) -> None:
        self.records = 0

    def __call__(self, fd: int, data: memoryview) -> int:
        if data[:1] == b"{":  # the first chunk of a record
            self.records += 1
        return os.write(fd, data)


@pytest.fixture
def counted(rig: Rig, tmp_path: Path) -> tuple[Rig, CountingWrites]:
    writes = CountingWrites()
    a = rig.agent
    rig.journal = Journal(tmp_path / "counted", write=writes)
    rig.agent = HostAgent(
        hypervisor=a.hypervisor,
        connectors=a.connectors,
        journal=rig.journal,
        connector=a.connector,
        clock=a.clock,
        storage=a.storage,
        events=a.events,
        failpoints=failpoints.Failpoints(),
        volume_keys=a.volume_keys,
    )
    return rig, writes


def test_an_attach_writes_three_records_and_a_detach_one(counted: tuple[Rig, CountingWrites]) -> None:
    rig, writes = counted
    a = rig.agent.attach("vm1", volume_id="vol-1")
    assert a.state is AttachmentState.ATTACHED
    assert writes.records == 3
    got = rig.journal.get("vol-1", "vm1")
    assert got is not None
    assert got.target_dev == a.target_dev != ""
    assert got.connector_kind is ConnectorKind.ISCSI_QEMU
    assert got.attachment_id
    writes.records = 0
    assert rig.agent.detach("vm1", "vol-1")
    assert writes.records == 1  # DETACHING, then the record goes
    assert rig.journal.get("vol-1", "vm1") is None


def test_the_export_id_and_the_connector_are_recorded_before_connect(
    counted: tuple[Rig, CountingWrites],
) -> None:
    rig, _ = counted
    seen: list[JournalRecord | None] = []

    def identity_read(argv: tuple[str, ...]) -> Reply:  # connect's first command: what a crash here finds
        seen.append(rig.journal.get("vol-1", "vm1"))
        return Reply(stdout=sample("iscsi_inq_vpd83_tgt_scsi_id.txt"))

    rig.runner.on(r"iscsi-inq -e 1 -c 131", identity_read)
    rig.agent.attach("vm1", volume_id="vol-1")
    (before,) = seen
    assert before is not None
    assert before.state is AttachmentState.ATTACHING
    assert before.attachment_id == rig.journal.get("vol-1", "vm1").attachment_id  # type: ignore[union-attr]
    assert before.connector_kind is ConnectorKind.ISCSI_QEMU  # reconcile disconnects what connect began


def test_a_crash_after_connect_is_rolled_back_with_the_secret_and_the_export(
    counted: tuple[Rig, CountingWrites],
) -> None:
    rig, _ = counted
    with (
        rig.agent.failpoints.armed({FP_ATTACH_AFTER_CONNECT: "raise"}),
        pytest.raises(failpoints.FailpointHit),
    ):
        rig.agent.attach("vm1", volume_id="vol-1")
    assert rig.journal.get("vol-1", "vm1") is None
    assert not [u for u, _ in rig.hv.secrets if "vol-1" in u]
    assert rig.storage.calls[-1].startswith("delete")


def test_a_crash_before_complete_finds_the_disk_by_its_serial(counted: tuple[Rig, CountingWrites]) -> None:
    """The target name is written with ATTACHED only: a record from before it is finished by reconcile
    with the live target name."""
    rig, _ = counted
    agent = rig.agent
    a = agent.attach("vm1", volume_id="vol-1")
    # what the journal holds after the hot-plug, before CompleteAttachment [before_complete]
    rig.journal.put(replace(a, state=AttachmentState.ATTACHING, target_dev=""))
    actions = agent.reconcile()
    assert [(x.volume_id, x.action, x.detail) for x in actions if x.volume_id] == [
        ("vol-1", "finished", a.target_dev)
    ]
    got = rig.journal.get("vol-1", "vm1")
    assert got is not None
    assert got.state is AttachmentState.ATTACHED
    assert got.target_dev == a.target_dev
