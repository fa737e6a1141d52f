"""The host audit behind `blockwire doctor`: what is on this host, or in storage for it, that no attachment
accounts for; with `fix`, the removal of what is provably orphaned.

Read-only unless asked to fix. What it compares:

==================  ===================================================================  ==================
kind                found when                                                           --fix
==================  ===================================================================  ==================
journal_error       a journal record in ERROR (an attach or detach the agent could not   no: DetachVolume
                    finish; its message says why)                                        (force) decides
domain_disk         a running domain's disk whose libvirt secret is one of blockwire's   no: a domain
                    ("blockwire/...") but whose serial no record has                     holds it
libvirt_secret      a private secret under "blockwire/" (CHAP, cephx) or "blockwire-luks/"  yes: undefined
                    (an encrypted volume's key) that no record and no domain's XML       (nothing uses it)
                    (live or persistent) refers to
iscsi_session       a kernel iSCSI session to a (portal, target) no record uses          no: report only
iscsi_node          a node record of a (portal, target) no record uses                   no: report only
scsi_disk           a disk on such a session                                             no: report only
multipath_map       a map whose WWID is no record's                                      no: report only
rbd_mapping         a kernel rbd mapping of an image id no record announces              no: report only
nvme_controller     an NVMe-oF controller to a subsystem no record announces             no: report only
storage_only        an attachment storage keeps for this host that no record explains,   yes, when its
                    (volume, domain) nor id                                              domain is not
                                                                                         running: deleted
host_only           an ATTACHED record whose storage attachment storage no longer has    no: report only
==================  ===================================================================  ==================

Kernel state (sessions, node records, disks, maps) is never removed here: nothing on the host proves a
session or map is blockwire's rather than another program's (a boot LUN, a manually logged-in target),
and a device removed by mistake cannot be brought back; each finding says how to remove it by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from blockwire.errors import BlockwireError
from blockwire.model import ConnectionInfo
from hostagent.model import AttachmentState, Finding, JournalRecord
from hostagent.virt.diskxml import LiveDisk, NetworkSource

if TYPE_CHECKING:
    from hostagent.api import HostAgent

log = logging.getLogger(__name__)

SECRET_PREFIX = "blockwire/"  # noqa: S105 - the usage ids of blockwire's libvirt secrets start with it


@runtime_checkable
class Auditor(Protocol):
    """A connector that can list the host state it makes which no record in `keep` accounts for."""

    def audit(self, keep: list[ConnectionInfo]) -> list[Finding]: ...

    def fix(self, finding: Finding) -> bool:
        """Removes one of its own fixable findings; False when it was gone already."""
        ...


@dataclass(frozen=True)
class StorageRow:
    """An attachment as storage lists it (no connection info)."""

    id: str
    volume_id: str
    domain: str
    state: str


@runtime_checkable
class AttachmentLister(Protocol):
    """A storage client that can list one host's attachments (the gRPC one can; an embedder's may not)."""

    def host_attachments(self, host: str) -> list[StorageRow]: ...

    def delete_attachment(self, attachment_id: str) -> None: ...


def audit(agent: HostAgent, *, fix: bool = False) -> list[Finding]:
    """The findings on this host (see the module's table); with `fix`, the fixable ones removed."""
    records = agent.journal.all()
    keep = [r.connection_info for r in records]
    findings: list[Finding] = [
        Finding(
            "journal_error", f"{r.volume_id}@{r.domain}", r.error_message or "ERROR", volume_id=r.volume_id
        )
        for r in records
        if r.state is AttachmentState.ERROR
    ]
    running = agent.hypervisor.running_disks()
    serials = {r.serial for r in records if r.serial}
    for domain, disks in sorted(running.items()):
        for d in disks:
            src = d.spec.source
            usage = src.auth.usage if isinstance(src, NetworkSource) and src.auth is not None else ""
            if usage.startswith(SECRET_PREFIX) and d.spec.serial not in serials:
                findings.append(
                    Finding(
                        "domain_disk",
                        f"{domain}:{d.spec.target_dev}",
                        f"serial {d.spec.serial or '-'}, secret {usage}: a blockwire disk no attachment "
                        "records; detach it from the domain (virsh detach-disk) if it is not wanted",
                    )
                )
    auditors: list[Auditor] = [c for c in agent.all_connectors() if isinstance(c, Auditor)]
    if agent.volume_keys is not None:  # encrypted volumes' key secrets (hostagent.encryption)
        auditors.append(agent.volume_keys)
    for conn in auditors:
        try:
            findings += conn.audit(keep)
        except BlockwireError as exc:
            kind = getattr(conn, "kind", None)
            findings.append(Finding("audit_failed", str(getattr(kind, "value", "volume keys")), exc.message))
    storage = agent.storage
    if isinstance(storage, AttachmentLister):
        findings += _storage(storage, agent.connector.host, records, running)
    if fix:
        findings = [_fix(agent, f, auditors) if f.fixable else f for f in findings]
    return findings


def _storage(
    storage: AttachmentLister, host: str, recs: Sequence[JournalRecord], running: dict[str, list[LiveDisk]]
) -> list[Finding]:
    try:
        rows = storage.host_attachments(host)
    except BlockwireError as exc:
        return [Finding("audit_failed", "storage", exc.message)]
    ids = {r.attachment_id for r in recs if r.attachment_id}
    pairs = {(r.volume_id, r.domain) for r in recs}
    out = []
    for row in rows:
        if row.id in ids or (row.volume_id, row.domain) in pairs:
            continue
        held = row.domain in running
        out.append(
            Finding(
                "storage_only",
                row.id,
                f"volume {row.volume_id}, domain {row.domain or '-'}, {row.state}: storage exports it to "
                "this host, no attachment here records it"
                + ("; its domain runs here, so it is left alone" if held else ""),
                fixable=not held,
                volume_id=row.volume_id,
            )
        )
    listed = {row.id for row in rows}
    out += [
        Finding(
            "host_only",
            f"{r.volume_id}@{r.domain}",
            f"attachment {r.attachment_id} is gone from storage while this host has it attached; detach it "
            "(DetachVolume) or attach it again",
            volume_id=r.volume_id,
        )
        for r in recs
        if r.state is AttachmentState.ATTACHED
        and r.owns_export
        and r.attachment_id
        and r.attachment_id not in listed
    ]
    return out


def _fix(agent: HostAgent, finding: Finding, auditors: Sequence[Auditor]) -> Finding:
    """Removes one fixable finding under its volume's lock, unless an attachment of that volume appeared
    since the audit read the journal (an attach in flight defines its secret and storage attachment after
    its record: then the finding was never an orphan)."""
    storage = agent.storage
    try:
        with agent.holding(finding.volume_id or f"doctor/{finding.kind}/{finding.name}"):
            if finding.volume_id and agent.journal.of_volume(finding.volume_id):
                return replace(
                    finding, detail=f"{finding.detail}; an attachment of it appeared meanwhile: kept"
                )
            if finding.kind == "storage_only" and isinstance(storage, AttachmentLister):
                storage.delete_attachment(finding.name)
                done = True
            else:
                done = any(a.fix(finding) for a in auditors)
    except BlockwireError as exc:
        log.error("doctor: could not remove %s %s: %s", finding.kind, finding.name, exc.message)
        return replace(finding, detail=f"{finding.detail}; removing it failed: {exc.message}")
    if done:
        log.warning("doctor: removed %s %s, which nothing accounted for", finding.kind, finding.name)
    return replace(finding, fixed=done)
