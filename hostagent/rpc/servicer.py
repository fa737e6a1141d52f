"""The HostAgentService servicer: validate -> convert -> domain call -> convert (STYLE.md)."""

from __future__ import annotations

from blockwire.v1 import hostagent_pb2_grpc


class HostAgentServicer(hostagent_pb2_grpc.HostAgentServiceServicer):
    """Serves blockwire.v1.HostAgentService. RPCs not overridden here answer UNIMPLEMENTED."""
