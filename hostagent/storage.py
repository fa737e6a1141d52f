"""What the agent needs from the storage service, as a Protocol. rpc/storage_client.py is the gRPC one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from blockwire.model import AccessMode, ConnectionInfo, Connector


@dataclass(frozen=True)
class StorageAttachment:
    id: str
    connection_info: ConnectionInfo


class StorageApi(Protocol):
    def create_attachment(
        self, volume_id: str, connector: Connector, access_mode: AccessMode, domain: str
    ) -> StorageAttachment:
        """Exports the volume to this host for `domain`; idempotent per (volume, host, domain)."""
        ...

    def complete_attachment(self, attachment_id: str, target_dev: str, host_device: str) -> None: ...

    def delete_attachment(self, attachment_id: str) -> None:
        """Removes the export; an unknown id is OK."""
        ...

    # live migration (hostagent.migration)
    def create_migration_attachment(
        self, source_attachment_id: str, connector: Connector, domain: str
    ) -> StorageAttachment:
        """This host's attachment as the destination of a live migration, beside the source's live one;
        idempotent per (source attachment, host, domain)."""
        ...

    def complete_migration(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        """The destination attachment becomes ATTACHED and ordinary; the source's goes. A repeat is OK."""
        ...

    def rollback_migration(self, attachment_id: str) -> None:
        """Removes the destination attachment of a migration; an unknown id is OK."""
        ...
