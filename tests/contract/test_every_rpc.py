"""Every RPC of both services, called once through the generated stubs with an empty request.

An empty request is the simplest hostile input: it must get the defined status below, never INTERNAL
or UNKNOWN. UNIMPLEMENTED is accepted only for RPCs listed in PENDING (implemented by later work); a
PENDING entry that answers something else fails, so the list cannot go stale.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from blockwire.v1 import hostagent_pb2, storage_pb2

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Server streams that stay open until cancelled end with our own deadline.
OPEN_STREAM = grpc.StatusCode.DEADLINE_EXCEEDED

STORAGE_EXPECTED = {
    "CreateVolume": INVALID,
    "GetVolume": INVALID,
    "ListVolumes": OK,
    "WatchVolume": INVALID,
    "DeleteVolume": INVALID,
    "ExtendVolume": INVALID,
    "CreateSnapshot": INVALID,
    "GetSnapshot": INVALID,
    "ListSnapshots": OK,
    "DeleteSnapshot": INVALID,
    "CreateAttachment": INVALID,
    "CompleteAttachment": INVALID,
    "DeleteAttachment": INVALID,
    "GetAttachment": INVALID,
    "ListAttachments": OK,
    "GetCapacity": OK,
    "GetBackendStats": OK,
    "ListStorageNodes": OK,
    "CreateMigrationAttachment": INVALID,
    "CompleteMigration": INVALID,
    "RollbackMigration": INVALID,
    "CreateVolumeType": INVALID,
    "GetVolumeType": INVALID,
    "ListVolumeTypes": OK,
    "UpdateVolumeType": INVALID,
    "DeleteVolumeType": INVALID,
    "SetVolumeTypeQosSpecs": INVALID,
    "CreateQosSpecs": INVALID,
    "GetQosSpecs": INVALID,
    "ListQosSpecs": OK,
    "UpdateQosSpecs": INVALID,
    "DeleteQosSpecs": INVALID,
}
AGENT_EXPECTED = {
    "GetConnector": OK,
    "AttachVolume": INVALID,
    "DetachVolume": INVALID,
    "ExtendVolume": INVALID,
    "GetAttachment": INVALID,
    "ListAttachments": OK,
    "ConnectVolume": INVALID,
    "DisconnectVolume": INVALID,
    "WatchEvents": OPEN_STREAM,
    "PrepareMigration": INVALID,
    "FinishIncomingMigration": INVALID,
    "FinishOutgoingMigration": INVALID,
    "AbortMigration": INVALID,
    "MigrateDomain": INVALID,
    "AuditHost": OK,
}
PENDING: set[str] = set()


def _call(stub: Any, method: Any) -> grpc.StatusCode:
    request_class = method.input_type._concrete_class
    rpc = getattr(stub, method.name)
    try:
        if method.server_streaming:
            for _ in rpc(request_class(), timeout=0.5):
                pass
        else:
            rpc(request_class(), timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return OK


def test_tables_cover_every_rpc() -> None:
    storage = storage_pb2.DESCRIPTOR.services_by_name["StorageService"]
    agent = hostagent_pb2.DESCRIPTOR.services_by_name["HostAgentService"]
    assert set(STORAGE_EXPECTED) == {m.name for m in storage.methods}
    assert set(AGENT_EXPECTED) == {m.name for m in agent.methods}


def _check(service: str, name: str, code: grpc.StatusCode, expected: grpc.StatusCode) -> None:
    key = f"{service}.{name}"
    if key in PENDING:
        assert code is grpc.StatusCode.UNIMPLEMENTED, f"{key} answers {code.name}: remove it from PENDING"
    else:
        assert code is expected, f"{key}: expected {expected.name}, got {code.name}"


@pytest.mark.parametrize("name", sorted(STORAGE_EXPECTED))
def test_storage_rpc(storage_stub: Any, name: str) -> None:
    method = storage_pb2.DESCRIPTOR.services_by_name["StorageService"].methods_by_name[name]
    _check("StorageService", name, _call(storage_stub, method), STORAGE_EXPECTED[name])


@pytest.mark.parametrize("name", sorted(AGENT_EXPECTED))
def test_agent_rpc(agent_stub: Any, name: str) -> None:
    method = hostagent_pb2.DESCRIPTOR.services_by_name["HostAgentService"].methods_by_name[name]
    _check("HostAgentService", name, _call(agent_stub, method), AGENT_EXPECTED[name])
