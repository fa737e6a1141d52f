"""StorageApi over gRPC: the agent's client of StorageService (generated stub; blockwire.convert)."""

from __future__ import annotations

import grpc

from blockwire import convert
from blockwire.client import TlsOptions, make_channel
from blockwire.model import AccessMode, Connector
from blockwire.status import error_from_rpc
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from hostagent.storage import StorageAttachment, VolumeInfo


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


class GrpcStorageApi:
    def __init__(self, channel: grpc.Channel, *, timeout: float = 30.0) -> None:
        self.stub = storage_pb2_grpc.StorageServiceStub(channel)
        self.timeout = timeout

    def create_attachment(
        self, volume_id: str, connector: Connector, access_mode: AccessMode, domain: str
    ) -> StorageAttachment:
        req = spb.CreateAttachmentRequest(
            volume_id=volume_id,
            connector=convert.connector_to_pb(connector),
            access_mode=convert.access_mode_to_pb(access_mode),
            domain=domain,
        )
        try:
            resp = self.stub.CreateAttachment(req, timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        a = resp.attachment
        return StorageAttachment(id=a.id, connection_info=convert.connection_info_from_pb(a.connection_info))

    def complete_attachment(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        req = spb.CompleteAttachmentRequest(
            attachment_id=attachment_id, target_dev=target_dev, host_device=host_device
        )
        try:
            self.stub.CompleteAttachment(req, timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def delete_attachment(self, attachment_id: str) -> None:
        try:
            self.stub.DeleteAttachment(
                spb.DeleteAttachmentRequest(attachment_id=attachment_id), timeout=self.timeout
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def get_volume(self, volume_id: str) -> VolumeInfo:
        try:
            v = self.stub.GetVolume(spb.GetVolumeRequest(volume_id=volume_id), timeout=self.timeout).volume
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return VolumeInfo(
            id=v.id, size_bytes=v.size_bytes, wwn=v.wwn, serial=v.serial, multiattach=v.multiattach
        )
