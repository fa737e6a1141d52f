"""Exports: attachments (create, complete, delete, get, list) and the target, LUN, CHAP accounts and ACL
entries behind them; the restore of an export (`reconcile`, the export checks) and its repair.

An attachment is one consumer, (host, domain); the attachments of a multiattach volume share one export,
reference-counted: its target goes with the last attachment, an initiator's ACL entry with the last
attachment of that initiator (STYLE.md 13). Record first, act second, undo on failure (STYLE.md 6).

A volume on a direct backend (`DirectBackend`: rbd) has no target: its attachment carries what the host
needs to open the volume itself (`RbdConnection`: monitors, pool, image, the image's id, the cluster's
fsid, a cephx user and key), read from the cluster when the attachment is made, and no export record.
The attachment rules are the same: one (host, domain) consumer unless multiattach, repeats return the
attachment, deletes of what is gone succeed.

The exporter decides the transport (`storagesvc.targets.base.transport_of`): an iSCSI exporter (tgt,
lio) admits the connector's initiator IQN and announces an `IscsiConnection` with the export's CHAP; an
NVMe exporter (nvmet) names the subsystem itself, admits the connector's host NQN and announces an
`NvmeofConnection` with the namespace's NGUID and UUID and the host's DH-HMAC-CHAP secrets. Everything
else (records, reference counts, reconcile, repair) is the same for both.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import replace

from blockwire import validate
from blockwire.errors import BlockwireError, FailedPrecondition, Internal, InvalidArgument, NotFound
from blockwire.model import (
    AccessMode,
    Chap,
    ConnectionInfo,
    Connector,
    Encryption,
    IscsiConnection,
    IscsiPath,
    NvmeofConnection,
    NvmeofPortal,
    Transport,
)
from blockwire.secret import Secret
from storagesvc import identity, paging
from storagesvc.backends.base import DirectBackend
from storagesvc.context import Context, Pool
from storagesvc.model import (
    ATTACHABLE,
    Attachment,
    AttachmentState,
    ExportRecord,
    Page,
    Volume,
    VolumeState,
)
from storagesvc.targets.base import Exporter, NvmeExporter, TargetSpec, TargetState, transport_of
from storagesvc.voltypes import VolumeTypes

log = logging.getLogger(__name__)

CHAP_ALPHABET = string.ascii_letters + string.digits
CHAP_LENGTH = 16

# Failpoints (blockwire.runtime.failpoints, injected; the daemon arms them from BLOCKWIRE_FAILPOINTS):
# where the recovery tests kill the service in the middle of an export (more in
# storagesvc/targets/tgt.py). See `storagesvc.reconcile`.
FP_EXPORT_AFTER_CATALOG = "storage.export.after_catalog"  # attachment RESERVED, nothing exported
FP_EXPORT_AFTER_TARGET = "storage.export.after_target"  # target, LUN and CHAP made, no ACL entry
FP_EXPORT_AFTER_ACL = "storage.export.after_acl"  # the host is admitted; still RESERVED in the catalog
FP_EXPORT_AFTER_ATTACHING = "storage.export.after_attaching"  # ATTACHING recorded, the answer not sent
FP_UNEXPORT_AFTER_DETACHING = "storage.unexport.after_detaching"  # DETACHING recorded, target still there
FP_UNEXPORT_AFTER_TARGET_REMOVED = "storage.unexport.after_target_removed"  # target gone, row still there
_EXPORTED = frozenset({VolumeState.ATTACHING, VolumeState.IN_USE})  # states whose export must be live


def new_chap_secret() -> Secret:
    return Secret("".join(secrets.choice(CHAP_ALPHABET) for _ in range(CHAP_LENGTH)))


def initiator_of(connector: Connector, exporter: Exporter | None) -> str:
    """The name `exporter` admits the connector's host by: its host NQN (NVMe), else its initiator IQN
    (also for a direct backend, None: no exporter admits anyone; the IQN tells a repeat from another
    consumer as before)."""
    if exporter is not None and transport_of(exporter) is Transport.NVME_TCP:
        return connector.nvme_host_nqn
    return connector.initiator_iqn


def _repeat(
    v: Volume,
    atts: Sequence[Attachment],
    connector: Connector,
    *,
    domain: str,
    mode: AccessMode,
    exporter: Exporter | None,
) -> Attachment | None:
    """The attachment a CreateAttachment repeats, or None. An attachment is one consumer: (host, domain).
    A repeat of it returns it; another consumer, on this host or another, is a second attachment, which
    only a multiattach volume may have (a repeat from the same host must never stand in for another
    domain's attachment: its deletion would unexport the volume under the first domain). The same consumer
    asking otherwise is FAILED_PRECONDITION."""
    initiator = initiator_of(connector, exporter)
    for a in atts:
        if a.connector.host != connector.host or a.domain != domain:
            continue
        if (
            initiator_of(a.connector, exporter) == initiator
            and a.access_mode is mode
            and a.state in (AttachmentState.ATTACHING, AttachmentState.ATTACHED)
        ):
            return a
        raise FailedPrecondition(
            f"volume {v.id} is already attached to {_consumer(a.connector.host, a.domain)} ({a.id}, "
            f"{a.state.value}, {a.access_mode.value}, {initiator_of(a.connector, exporter)}); "
            "delete that attachment first"
        )
    return None


def _with_key(a: Attachment, encryption: Encryption | None) -> Attachment:
    """A repeat's answer carries the key like the first one (the catalog's copy has none)."""
    if encryption is None or a.connection_info is None:
        return a
    return replace(a, connection_info=replace(a.connection_info, encryption=encryption))


def _consumer(host: str, domain: str) -> str:
    return f"domain {domain!r} on host {host}" if domain else f"host {host}"


class Exports:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # -- attachments

    def create(
        self,
        volume_id: str,
        connector: Connector,
        mode: AccessMode,
        domain: str = "",
        *,
        transport: Transport | None = None,
    ) -> Attachment:
        """Attaches the volume to (connector.host, domain). `transport`: the one the caller wants (None:
        the volume's, iSCSI for exported backends, the backend's own for direct ones, e.g. RBD);
        another one is INVALID_ARGUMENT."""
        ctx = self.ctx
        with ctx.stats.measure("create_attachment"):
            validate.object_id(volume_id, "volume_id")
            validate.connector(connector)
            with ctx.hold_volume(volume_id):
                v = ctx.volume(volume_id)
                pool = ctx.pools[v.backend]
                direct = pool.backend if isinstance(pool.backend, DirectBackend) else None
                own = direct.transport if direct is not None else transport_of(pool.target_exporter())
                if transport is not None and transport is not own:
                    raise InvalidArgument(
                        "transport",
                        f"volume {v.id} is on backend {v.backend} ({pool.backend.kind}), reached over "
                        f"{own.value}, not {transport.value}",
                    )
                validate.connector(connector, transport=own)
                return self._create(v, connector, mode, domain)

    def _create(
        self, v: Volume, connector: Connector, mode: AccessMode, domain: str, migration_source_id: str = ""
    ) -> Attachment:
        """`migration_source_id`: the destination attachment of a live migration (storagesvc.migrations),
        which a volume that is not multiattach may have beside its source attachment."""
        ctx = self.ctx
        if v.state not in ATTACHABLE:
            raise FailedPrecondition(f"volume {v.id} is {v.state.value}; it can be attached when available")
        # an encrypted volume's key is fetched first: a key manager that is down or refuses leaves nothing
        # half-done (the key goes only into this answer, never into the catalog: see `Encryption`)
        encryption = self._encryption_with_key(v)
        atts = ctx.catalog.attachments_of(v.id)
        pool = ctx.pools[v.backend]
        initiator = initiator_of(connector, pool.exporter)
        repeat = _repeat(v, atts, connector, domain=domain, mode=mode, exporter=pool.exporter)
        if repeat is not None:
            return _with_key(repeat, encryption)
        if atts and not v.multiattach and not migration_source_id:
            raise FailedPrecondition(
                f"volume {v.id} is attached to {_consumer(atts[0].connector.host, atts[0].domain)} and was "
                "not created multiattach; detach it there first"
            )
        if atts and v.export is not None and v.export.access_mode is not mode:
            raise FailedPrecondition(
                f"volume {v.id} is exported {v.export.access_mode.value}; every attachment must use that mode"
            )
        if isinstance(pool.backend, DirectBackend):
            return self._create_direct(
                v,
                pool.backend,
                atts,
                connector,
                mode=mode,
                domain=domain,
                migration=migration_source_id,
                encryption=encryption,
            )
        exporter = pool.target_exporter()
        first = not atts or v.export is None
        export = v.export if not first else self._new_export(v, mode, exporter)
        assert export is not None
        now = ctx.now()
        att = Attachment(
            id=ctx.new_id(),
            volume_id=v.id,
            connector=connector,
            access_mode=mode,
            state=AttachmentState.RESERVED,
            create_time=now,
            update_time=now,
            domain=domain,
            migration_source_id=migration_source_id,
        )
        before = v
        with contextlib.ExitStack() as undo:
            # record first (the attachment and the volume's export in one commit, durable before the
            # target exists) ...
            with ctx.transaction():
                ctx.catalog.insert_attachment(att)
                reserved = ctx.save(
                    replace(v, state=VolumeState.RESERVED if first else v.state, export=export)
                )
            undo.callback(self._unrecord, att.id, before)
            ctx.failpoints.hit(FP_EXPORT_AFTER_CATALOG)
            # ... then act, with compensations
            if first:
                undo.callback(exporter.remove_target, export.target_iqn)
                exporter.ensure_target(ctx.spec(reserved, export))
                ctx.failpoints.hit(FP_EXPORT_AFTER_TARGET)
            undo.callback(self._deny_unless_shared, v.id, att.id, export.target_iqn, initiator, exporter)
            spec = ctx.spec(reserved, export)
            exporter.allow(spec, initiator)
            ctx.failpoints.hit(FP_EXPORT_AFTER_ACL)
            transport = _transport_info(exporter, spec, export, connector)
            # iSCSI LUNs have 512-byte blocks; an NVMe namespace has the target's LBA size
            block = exporter.block_size(spec.device_path) if isinstance(exporter, NvmeExporter) else 512
            info = ConnectionInfo(
                transport=transport,
                volume_id=v.id,
                attachment_id=att.id,
                wwn=v.wwn if isinstance(transport, IscsiConnection) else "",  # NVMe: NGUID and UUID
                serial=v.serial,
                size_bytes=v.size_bytes + (encryption.header_bytes if encryption else 0),
                access_mode=mode,
                discard=False,
                logical_block_size=block,
                physical_block_size=block,
                multiattach=v.multiattach,
                encryption=encryption,
                qos=VolumeTypes(ctx).iotune_of(v),
            )
            try:  # what storage announces passes the checks every agent runs on it (a bug if not)
                validate.validate_connection_info(info)
            except InvalidArgument as exc:
                raise Internal(
                    f"the connection info of volume {v.id} fails its own checks ({exc.message}); "
                    "nothing was exported"
                ) from exc
            att = replace(att, state=AttachmentState.ATTACHING, connection_info=info, update_time=ctx.now())
            self._record_attaching(att, reserved)
            undo.pop_all()
        ctx.failpoints.hit(FP_EXPORT_AFTER_ATTACHING)
        log.info(
            "volume %s exported to host %s (%s) as attachment %s",
            v.id,
            connector.host,
            initiator,
            att.id,
        )
        return att

    def with_key(self, a: Attachment) -> Attachment:
        """`a` with its encrypted volume's key in the connection info (the answer to a repeat)."""
        return _with_key(a, self._encryption_with_key(self.ctx.volume(a.volume_id)))

    def _record_attaching(self, att: Attachment, reserved: Volume) -> None:
        """One commit: the attachment ATTACHING (its connection info without the key), the volume's
        state."""
        ctx = self.ctx
        assert att.connection_info is not None
        state = VolumeState.ATTACHING if reserved.state is VolumeState.RESERVED else reserved.state
        with ctx.transaction():
            ctx.catalog.update_attachment(replace(att, connection_info=att.connection_info.without_key()))
            ctx.save(replace(reserved, state=state))

    def _unrecord(self, attachment_id: str, before: Volume) -> None:
        """Undoes `_create`'s record (one commit): the attachment gone, the volume as it was."""
        with self.ctx.transaction():
            self.ctx.save(before)
            self.ctx.catalog.delete_attachment(attachment_id)

    def _encryption_with_key(self, v: Volume) -> Encryption | None:
        if v.encryption is None:
            return None
        passphrase = self.ctx.need_crypt().passphrase(v.encryption)
        return replace(v.encryption, passphrase=passphrase)

    def _create_direct(
        self,
        v: Volume,
        backend: DirectBackend,
        atts: Sequence[Attachment],
        connector: Connector,
        *,
        mode: AccessMode,
        domain: str,
        migration: str = "",
        encryption: Encryption | None = None,
    ) -> Attachment:
        """An attachment of a volume hosts open themselves: no target, no export record. The transport
        info (with the identity read now from the storage) is made before anything is recorded, so a
        failure (the cluster down: UNAVAILABLE) leaves nothing behind. Not a live migration's
        destination attachment (`migration`): not supported for these backends yet."""
        ctx = self.ctx
        if migration:
            raise FailedPrecondition(
                f"volume {v.id} is on backend {v.backend} (direct): live migration of its volumes is "
                "not supported yet; the volume stays attached to the source"
            )
        if atts and any(a.access_mode is not mode for a in atts):
            raise FailedPrecondition(
                f"volume {v.id} is attached {atts[0].access_mode.value}; every attachment must use that mode"
            )
        transport = backend.connection(v.id, connector.host)
        now = ctx.now()
        info = ConnectionInfo(
            transport=transport,
            volume_id=v.id,
            wwn=v.wwn,
            serial=v.serial,
            size_bytes=v.size_bytes + (encryption.header_bytes if encryption else 0),
            access_mode=mode,
            discard=True,
            logical_block_size=512,
            physical_block_size=512,
            multiattach=v.multiattach,
            qos=VolumeTypes(ctx).iotune_of(v),
            encryption=encryption,  # with the key: only in this answer (the catalog gets it without)
        )
        att = Attachment(
            id=ctx.new_id(),
            volume_id=v.id,
            connector=connector,
            access_mode=mode,
            state=AttachmentState.ATTACHING,
            create_time=now,
            update_time=now,
            domain=domain,
        )
        info = replace(info, attachment_id=att.id)
        try:
            validate.validate_connection_info(info)
        except InvalidArgument as exc:
            raise Internal(
                f"the connection info of volume {v.id} fails its own checks ({exc.message}); nothing was "
                "recorded"
            ) from exc
        att = replace(att, connection_info=info)
        with ctx.transaction():  # one commit: both or neither
            ctx.catalog.insert_attachment(replace(att, connection_info=info.without_key()))
            ctx.save(replace(v, state=v.state if atts else VolumeState.ATTACHING))
        log.info(
            "volume %s (%s) announced to host %s as attachment %s",
            v.id,
            info.kind.value,
            connector.host,
            att.id,
        )
        return att

    def _new_export(self, v: Volume, mode: AccessMode, exporter: Exporter) -> ExportRecord:
        ctx = self.ctx
        if isinstance(exporter, NvmeExporter):  # DH-HMAC-CHAP secrets are per host, not per export
            return ExportRecord(
                target_iqn=identity.subsystem_nqn(exporter.nqn_prefix, v.id),
                lun=exporter.lun,
                chap=None,
                mutual_chap=None,
                access_mode=mode,
            )
        chap = Chap(f"in-{v.id[:24]}", ctx.new_secret())
        mutual = Chap(f"out-{v.id[:24]}", ctx.new_secret()) if ctx.mutual_chap else None
        return ExportRecord(
            target_iqn=identity.target_iqn(ctx.iqn_prefix, v.id),
            lun=exporter.lun,
            chap=chap,
            mutual_chap=mutual,
            access_mode=mode,
        )

    def _deny_unless_shared(
        self, volume_id: str, attachment_id: str, target_iqn: str, initiator_iqn: str, exporter: Exporter
    ) -> None:
        """Removes an initiator from the ACL unless another attachment of the volume uses it too."""
        others = [
            a
            for a in self.ctx.catalog.attachments_of(volume_id)
            if a.id != attachment_id and initiator_of(a.connector, exporter) == initiator_iqn
        ]
        if not others:
            exporter.deny(target_iqn, initiator_iqn)

    def complete(self, attachment_id: str, target_dev: str = "", host_device: str = "") -> Attachment:
        ctx = self.ctx
        with ctx.stats.measure("complete_attachment"):
            a = self.get(attachment_id)
            with ctx.hold_volume(a.volume_id):
                a = self.get(attachment_id)
                if a.state is AttachmentState.ATTACHED:
                    return a
                if a.state is not AttachmentState.ATTACHING:
                    raise FailedPrecondition(
                        f"attachment {attachment_id} is {a.state.value}; it cannot complete"
                    )
                a = replace(
                    a,
                    state=AttachmentState.ATTACHED,
                    target_dev=target_dev,
                    host_device=host_device,
                    update_time=ctx.now(),
                )
                with ctx.transaction():  # one commit: the attachment ATTACHED, the volume IN_USE
                    ctx.catalog.update_attachment(a)
                    v = ctx.catalog.get_volume(a.volume_id)
                    if v is not None:
                        ctx.save(replace(v, state=VolumeState.IN_USE))
                return a

    def delete(self, attachment_id: str) -> None:
        ctx = self.ctx
        with ctx.stats.measure("delete_attachment"):
            validate.object_id(attachment_id, "attachment_id")
            a = ctx.catalog.get_attachment(attachment_id)
            if a is None:
                return
            with ctx.hold_volume(a.volume_id):
                self.remove(attachment_id)

    def remove(self, attachment_id: str) -> None:
        """`delete` under the volume's lock, which the caller holds."""
        ctx = self.ctx
        a = ctx.catalog.get_attachment(attachment_id)
        if a is None:
            return
        v = ctx.catalog.get_volume(a.volume_id)
        others = [x for x in ctx.catalog.attachments_of(a.volume_id) if x.id != a.id]
        a = replace(a, state=AttachmentState.DETACHING, update_time=ctx.now())
        with ctx.transaction():  # record first, one commit: the attachment (and volume) DETACHING
            ctx.catalog.update_attachment(a)
            if v is not None and not others:
                v = ctx.save(replace(v, state=VolumeState.DETACHING))
        ctx.failpoints.hit(FP_UNEXPORT_AFTER_DETACHING)
        if v is not None and v.export is not None:
            exporter = ctx.pools[v.backend].target_exporter()
            if others:
                initiator = initiator_of(a.connector, exporter)
                self._deny_unless_shared(v.id, a.id, v.export.target_iqn, initiator, exporter)
            else:
                exporter.remove_target(v.export.target_iqn)
        ctx.failpoints.hit(FP_UNEXPORT_AFTER_TARGET_REMOVED)
        with ctx.transaction():  # one commit: the attachment gone, the volume's state
            ctx.catalog.delete_attachment(a.id)
            if v is not None:
                if others:
                    ctx.save(replace(v, state=in_use_or_attaching(others)))
                else:
                    ctx.save(replace(v, state=VolumeState.AVAILABLE, export=None))
        log.info("attachment %s of volume %s deleted", a.id, a.volume_id)

    def get(self, attachment_id: str) -> Attachment:
        validate.object_id(attachment_id, "attachment_id")
        a = self.ctx.catalog.get_attachment(attachment_id)
        if a is None:
            raise NotFound(f"attachment {attachment_id} does not exist")
        return a

    def page(self, volume_id: str, host: str, page_size: int, page_token: str) -> Page[Attachment]:
        return paging.listing(
            page_size,
            page_token,
            lambda after, n: self.ctx.catalog.list_attachments(
                volume_id=volume_id, host=host, after=after, limit=n
            ),
        )

    # -- restore and repair

    def restore(self, v: Volume, pool: Pool, live: Sequence[Attachment]) -> None:
        """Target, LUN (with the volume's identity), CHAP accounts and one ACL entry per live attachment:
        what `reconcile` and `repair` rebuild. Idempotent."""
        assert v.export is not None
        spec = self.ctx.spec(v, v.export)
        exporter = pool.target_exporter()
        exporter.ensure_target(spec)
        for a in live:
            exporter.allow(spec, initiator_of(a.connector, exporter))

    def repair(self) -> list[str]:
        """Compares each exporter's live targets with the catalog and rebuilds the exports it lost;
        returns the ids of the volumes repaired. Run by `storagesvc.supervisor.ExportSupervisor`.

        One listing per exporter (tgt: one `tgtadm --op show --mode target`); an export is lost when its
        target is gone (tgtd restarted and forgot it), an attached initiator is missing from its ACL, or
        its LUN is gone, offline, on another backing or announces another identity (wwn, serial) than
        the volume's. Only volumes the catalog has ATTACHING or IN_USE are looked at; each repair takes
        the volume's lock, reads the volume again and rebuilds it with the same code as `reconcile`
        (`restore`), so a call in flight on that volume is never raced. Counted as the
        "export_repair" operation in GetBackendStats.
        """
        ctx = self.ctx
        wanted: dict[int, list[Volume]] = {}
        exporters: dict[int, Exporter] = {}
        for v in ctx.all_volumes():
            pool = ctx.pools.get(v.backend)
            if pool is None or pool.exporter is None or v.export is None or v.state not in _EXPORTED:
                continue
            exporters[id(pool.exporter)] = pool.exporter
            wanted.setdefault(id(pool.exporter), []).append(v)
        repaired: list[str] = []
        for key, volumes in wanted.items():
            exporter = exporters[key]
            try:
                live = {t.target_iqn: t for t in exporter.list_targets(ctx.target_prefix(exporter))}
                lost = [(v, why) for v in volumes if (why := self._export_lost(v, live, exporter))]
                if not lost:
                    continue
                exporter.start()  # a restarted tgtd forgot its portals too
            except (BlockwireError, OSError) as exc:
                log.warning("exporter %s: checking its exports failed: %s", exporter.kind, exc)
                continue
            for v, why in lost:
                try:
                    with ctx.stats.measure("export_repair"), ctx.hold_volume(v.id):
                        if self._repair_export(v.id, why):
                            repaired.append(v.id)
                except BlockwireError as exc:
                    log.error("volume %s: repairing its export failed: %s", v.id, exc.message)
        return repaired

    def _live_attachments(self, volume_id: str) -> list[Attachment]:
        return [
            a
            for a in self.ctx.catalog.attachments_of(volume_id)
            if a.state in (AttachmentState.ATTACHING, AttachmentState.ATTACHED)
        ]

    def _export_lost(self, v: Volume, live: Mapping[str, TargetState], exporter: Exporter) -> str:
        """What the target side lost of the volume's export, in words; "" when it is intact."""
        assert v.export is not None
        state = live.get(v.export.target_iqn)
        if state is None:
            return f"target {v.export.target_iqn} is gone"
        if state.lun is None:
            return f"target {v.export.target_iqn} has no LUN {v.export.lun}"
        wrong = state.lun.differs(self.ctx.spec(v, v.export))
        if wrong:
            return f"target {v.export.target_iqn}: {wrong}"
        admitted = [initiator_of(a.connector, exporter) for a in self._live_attachments(v.id)]
        missing = [name for name in admitted if name not in state.initiators]
        if missing:
            return f"target {v.export.target_iqn} does not admit {', '.join(missing)}"
        return ""

    def _repair_export(self, volume_id: str, why: str) -> bool:
        """Under the volume's lock: rebuilds the export if the catalog still wants it."""
        v = self.ctx.catalog.get_volume(volume_id)
        if v is None or v.export is None or v.state not in _EXPORTED:
            return False
        atts = self._live_attachments(v.id)
        if not atts:
            return False
        self.restore(v, self.ctx.pools[v.backend], atts)
        log.warning(
            "volume %s: export %s was lost on the target side (%s); rebuilt for %d attachment(s)",
            v.id,
            v.export.target_iqn,
            why,
            len(atts),
        )
        return True


def _transport_info(
    exporter: Exporter, spec: TargetSpec, export: ExportRecord, connector: Connector
) -> IscsiConnection | NvmeofConnection:
    """What the host needs to reach the export over the exporter's transport."""
    if isinstance(exporter, NvmeExporter):
        host_secret, ctrl_secret = exporter.host_secrets(connector.nvme_host_nqn)
        return NvmeofConnection(
            subsystem_nqn=export.target_iqn,
            portals=tuple(NvmeofPortal(p, "tcp") for p in exporter.portals),
            namespace_id=export.lun,
            namespace_uuid=spec.uuid,
            namespace_nguid=spec.nguid,
            host_nqn=connector.nvme_host_nqn,
            dhchap_host_secret=host_secret,
            dhchap_ctrl_secret=ctrl_secret,
        )
    return IscsiConnection(
        paths=tuple(IscsiPath(p, export.target_iqn, export.lun) for p in exporter.portals),
        chap=export.chap,
        mutual_chap=export.mutual_chap,
        initiator_iqn=connector.initiator_iqn,
    )


def in_use_or_attaching(attachments: Sequence[Attachment]) -> VolumeState:
    """The state of a volume with these attachments: IN_USE once one is ATTACHED."""
    return (
        VolumeState.IN_USE
        if any(a.state is AttachmentState.ATTACHED for a in attachments)
        else VolumeState.ATTACHING
    )
