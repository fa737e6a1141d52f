"""Contract tier: real in-process gRPC servers driven through the generated stubs."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from blockwire.v1 import hostagent_pb2_grpc, storage_pb2_grpc
from hostagent.rpc.servicer import HostAgentServicer
from tests.fakes.agent import fake_agent
from tests.fakes.storage_rig import StorageRig


def _serve(add: object, servicer: object) -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    add(servicer, server)  # type: ignore[operator]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(grace=None)


@pytest.fixture
def storage_stub(tmp_path: Path) -> Iterator[storage_pb2_grpc.StorageServiceStub]:
    rig = StorageRig.make(tmp_path)  # file backend in tmp_path, in-memory exporter
    try:
        for channel in _serve(storage_pb2_grpc.add_StorageServiceServicer_to_server, rig.servicer):
            yield storage_pb2_grpc.StorageServiceStub(channel)
    finally:
        rig.close()


@pytest.fixture
def agent_stub(tmp_path: Path) -> Iterator[hostagent_pb2_grpc.HostAgentServiceStub]:
    servicer = HostAgentServicer(fake_agent(tmp_path))
    for channel in _serve(hostagent_pb2_grpc.add_HostAgentServiceServicer_to_server, servicer):
        yield hostagent_pb2_grpc.HostAgentServiceStub(channel)
