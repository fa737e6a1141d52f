"""Live migration, host side: a verified, crash-safe handoff of a domain's volumes between two agents.

The calls a virt manager makes (README "Live migration"):

    source  ListAttachments(domain)            -> each volume's storage attachment id and target dev
    caller  the source domain's XML (virDomainGetXMLDesc with VIR_DOMAIN_XML_MIGRATABLE)
    dest    PrepareMigration(domain, xml, vols) -> the destination domain XML
    caller  virDomainMigrateToURI3(dest, {VIR_MIGRATE_PARAM_DEST_XML: that XML}, LIVE | ...)
    success: dest FinishIncomingMigration(domain), then source FinishOutgoingMigration(domain)
    failure: dest AbortMigration(domain); the source made nothing, so the VM runs there with its disks

Destination, `prepare`, per volume (journal first: a record in state MIGRATING, linked to the source's
storage attachment by `migration_source_id`): storage CreateMigrationAttachment (the destination's
attachment beside the live source's: same export, this initiator admitted) -> connect, the device's
identity verified as in an attach (QEMU-native iSCSI: libiscsi reads the LUN's WWN with this host's
initiator name and CHAP; the libvirt secret is defined here) -> the source's disk element with only its
<source> replaced (target dev, address, serial, driver, iotune, boot order kept). A failure undoes every
volume of the call. `finish_incoming`: the domain runs here with the disk (found by its serial) ->
journal ATTACHED -> storage CompleteMigration (the source attachment and its ACL entry go) -> the record
loses its migration mark. `abort` (destination): disconnect, storage RollbackMigration, drop the record;
never while a domain here holds the disk.

Source: nothing is made before the migration, so a failed one leaves the domain and its disks as they
were. `finish_outgoing`, once the domain no longer runs here: journal DETACHING -> the disk leaves the
domain's definition if the domain is still defined here -> disconnect (the libvirt secret, sessions) ->
storage DeleteAttachment of the source's attachment -> drop the record.

Crash safety (agent killed, failpoints below; `reconcile` at the agent's start):

=====================================================  ==================================================
killed                                                 on restart
=====================================================  ==================================================
destination, in prepare [prepare.*]                    the domain is not here: rolled back (disconnect,
                                                       RollbackMigration, the record goes): not migrated;
                                                       a libvirt migration started after that fails,
                                                       since the destination cannot open the disk
destination, prepared, the domain arriving (paused     kept: migration in progress; Finish or Abort
for the migration)                                     decides, or the next reconcile
destination, prepared or in finish_incoming            the domain runs here with the disk: rolled
[finish_in.*]                                          forward (ATTACHED, CompleteMigration): migrated
source, in finish_outgoing [finish_out.*, detach.*]    DETACHING: rolled forward (the domain left): the
                                                       source holds nothing
source, before finish_outgoing, the domain gone        the record's domain is gone: rolled back, as for
                                                       any attachment whose domain went: holds nothing
=====================================================  ==================================================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from blockwire import validate
from blockwire.errors import BlockwireError, FailedPrecondition, InvalidArgument, NotFound
from blockwire.model import ConnectionInfo, LocalConnection
from hostagent.model import AttachmentState, EventType, JournalRecord
from hostagent.virt.diskxml import (
    DiskEncryption,
    disk_at,
    domain_uuid,
    moved_disk_xml,
    replace_disk_sources,
)
from hostagent.virt.sources import disk_source

if TYPE_CHECKING:
    from hostagent.api import HostAgent, ReconcileAction
    from hostagent.virt.diskxml import Source

log = logging.getLogger(__name__)

FP_PREPARE_AFTER_JOURNAL = "agent.migrate.prepare.after_journal"
FP_PREPARE_AFTER_CREATE_ATTACHMENT = "agent.migrate.prepare.after_create_attachment"
FP_PREPARE_AFTER_CONNECT = "agent.migrate.prepare.after_connect"
FP_FINISH_IN_AFTER_JOURNAL = "agent.migrate.finish_in.after_journal"
FP_FINISH_IN_AFTER_COMPLETE = "agent.migrate.finish_in.after_complete"
FP_FINISH_OUT_AFTER_JOURNAL = "agent.migrate.finish_out.after_journal"
FP_ABORT_AFTER_JOURNAL = "agent.migrate.abort.after_journal"
PREPARE_FAILPOINTS = (FP_PREPARE_AFTER_JOURNAL, FP_PREPARE_AFTER_CREATE_ATTACHMENT, FP_PREPARE_AFTER_CONNECT)
FINISH_FAILPOINTS = (FP_FINISH_IN_AFTER_JOURNAL, FP_FINISH_IN_AFTER_COMPLETE, FP_FINISH_OUT_AFTER_JOURNAL)


@dataclass(frozen=True)
class MigrationVolume:
    """A volume of the migrating domain, as the source agent knows it (its ListAttachments)."""

    volume_id: str
    source_attachment_id: str  # the source host's storage attachment
    target_dev: str  # the disk's name in the domain ("sda")


@dataclass(frozen=True)
class PreparedDisk:
    volume_id: str
    attachment_id: str  # the destination's storage attachment
    target_dev: str
    disk_xml: str  # the <disk> element for the destination


@dataclass(frozen=True)
class _Arrival:
    domain: str
    uuid: str  # the domain's UUID (libvirt keeps it across a migration)
    domain_xml: str  # the source's domain XML
    allow_unverified_identity: bool


@dataclass(frozen=True)
class PreparedMigration:
    domain_xml: str  # the source's domain XML with each volume's disk opening it on the destination
    disks: tuple[PreparedDisk, ...]


class PeerAgent(Protocol):
    """The destination's agent as the source's `migrate` needs it (hostagent.rpc.peer_client over gRPC
    with this agent's TLS identity; another HostAgent in tests)."""

    def prepare_migration(
        self, domain: str, domain_xml: str, volumes: list[MigrationVolume]
    ) -> PreparedMigration: ...

    def finish_incoming_migration(self, domain: str) -> object: ...

    def abort_migration(self, domain: str) -> object: ...


@dataclass(frozen=True)
class MigrationResult:
    volume_ids: tuple[str, ...]
    prepare_seconds: float
    libvirt_seconds: float
    finish_seconds: float


class MigrationHandoff:
    """Both sides of the handoff on one agent (which side a call is decides what it does)."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent

    # -- destination ------------------------------------------------------------------------------
    def prepare(
        self,
        domain: str,
        domain_xml: str,
        volumes: Sequence[MigrationVolume],
        *,
        allow_unverified_identity: bool = False,
    ) -> PreparedMigration:
        """Makes this host ready to receive `domain` with `volumes`; a repeat returns the same disks."""
        agent = self.agent
        validate.domain(domain)
        if not domain_xml:
            raise InvalidArgument(
                "domain_xml", "required: the source domain's XML (VIR_DOMAIN_XML_MIGRATABLE)"
            )
        if not volumes:
            raise InvalidArgument("volumes", "at least one volume")
        seen: set[str] = set()
        for i, v in enumerate(volumes):
            validate.object_id(v.volume_id, f"volumes[{i}].volume_id")
            validate.object_id(v.source_attachment_id, f"volumes[{i}].source_attachment_id")
            if not v.target_dev:
                raise InvalidArgument(f"volumes[{i}].target_dev", "required")
            validate.target_dev(v.target_dev, f"volumes[{i}].target_dev")
            if v.volume_id in seen or v.target_dev in seen:
                raise InvalidArgument(f"volumes[{i}]", f"{v.volume_id} or {v.target_dev} given twice")
            seen.update((v.volume_id, v.target_dev))
        if agent.storage is None:
            raise FailedPrecondition("no storage service is configured; a migration needs one")
        uuid = domain_uuid(domain_xml)
        specs = {v.volume_id: disk_at(domain_xml, v.target_dev).spec for v in volumes}
        for v in volumes:
            if not specs[v.volume_id].serial:
                raise FailedPrecondition(
                    f"the disk {v.target_dev} of {domain!r} has no serial, so the destination cannot tell it "
                    "apart; only disks blockwire attached migrate this way"
                )
        here = agent._domain_or_none(domain)
        if here is not None and here.running and not here.migrating:
            raise FailedPrecondition(f"domain {domain!r} already runs on this host; nothing to migrate here")
        with ExitStack() as locks:
            for v in sorted(volumes, key=lambda v: v.volume_id):
                locks.enter_context(agent.hold_volume(v.volume_id))
            disks: list[PreparedDisk] = []
            sources: dict[str, Source] = {}
            encryptions: dict[str, DiskEncryption] = {}
            with ExitStack() as undo:
                for v in volumes:
                    arrival = _Arrival(domain, uuid, domain_xml, allow_unverified_identity)
                    disk, source, encryption = self._prepare_one(arrival, v, specs[v.volume_id].serial, undo)
                    disks.append(disk)
                    sources[v.target_dev] = source
                    if encryption is not None:
                        encryptions[v.target_dev] = encryption
                undo.pop_all()
        log.info("prepared the migration of %s here: %s", domain, ", ".join(d.volume_id for d in disks))
        return PreparedMigration(replace_disk_sources(domain_xml, sources, encryptions), tuple(disks))

    def _prepare_one(
        self, arrival: _Arrival, v: MigrationVolume, serial: str, undo: ExitStack
    ) -> tuple[PreparedDisk, Source, DiskEncryption | None]:
        domain, uuid, domain_xml = arrival.domain, arrival.uuid, arrival.domain_xml
        from hostagent.api import require_identity  # noqa: PLC0415 - api imports this module

        agent = self.agent
        storage = agent.storage
        assert storage is not None
        a = agent.journal.get(v.volume_id, domain)
        if a is not None and not (
            a.state is AttachmentState.MIGRATING and a.migration_source_id == v.source_attachment_id
        ):
            raise FailedPrecondition(
                f"volume {v.volume_id} already has an attachment to {domain!r} on this host "
                f"({a.state.value}); detach it, or finish or abort that migration first"
            )
        now = agent.clock.now()
        if a is None:
            a = JournalRecord(
                volume_id=v.volume_id,
                domain=domain,
                domain_uuid=uuid,
                state=AttachmentState.MIGRATING,
                connection_info=_placeholder(v.volume_id),
                owns_export=True,
                serial=serial,
                target_dev=v.target_dev,
                migration_source_id=v.source_attachment_id,
                create_time=now,
                update_time=now,
            )
            agent.journal.put(a)
        undo.callback(self._undo_prepare, v.volume_id, domain)
        agent.failpoints.hit(FP_PREPARE_AFTER_JOURNAL)
        sa = storage.create_migration_attachment(v.source_attachment_id, agent.connector, domain)
        agent.failpoints.hit(FP_PREPARE_AFTER_CREATE_ATTACHMENT)
        info = sa.connection_info
        a = agent.journal.update(a, attachment_id=sa.id, connection_info=info, access_mode=info.access_mode)
        require_identity(info, arrival.allow_unverified_identity)
        conn = agent._validate_info(info)
        keys = agent._volume_keys(info)  # an encrypted volume: its key came with the answer
        a = agent.journal.update(a, connector_kind=conn.kind)
        device = conn.connect(info)  # identity verified
        agent.failpoints.hit(FP_PREPARE_AFTER_CONNECT)
        agent.journal.update(a, host_device=device.path, update_time=agent.clock.now())
        source = disk_source(device)
        # this host's own secret for the key (the source's secret stays there until FinishOutgoing);
        # the undo's teardown removes it with the connection
        encryption = keys.define(info) if keys is not None else None
        agent.emit(EventType.PROGRESS, a, step="migration prepared", path=device.path)
        disk_xml = moved_disk_xml(domain_xml, v.target_dev, source, encryption)
        return PreparedDisk(v.volume_id, sa.id, v.target_dev, disk_xml), source, encryption

    def _undo_prepare(self, volume_id: str, domain: str) -> None:
        """A failed prepare's undo: whatever of the record exists goes; if that fails, the record stays
        ERROR for AbortMigration or the next reconcile."""
        journal = self.agent.journal
        a = journal.get(volume_id, domain)
        if a is None:
            return
        try:
            self.agent._teardown(a)
        except BlockwireError as exc:
            log.error("undoing the migration prepare of %s failed: %s", volume_id, exc.message)
            current = journal.get(volume_id, domain)
            if current is not None:
                journal.update(current, state=AttachmentState.ERROR, error_message=exc.message[:1000])

    def finish_incoming(self, domain: str) -> list[JournalRecord]:
        """The domain arrived and runs here: its attachments become ordinary, storage drops the source's."""
        agent = self.agent
        validate.domain(domain)
        try:
            dom = agent.hypervisor.lookup(domain)
        except NotFound:
            raise FailedPrecondition(
                f"domain {domain!r} is not on this host: the migration did not complete; AbortMigration here"
            ) from None
        if not dom.running or dom.migrating:
            how = "paused for the migration" if dom.running else "shut off"
            raise FailedPrecondition(
                f"domain {dom.name!r} has not arrived yet (it is {how}); finish once libvirt's migration "
                "returned, or AbortMigration"
            )
        pending = [a for a in agent.journal.all() if a.domain == dom.name and a.migration_source_id]
        done = []
        for a in pending:
            with agent.hold_volume(a.volume_id):
                current = agent.journal.get(a.volume_id, a.domain)
                if current is None or not current.migration_source_id:
                    continue
                live = agent._disk_by_serial(dom.name, current.serial)
                if live is None:
                    raise FailedPrecondition(
                        f"domain {dom.name!r} runs here without the disk of volume {a.volume_id} (serial "
                        f"{current.serial}); the destination XML from PrepareMigration was not used"
                    )
                done.append(self._finish_one(current, dom.uuid, dom.persistent, live.spec.target_dev))
        return done or [a for a in agent.journal.all() if a.domain == dom.name]

    def _finish_one(self, a: JournalRecord, uuid: str, persistent: bool, target_dev: str) -> JournalRecord:
        agent = self.agent
        storage = agent.storage
        assert storage is not None
        a = agent.journal.update(
            a,
            state=AttachmentState.ATTACHED,
            domain_uuid=uuid,
            persistent=persistent,
            target_dev=target_dev,
            update_time=agent.clock.now(),
        )
        agent.failpoints.hit(FP_FINISH_IN_AFTER_JOURNAL)
        storage.complete_migration(a.attachment_id, target_dev, a.host_device)
        agent.failpoints.hit(FP_FINISH_IN_AFTER_COMPLETE)
        a = agent.journal.update(a, migration_source_id="")
        agent.emit(EventType.ATTACHED, a, path=target_dev, step="migrated in")
        log.info("volume %s migrated in with domain %s as %s", a.volume_id, a.domain, target_dev)
        return a

    # -- source -----------------------------------------------------------------------------------
    def finish_outgoing(self, domain: str) -> list[str]:
        """The domain left this host: its host side and storage attachments here go. Returns the volume
        ids released; a repeat returns []."""
        agent = self.agent
        validate.domain(domain)
        records = [a for a in agent.journal.all() if a.domain == domain and not a.migration_source_id]
        for a in records:
            dom = agent._domain_of(a)
            if dom is not None and dom.running:
                raise FailedPrecondition(
                    f"domain {dom.name!r} still runs on this host: the migration did not complete; "
                    "AbortMigration on the destination instead (nothing here needs undoing)"
                )
        released = []
        marked = []
        for a in records:
            with agent.hold_volume(a.volume_id):
                current = agent.journal.get(a.volume_id, a.domain)
                if current is not None:
                    marked.append(agent.journal.update(current, state=AttachmentState.DETACHING))
        agent.failpoints.hit(FP_FINISH_OUT_AFTER_JOURNAL)
        for a in marked:
            with agent.hold_volume(a.volume_id):
                current = agent.journal.get(a.volume_id, a.domain)
                if current is None:
                    continue
                agent._teardown(current)
                agent.emit(EventType.DETACHED, current, step="migrated out")
                released.append(a.volume_id)
        log.info("domain %s migrated away: released %s", domain, ", ".join(released) or "nothing")
        return released

    def migrate(self, domain: str, peer: PeerAgent, destination_uri: str) -> MigrationResult:
        """The whole flow from the source: the destination agent prepares, libvirt migrates with its
        XML, both sides finish. When the prepare or libvirt's migration fails, the destination aborts
        and the error is raised: the domain runs here with its disks untouched."""
        agent = self.agent
        validate.domain(domain)
        if not destination_uri:
            raise InvalidArgument("destination_libvirt_uri", "required")
        dom = agent.hypervisor.lookup(domain)
        if not dom.running:
            raise FailedPrecondition(f"domain {dom.name!r} is not running here; nothing to migrate")
        records = [a for a in agent.journal.all() if a.domain == dom.name]
        pending = [
            a.volume_id for a in records if a.state is not AttachmentState.ATTACHED or a.migration_source_id
        ]
        if pending:
            raise FailedPrecondition(
                f"volumes {', '.join(pending)} of {dom.name!r} are not simply attached here; "
                "finish those first"
            )
        volumes = [MigrationVolume(a.volume_id, a.attachment_id, a.target_dev) for a in records]
        clock = agent.clock
        began = clock.monotonic()
        try:
            prepared = peer.prepare_migration(dom.name, agent.hypervisor.migratable_xml(dom.name), volumes)
            prepared_at = clock.monotonic()
            agent.hypervisor.migrate(dom.name, destination_uri, prepared.domain_xml)
        except BaseException:
            try:
                peer.abort_migration(dom.name)
            except BlockwireError as exc:
                log.error("aborting the migration of %s on the destination failed: %s", dom.name, exc.message)
            raise
        migrated_at = clock.monotonic()
        peer.finish_incoming_migration(dom.name)
        released = self.finish_outgoing(dom.name)
        return MigrationResult(
            tuple(released), prepared_at - began, migrated_at - prepared_at, clock.monotonic() - migrated_at
        )

    # -- either side ------------------------------------------------------------------------------
    def abort(self, domain: str) -> list[str]:
        """Undoes what this side made for a migration of `domain` that did not complete: on the
        destination, the prepared attachments (disconnect, RollbackMigration); on the source nothing
        was made. Returns the volume ids rolled back; a repeat returns []."""
        agent = self.agent
        validate.domain(domain)
        records = [
            a
            for a in agent.journal.all()
            if a.domain == domain and a.migration_source_id and a.state is not AttachmentState.ATTACHED
        ]
        if not records:
            return []
        dom = agent._domain_or_none(domain)
        if dom is not None and dom.running:
            if dom.migrating:
                raise FailedPrecondition(
                    f"the migration of {dom.name!r} into this host is still running; abort it in libvirt "
                    "(virDomainAbortJob on the source) first, then repeat"
                )
            if any(agent._disk_by_serial(dom.name, a.serial) is not None for a in records):
                raise FailedPrecondition(
                    f"domain {dom.name!r} runs on this host with its volumes: the migration completed; "
                    "call FinishIncomingMigration instead"
                )
        marked = []
        for a in records:
            with agent.hold_volume(a.volume_id):
                current = agent.journal.get(a.volume_id, a.domain)
                if current is not None:
                    marked.append(agent.journal.update(current, state=AttachmentState.DETACHING))
        agent.failpoints.hit(FP_ABORT_AFTER_JOURNAL)
        undone = []
        for a in marked:
            with agent.hold_volume(a.volume_id):
                current = agent.journal.get(a.volume_id, a.domain)
                if current is not None:
                    agent._teardown(current)
                    undone.append(a.volume_id)
        log.info("migration of %s here aborted: %s rolled back", domain, ", ".join(undone))
        return undone

    # -- restart ----------------------------------------------------------------------------------
    def reconcile(self, a: JournalRecord) -> ReconcileAction:
        """A destination record of a migration after a restart (the table in this module's docstring)."""
        from hostagent.api import ReconcileAction  # noqa: PLC0415 - api imports this module

        agent = self.agent
        dom = agent._domain_of(a)
        if (
            a.state in (AttachmentState.MIGRATING, AttachmentState.ATTACHED)
            and dom is not None
            and dom.running
        ):
            if dom.migrating:
                return ReconcileAction(a.volume_id, a.domain, "kept", "migration in progress")
            live = agent._disk_by_serial(dom.name, a.serial)
            if live is not None:
                self._finish_one(a, dom.uuid, dom.persistent, live.spec.target_dev)
                return ReconcileAction(a.volume_id, a.domain, "finished", "migrated in")
        agent._teardown(a)
        return ReconcileAction(a.volume_id, a.domain, "rolled back", f"migration {a.state.value}")


def _placeholder(volume_id: str) -> ConnectionInfo:
    """Connection info before storage answered (as an attach's record has)."""
    return ConnectionInfo(transport=LocalConnection(""), volume_id=volume_id)
