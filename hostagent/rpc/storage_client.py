"""StorageApi over gRPC: a thin adapter over the SDK's `blockwire.client.StorageClient`, so the agent
(the SDK's most important caller) gets the SDK's deadlines, retries with backoff on UNAVAILABLE, ABORTED
and concurrency-bound refusals, TLS and error mapping, instead of a second copy of them."""

from __future__ import annotations

import grpc

from blockwire import convert
from blockwire.client import StorageClient, TlsOptions, make_channel
from blockwire.model import AccessMode, Connector
from blockwire.v1 import types_pb2
from hostagent.doctor import StorageRow
from hostagent.storage import StorageAttachment


def channel_for(address: str, tls: TlsOptions | None = None) -> grpc.Channel:
    """ "unix:///path" or "host:port" -> a channel; TLS (mutual with a client certificate) when `tls`
    is given. The agent's certificate should carry SAN URI blockwire://agent/<host>."""
    return make_channel(address, tls)


def tls_options(ca_file: str, cert_file: str, key_file: str, server_name: str) -> TlsOptions | None:
    """TlsOptions from the agent's [storage_tls] keys; None (plaintext) when no CA is configured."""
    if not ca_file:
        return None
    return TlsOptions(
        ca_file=ca_file,
        cert_file=cert_file or None,
        key_file=key_file or None,
        server_name=server_name or None,
    )


_STORAGE_CALLS = (
    "CreateAttachment",
    "CompleteAttachment",
    "DeleteAttachment",
    "ListAttachments",
    "CreateMigrationAttachment",
    "CompleteMigration",
    "RollbackMigration",
)


class GrpcStorageApi:
    """The agent's StorageApi on a channel; every call gets `timeout` seconds, retries included."""

    def __init__(self, channel: grpc.Channel, *, timeout: float = 30.0) -> None:
        self.client = StorageClient(
            channel=channel, timeout=timeout, timeouts=dict.fromkeys(_STORAGE_CALLS, timeout)
        )

    def create_attachment(
        self, volume_id: str, connector: Connector, access_mode: AccessMode, domain: str
    ) -> StorageAttachment:
        a = self.client.create_attachment(
            volume_id, connector, access_mode=convert.access_mode_to_pb(access_mode), domain=domain
        )
        return StorageAttachment(id=a.id, connection_info=convert.connection_info_from_pb(a.connection_info))

    def complete_attachment(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        self.client.complete_attachment(attachment_id, target_dev=target_dev, host_device=host_device)

    def delete_attachment(self, attachment_id: str) -> None:
        self.client.delete_attachment(attachment_id)

    def create_migration_attachment(
        self, source_attachment_id: str, connector: Connector, domain: str
    ) -> StorageAttachment:
        a = self.client.create_migration_attachment(source_attachment_id, connector, domain=domain)
        return StorageAttachment(id=a.id, connection_info=convert.connection_info_from_pb(a.connection_info))

    def complete_migration(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        self.client.complete_migration(attachment_id, target_dev=target_dev, host_device=host_device)

    def rollback_migration(self, attachment_id: str) -> None:
        self.client.rollback_migration(attachment_id)

    def host_attachments(self, host: str) -> list[StorageRow]:
        """Storage's attachments of `host` (for the doctor)."""
        return [
            StorageRow(
                id=a.id,
                volume_id=a.volume_id,
                domain=a.domain,
                state=types_pb2.AttachmentState.Name(a.state).removeprefix("ATTACHMENT_STATE_").lower(),
            )
            for a in self.client.list_attachments(host=host)
        ]
