"""The destination agent as the source agent's `MigrateDomain` sees it (hostagent.migration.PeerAgent),
over gRPC with this agent's own TLS identity (its [storage_tls] client certificate, which carries
blockwire://agent/<host>); a unix socket address for two agents on one machine."""

from __future__ import annotations

import grpc

from blockwire.client import TlsOptions, make_channel
from blockwire.errors import BlockwireError
from blockwire.status import error_from_rpc
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc
from hostagent.migration import MigrationVolume, PreparedDisk, PreparedMigration

PREPARE_TIMEOUT = 300.0  # seconds: a login per volume
CALL_TIMEOUT = 120.0


class GrpcPeerAgent:
    def __init__(self, address: str, tls: TlsOptions | None = None) -> None:
        self.address = address
        self.channel = make_channel(address, tls)
        self.stub = hostagent_pb2_grpc.HostAgentServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _error(self, err: grpc.RpcError) -> BlockwireError:
        e = error_from_rpc(err)
        e.message = f"destination agent {self.address}: {e.message}"
        return e

    def prepare_migration(
        self, domain: str, domain_xml: str, volumes: list[MigrationVolume]
    ) -> PreparedMigration:
        request = hpb.PrepareMigrationRequest(
            domain=domain,
            domain_xml=domain_xml,
            volumes=[
                hpb.MigrationVolume(
                    volume_id=v.volume_id,
                    source_attachment_id=v.source_attachment_id,
                    target_dev=v.target_dev,
                )
                for v in volumes
            ],
        )
        try:
            r = self.stub.PrepareMigration(request, timeout=PREPARE_TIMEOUT)
        except grpc.RpcError as err:
            raise self._error(err) from None
        return PreparedMigration(
            r.destination_domain_xml,
            tuple(PreparedDisk(d.volume_id, d.attachment_id, d.target_dev, d.disk_xml) for d in r.disks),
        )

    def finish_incoming_migration(self, domain: str) -> object:
        try:
            return self.stub.FinishIncomingMigration(
                hpb.FinishIncomingMigrationRequest(domain=domain), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as err:
            raise self._error(err) from None

    def abort_migration(self, domain: str) -> object:
        try:
            return self.stub.AbortMigration(hpb.AbortMigrationRequest(domain=domain), timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            raise self._error(err) from None
