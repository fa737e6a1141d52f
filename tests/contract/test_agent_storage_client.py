"""The agent's StorageApi is the SDK's StorageClient behind a thin adapter: it retries what the SDK
retries (UNAVAILABLE, ABORTED, a refusal by a concurrency bound) and maps errors the same way."""

from __future__ import annotations

import grpc
import pytest

from blockwire.errors import ResourceExhausted, Unimplemented
from blockwire.limits import LIMIT_METADATA
from blockwire.model import AccessMode, Connector, Transport
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from hostagent.rpc.storage_client import GrpcStorageApi, channel_for
from tests.fakes.grpc_server import serve

CONNECTOR = Connector(host="h", initiator_iqn="iqn.2026-01.io.example:h", transports=(Transport.ISCSI,))


class Flaky(storage_pb2_grpc.StorageServiceServicer):
    """Answers DeleteAttachment after refusing it with each of `refusals` in turn."""

    def __init__(self, refusals: list[tuple[grpc.StatusCode, str, str]]) -> None:
        self.refusals = list(refusals)
        self.calls = 0

    def DeleteAttachment(
        self, request: spb.DeleteAttachmentRequest, context: grpc.ServicerContext
    ) -> spb.DeleteAttachmentResponse:
        self.calls += 1
        if self.refusals:
            code, details, bound = self.refusals.pop(0)
            if bound:
                context.set_trailing_metadata(((LIMIT_METADATA, bound),))
            context.abort(code, details)
        return spb.DeleteAttachmentResponse()


@pytest.mark.parametrize(
    "refusal",
    [
        (grpc.StatusCode.UNAVAILABLE, "restarting", ""),
        (grpc.StatusCode.ABORTED, "another call on volume v is in flight", ""),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "64 long calls are in flight", "max_long_calls"),
    ],
    ids=["unavailable", "aborted", "concurrency-bound"],
)
def test_transient_refusals_are_retried(refusal: tuple[grpc.StatusCode, str, str]) -> None:
    servicer = Flaky([refusal, refusal])
    with serve(servicer) as running:
        channel = channel_for(running.address)
        try:
            GrpcStorageApi(channel, timeout=10).delete_attachment("att-1")
        finally:
            channel.close()
    assert servicer.calls == 3


def test_a_full_disk_and_other_answers_are_not_retried() -> None:
    servicer = Flaky([(grpc.StatusCode.RESOURCE_EXHAUSTED, "no space left on backend file", "")])
    with serve(servicer) as running:
        channel = channel_for(running.address)
        try:
            api = GrpcStorageApi(channel, timeout=10)
            with pytest.raises(ResourceExhausted, match="no space"):
                api.delete_attachment("att-1")
            assert servicer.calls == 1
            with pytest.raises(Unimplemented):  # the base servicer's answer: mapped, not retried
                api.create_attachment("v", CONNECTOR, AccessMode.READ_WRITE, "vm1")
        finally:
            channel.close()
