"""FakeStorage: the agent's StorageApi in memory that records exports, as the real service would make them."""

from __future__ import annotations

from dataclasses import dataclass, field

from blockwire.errors import BlockwireError, FailedPrecondition, NotFound
from blockwire.model import AccessMode, ConnectionInfo, Connector
from hostagent.storage import StorageAttachment


@dataclass
class FakeStorage:
    infos: dict[str, ConnectionInfo] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)  # attachment id -> volume id
    completed: list[tuple[str, str, str]] = field(default_factory=list)
    fail_complete: BlockwireError | None = None
    calls: list[str] = field(default_factory=list)
    domains: dict[str, str] = field(default_factory=dict)  # attachment id -> domain

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
