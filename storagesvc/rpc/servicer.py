"""The StorageService servicer: validate -> convert -> domain call -> convert (STYLE.md)."""

from __future__ import annotations

from blockwire.v1 import storage_pb2_grpc


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """Serves blockwire.v1.StorageService. RPCs not overridden here answer UNIMPLEMENTED."""
