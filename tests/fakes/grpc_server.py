"""An in-process gRPC server on 127.0.0.1 (or a unix socket) serving given servicers and gRPC health."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from blockwire.v1 import hostagent_pb2_grpc, storage_pb2_grpc

STORAGE_SERVICE = "blockwire.v1.StorageService"
AGENT_SERVICE = "blockwire.v1.HostAgentService"


@dataclass
class Running:
    address: str
    server: grpc.Server
    health: health.HealthServicer

    def set_serving(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set(service, status)


@contextmanager
def serve(
    servicer: object,
    *,
    address: str = "127.0.0.1:0",
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> Iterator[Running]:
    """Serves `servicer` (a storage or an agent servicer) until the block ends.

    `address` may be ``unix:///path``. The health service reports the servicer's service SERVING.
    `interceptors` run in front of it (tests.fakes.faults.Faults: refusals and holds by method).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=interceptors)
    if isinstance(servicer, storage_pb2_grpc.StorageServiceServicer):
        storage_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)
        name = STORAGE_SERVICE
    elif isinstance(servicer, hostagent_pb2_grpc.HostAgentServiceServicer):
        hostagent_pb2_grpc.add_HostAgentServiceServicer_to_server(servicer, server)
        name = AGENT_SERVICE
    else:
        raise TypeError(f"not a blockwire servicer: {servicer!r}")
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    server.start()
    shown = address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}"
    try:
        yield Running(shown, server, health_servicer)
    finally:
        server.stop(grace=None)
