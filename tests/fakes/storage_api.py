"""FakeStorage: the agent's StorageApi in memory that records exports, as the real service would make them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from blockwire.errors import BlockwireError, FailedPrecondition, NotFound
from blockwire.model import AccessMode, ConnectionInfo, Connector, IscsiConnection, NvmeofConnection
from hostagent.storage import StorageAttachment


@dataclass
class FakeStorage:
    infos: dict[str, ConnectionInfo] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)  # attachment id -> volume id
    completed: list[tuple[str, str, str]] = field(default_factory=list)
    fail_complete: BlockwireError | None = None
    calls: list[str] = field(default_factory=list)
    domains: dict[str, str] = field(default_factory=dict)  # attachment id -> domain
    migrations: dict[str, str] = field(default_factory=dict)  # destination attachment id -> source's
    fail_migration: BlockwireError | None = None  # CreateMigrationAttachment fails with it

    def create_attachment(
        self, volume_id: str, connector: Connector, access_mode: AccessMode, domain: str
    ) -> StorageAttachment:
        """As the real service: one attachment per (volume, domain) of this host; a second domain only
        for a multiattach volume."""
        self.calls.append(f"create {volume_id}")
        if volume_id not in self.infos:
            raise NotFound(f"volume {volume_id} does not exist")
        info = self.infos[volume_id]
        mine = [k for k, v in self.exports.items() if v == volume_id]
        att_id = next((k for k in mine if self.domains.get(k) == domain), "")
        if not att_id:
            if mine and not info.multiattach:
                raise FailedPrecondition(
                    f"volume {volume_id} is attached to domain {self.domains[mine[0]]!r} on host "
                    f"{connector.host} and was not created multiattach; detach it there first"
                )
            att_id = f"att-{len(self.calls)}"
        self.exports[att_id] = volume_id
        self.domains[att_id] = domain
        return StorageAttachment(att_id, ConnectionInfo(**{**info.__dict__, "attachment_id": att_id}))

    def complete_attachment(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        self.calls.append(f"complete {attachment_id}")
        if self.fail_complete is not None:
            raise self.fail_complete
        self.completed.append((attachment_id, target_dev, host_device))

    def delete_attachment(self, attachment_id: str) -> None:
        self.calls.append(f"delete {attachment_id}")
        self.exports.pop(attachment_id, None)
        self.domains.pop(attachment_id, None)

    def create_migration_attachment(
        self, source_attachment_id: str, connector: Connector, domain: str
    ) -> StorageAttachment:
        """As the real service: the destination attachment shares the source's export; one pair a volume."""
        self.calls.append(f"migrate {source_attachment_id}")
        if self.fail_migration is not None:
            raise self.fail_migration
        if source_attachment_id not in self.exports:
            raise NotFound(f"source attachment {source_attachment_id} does not exist")
        volume_id = self.exports[source_attachment_id]
        info = self.infos[volume_id]
        if isinstance(info.transport, IscsiConnection):  # as the real one: the destination's initiator
            info = replace(info, transport=replace(info.transport, initiator_iqn=connector.initiator_iqn))
        if isinstance(info.transport, NvmeofConnection):  # ... or the destination's host NQN
            info = replace(info, transport=replace(info.transport, host_nqn=connector.nvme_host_nqn))
        for dest, source in self.migrations.items():
            if source == source_attachment_id and self.domains.get(dest) == domain:
                return StorageAttachment(dest, replace(info, attachment_id=dest))
            if self.exports.get(dest) == volume_id:
                raise FailedPrecondition(f"volume {volume_id} is already being migrated ({dest})")
        dest = f"att-{len(self.calls)}"
        self.exports[dest] = volume_id
        self.domains[dest] = domain
        self.migrations[dest] = source_attachment_id
        return StorageAttachment(dest, replace(info, attachment_id=dest))

    def complete_migration(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        self.calls.append(f"complete-migration {attachment_id}")
        source = self.migrations.pop(attachment_id, "")
        if source:
            self.exports.pop(source, None)
            self.domains.pop(source, None)
        self.completed.append((attachment_id, target_dev, host_device))

    def rollback_migration(self, attachment_id: str) -> None:
        self.calls.append(f"rollback {attachment_id}")
        if attachment_id in self.exports and attachment_id not in self.migrations:
            raise FailedPrecondition(f"attachment {attachment_id} is no migration")
        self.migrations.pop(attachment_id, None)
        self.exports.pop(attachment_id, None)
        self.domains.pop(attachment_id, None)
