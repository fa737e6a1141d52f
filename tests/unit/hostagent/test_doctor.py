"""The host audit on an agent wired to fakes: what is listed, what --fix removes, what it never touches."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockwire.model import ConnectionInfo, IscsiConnection, IscsiPath
from blockwire.secret import Secret
from hostagent.api import HostAgent
from hostagent.doctor import StorageRow
from hostagent.model import AttachmentState, JournalRecord
from hostagent.virt.diskxml import Auth, DiskSpec, NetHost, NetworkSource
from tests.fakes.agent import fake_agent
from tests.fakes.hypervisor import FakeHypervisor

TARGET = "iqn.2026-01.io.blockwire:vol-1"


@pytest.fixture
def agent(tmp_path: Path) -> HostAgent:
    return fake_agent(tmp_path)


def hv(agent: HostAgent) -> FakeHypervisor:
    assert isinstance(agent.hypervisor, FakeHypervisor)
    return agent.hypervisor


def info(volume: str, attachment: str = "") -> ConnectionInfo:
    return ConnectionInfo(
        transport=IscsiConnection(paths=(IscsiPath("127.0.0.1:3260", TARGET, 1),)),
        volume_id=volume,
        attachment_id=attachment,
    )


def test_a_clean_host_has_nothing_to_report(agent: HostAgent) -> None:
    assert agent.audit() == []
    assert agent.audit(fix=True) == []


def test_an_unused_blockwire_secret_is_listed_and_fix_removes_it_but_not_a_used_one(agent: HostAgent) -> None:
    h = hv(agent)
    h.define_secret("blockwire/vol-9/att-9", "iscsi", Secret("orphanpass12"))
    h.define_secret("blockwire/vol-1/att-1", "iscsi", Secret("keptpass1234"))
    h.define_secret("other/app", "iscsi", Secret("notourspass1"))
    agent.journal.put(
        JournalRecord("vol-1", "vm1", AttachmentState.ATTACHED, info("vol-1", "att-1"), attachment_id="att-1")
    )
    (finding,) = agent.audit()
    assert (finding.kind, finding.name, finding.fixable, finding.fixed) == (
        "libvirt_secret",
        "blockwire/vol-9/att-9",
        True,
        False,
    )
    assert finding.volume_id == "vol-9"
    assert ("blockwire/vol-9/att-9", "iscsi") in h.secrets  # read-only without fix
    (fixed,) = agent.audit(fix=True)
    assert fixed.fixed
    assert ("blockwire/vol-9/att-9", "iscsi") not in h.secrets
    assert ("blockwire/vol-1/att-1", "iscsi") in h.secrets
    assert ("other/app", "iscsi") in h.secrets
    assert [f.kind for f in agent.audit()] == []


def test_a_fix_keeps_the_secret_of_a_volume_whose_attach_began_meanwhile(agent: HostAgent) -> None:
    """An attach records first, then defines its secret: a secret the audit saw orphaned whose volume has a
    record by the time of the fix belongs to that attach."""
    h = hv(agent)
    h.define_secret("blockwire/vol-2/att-2", "iscsi", Secret("inflightpass"))
    (finding,) = agent.audit()
    agent.journal.put(JournalRecord("vol-2", "vm1", AttachmentState.ATTACHING, info("vol-2")))
    from hostagent import doctor  # noqa: PLC0415

    kept = doctor._fix(agent, finding, [c for c in agent.all_connectors() if isinstance(c, doctor.Auditor)])
    assert not kept.fixed
    assert "appeared meanwhile" in kept.detail
    assert ("blockwire/vol-2/att-2", "iscsi") in h.secrets


def test_journal_errors_and_unrecorded_blockwire_disks_are_listed_never_fixed(agent: HostAgent) -> None:
    agent.journal.put(
        JournalRecord("vol-3", "vm1", AttachmentState.ERROR, info("vol-3"), error_message="unplug refused")
    )
    disk = DiskSpec(
        source=NetworkSource(
            "iscsi",
            f"{TARGET}/1",
            (NetHost("127.0.0.1", 3260),),
            auth=Auth("u", "iscsi", usage="blockwire/x/y"),
        ),
        target_dev="sdz",
        serial="nobodys",
    )
    hv(agent).disks_by_domain["vm1"].append(disk)
    found = {(f.kind, f.name): f for f in agent.audit(fix=True)}
    assert found[("journal_error", "vol-3@vm1")].detail == "unplug refused"
    assert not found[("domain_disk", "vm1:sdz")].fixable
    assert not any(f.fixed for f in found.values())
    assert hv(agent).disks_by_domain["vm1"] == [disk]


class ListingStorage:
    """Storage with one host's attachments listed (the doctor's optional storage seam)."""

    def __init__(self, rows: list[StorageRow]) -> None:
        self.rows = rows
        self.deleted: list[str] = []

    def host_attachments(self, host: str) -> list[StorageRow]:
        return list(self.rows)

    def delete_attachment(self, attachment_id: str) -> None:
        self.deleted.append(attachment_id)


def test_storage_only_and_host_only_attachments(agent: HostAgent) -> None:
    storage = ListingStorage(
        [
            StorageRow("att-gone", "vol-5", "vm-gone", "attached"),
            StorageRow("att-running", "vol-6", "vm1", "attached"),
            StorageRow("att-7", "vol-7", "vm1", "attached"),
        ]
    )
    agent.storage = storage  # type: ignore[assignment]
    agent.journal.put(
        JournalRecord(
            "vol-7",
            "vm1",
            AttachmentState.ATTACHED,
            info("vol-7", "att-7"),
            attachment_id="att-7",
            owns_export=True,
        )
    )
    agent.journal.put(
        JournalRecord(
            "vol-8",
            "vm1",
            AttachmentState.ATTACHED,
            info("vol-8", "att-8"),
            attachment_id="att-8",
            owns_export=True,
        )
    )
    found = {(f.kind, f.name): f for f in agent.audit()}
    assert set(found) == {
        ("storage_only", "att-gone"),
        ("storage_only", "att-running"),
        ("host_only", "vol-8@vm1"),
    }
    assert found[("storage_only", "att-gone")].fixable
    assert not found[("storage_only", "att-running")].fixable  # its domain runs here
    assert storage.deleted == []
    agent.audit(fix=True)
    assert storage.deleted == ["att-gone"]
