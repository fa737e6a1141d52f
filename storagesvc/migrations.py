"""Live migration, storage side: the destination host's attachment beside the source's, then complete
(the source's goes) or roll back (the destination's goes).

The destination attachment is an ordinary attachment (`Exports._create`: record first, act second, undo
on failure) that shares the source's export and admits the destination host beside the source's, also
for a volume that is not multiattach, marked with `migration_source_id`. Over iSCSI (tgt, lio) that is
the target, LUN and CHAP account, and the destination's initiator IQN in the ACL; over NVMe/TCP (nvmet)
the subsystem and namespace, and the destination's host NQN among the subsystem's allowed hosts, with
the DH-HMAC-CHAP secrets of that host (the kernel keeps them per host NQN) in its connection info. A
volume that hosts open themselves (a direct backend: rbd) is refused (FAILED_PRECONDITION): it has no
export to share yet. A volume has at most one such pair. Every step is idempotent, so a caller that
crashed repeats it:

* create: a repeat (same source, host, domain, initiator) returns the destination attachment;
* complete: the source attachment is removed first (`Exports.remove`: its ACL or allowed-host entry
  unless the destination shares the initiator or host NQN; never the target or subsystem, which the
  destination uses), then the mark is cleared and the attachment is ATTACHED; a crash between the two
  is finished by a repeat;
* rollback: the destination attachment is removed the same way; the source's is untouched.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from blockwire import validate
from blockwire.errors import FailedPrecondition, NotFound
from blockwire.model import Connector
from storagesvc.backends.base import DirectBackend
from storagesvc.context import Context
from storagesvc.exports import Exports, initiator_of
from storagesvc.model import Attachment, AttachmentState, Volume, VolumeState
from storagesvc.targets.base import transport_of

log = logging.getLogger(__name__)


class Migrations:
    def __init__(self, ctx: Context, exports: Exports) -> None:
        self.ctx = ctx
        self.exports = exports

    def create(self, source_attachment_id: str, connector: Connector, domain: str = "") -> Attachment:
        ctx = self.ctx
        with ctx.stats.measure("create_migration_attachment"):
            validate.object_id(source_attachment_id, "source_attachment_id")
            validate.connector(connector)
            validate.domain(domain, required=False)
            source = self._source(source_attachment_id)
            with ctx.hold_volume(source.volume_id):
                source = self._source(source_attachment_id)
                v = ctx.volume(source.volume_id)
                self._check_transport(v, connector)
                return self._create(source, v, connector, domain or source.domain)

    def _check_transport(self, v: Volume, connector: Connector) -> None:
        """The destination host must be able to reach the volume's export the way its exporter offers it
        (an initiator IQN for iSCSI, a host NQN for NVMe/TCP); a volume without an export (a direct
        backend) cannot migrate yet."""
        pool = self.ctx.pools[v.backend]
        if isinstance(pool.backend, DirectBackend):
            raise FailedPrecondition(
                f"volume {v.id} is on backend {v.backend} ({pool.backend.kind}, opened by the hosts "
                "themselves): live migration of its volumes is not supported yet; the volume stays attached "
                "to the source"
            )
        validate.connector(connector, transport=transport_of(pool.target_exporter()))

    def _source(self, attachment_id: str) -> Attachment:
        a = self.ctx.catalog.get_attachment(attachment_id)
        if a is None:
            raise NotFound(f"source attachment {attachment_id} does not exist")
        return a

    def _create(self, source: Attachment, v: Volume, connector: Connector, domain: str) -> Attachment:
        """`v`: the source's volume, read under its hold."""
        ctx = self.ctx
        exporter = ctx.pools[v.backend].exporter
        pending = [
            a
            for a in ctx.catalog.attachments_of(source.volume_id)
            if a.migration_source_id and a.id != source.id
        ]
        for a in pending:
            if (
                a.migration_source_id == source.id
                and a.connector.host == connector.host
                and initiator_of(a.connector, exporter) == initiator_of(connector, exporter)
                and a.domain == domain
                and a.state in (AttachmentState.ATTACHING, AttachmentState.ATTACHED)
            ):
                return self.exports.with_key(a)  # a repeat (with the key again, as the first answer)
            raise FailedPrecondition(
                f"volume {source.volume_id} is already being migrated to domain {a.domain!r} on host "
                f"{a.connector.host} (attachment {a.id}, {a.state.value}); complete or roll back that "
                "migration first"
            )
        if source.migration_source_id:
            raise FailedPrecondition(
                f"attachment {source.id} is itself the destination of a migration that is not complete; "
                "complete or roll it back first"
            )
        if source.state is not AttachmentState.ATTACHED:
            raise FailedPrecondition(
                f"source attachment {source.id} is {source.state.value}, not attached; a migration starts "
                "from a volume in use"
            )
        if connector.host == source.connector.host:
            raise FailedPrecondition(
                f"the destination host {connector.host} is the source attachment's host; a migration goes "
                "to another host"
            )
        if v.state is not VolumeState.IN_USE:
            raise FailedPrecondition(f"volume {v.id} is {v.state.value}, not in use")
        a = self.exports._create(v, connector, source.access_mode, domain, migration_source_id=source.id)
        log.info(
            "volume %s: migration attachment %s for host %s beside %s of host %s",
            v.id,
            a.id,
            connector.host,
            source.id,
            source.connector.host,
        )
        return a

    def complete(self, attachment_id: str, target_dev: str = "", host_device: str = "") -> Attachment:
        ctx = self.ctx
        with ctx.stats.measure("complete_migration"):
            a = self.exports.get(attachment_id)
            with ctx.hold_volume(a.volume_id):
                a = self.exports.get(attachment_id)
                if a.state not in (AttachmentState.ATTACHING, AttachmentState.ATTACHED):
                    raise FailedPrecondition(
                        f"attachment {attachment_id} is {a.state.value}; it cannot complete a migration"
                    )
                if not a.migration_source_id and a.state is AttachmentState.ATTACHED:
                    return a  # a repeat, or no migration
                if a.migration_source_id:
                    self.exports.remove(a.migration_source_id)  # gone already: nothing to do
                a = replace(
                    a,
                    state=AttachmentState.ATTACHED,
                    target_dev=target_dev or a.target_dev,
                    host_device=host_device or a.host_device,
                    migration_source_id="",
                    update_time=ctx.now(),
                )
                ctx.catalog.update_attachment(a)
                v = ctx.catalog.get_volume(a.volume_id)
                if v is not None:
                    ctx.save(replace(v, state=VolumeState.IN_USE))
                log.info("volume %s: migration to host %s complete (%s)", a.volume_id, a.connector.host, a.id)
                return a

    def rollback(self, attachment_id: str) -> None:
        ctx = self.ctx
        with ctx.stats.measure("rollback_migration"):
            validate.object_id(attachment_id, "attachment_id")
            a = ctx.catalog.get_attachment(attachment_id)
            if a is None:
                return
            with ctx.hold_volume(a.volume_id):
                a = ctx.catalog.get_attachment(attachment_id)
                if a is None:
                    return
                if not a.migration_source_id:
                    raise FailedPrecondition(
                        f"attachment {attachment_id} is no migration (completed, or an ordinary attachment); "
                        "detach it with DeleteAttachment instead"
                    )
                self.exports.remove(a.id)
                log.info(
                    "volume %s: migration to host %s rolled back (%s)", a.volume_id, a.connector.host, a.id
                )
