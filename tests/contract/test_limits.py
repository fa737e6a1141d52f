"""Concurrency bounds of `blockwire.server.serving` (README "Concurrency"): a real server built by
`serving.start` with the agent's long methods, serving the REAL HostAgentServicer (a HostAgent on fakes at
its seams, using a real StorageService: tests.fakes.services) over a unix socket. Calls are held in
flight by a Faults interceptor behind the bounds (a real agent cannot be made to hang on cue).

Streams, long calls and quick calls each have their own bound; past it a call is refused at once with
RESOURCE_EXHAUSTED naming the bound, and what runs within the other bounds, and health, still answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blockwire import cli
from blockwire.client import HostAgentClient, RetryPolicy, StorageClient
from blockwire.errors import ConcurrencyLimit
from blockwire.limits import LIMIT_METADATA, Limits
from blockwire.server import serving
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc
from hostagent.rpc.server import LONG_METHODS, SERVICE
from hostagent.rpc.servicer import HostAgentServicer
from tests.fakes.faults import Faults
from tests.fakes.services import Services, services
from tests.rig import wait_until

QUICK_DEADLINE = 2.0


@dataclass
class Server:
    fake: Faults  # holds calls in flight, behind the bounds
    services: Services
    v1: str  # two volumes in storage
    v2: str
    running: serving.Serving
    address: str
    channel: grpc.Channel

    @property
    def stub(self) -> hostagent_pb2_grpc.HostAgentServiceStub:
        return hostagent_pb2_grpc.HostAgentServiceStub(self.channel)

    @property
    def gates(self) -> serving.LimitsInterceptor:
        return self.running.gates

    def health(self) -> int:
        r = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=QUICK_DEADLINE
        )
        return int(r.status)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    fake = Faults()
    with services(tmp_path) as env, StorageClient(env.storage_server.address) as storage:
        v1, v2 = (storage.create_volume(name, 1024**3).id for name in ("v1", "v2"))
        servicer = HostAgentServicer(env.agent)
        running = serving.start(
            services=(SERVICE,),
            register=lambda s: hostagent_pb2_grpc.add_HostAgentServiceServicer_to_server(servicer, s),
            listeners=serving.Listeners(unix_socket=str(tmp_path / "agent.sock")),
            limits=Limits(max_streams=3, max_long_calls=1, max_quick_calls=1),
            long_methods=LONG_METHODS,
            daemon="blockwire-agent",
            interceptors=[fake],
        )
        channel = grpc.insecure_channel(running.addresses[0])
        try:
            yield Server(fake, env, v1, v2, running, running.addresses[0], channel)
        finally:
            fake.release.set()
            channel.close()
            running.stop(0)


def _refusal(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    return err


def test_streams_past_their_bound_are_refused_while_health_and_calls_answer(server: Server) -> None:
    streams = [server.stub.WatchEvents(hpb.WatchEventsRequest(), timeout=30) for _ in range(3)]
    wait_until("3 streams admitted", lambda: server.gates.streams.running == 3, 10)
    assert server.services.events.wait_subscribed(3)  # from here each stream gets every event

    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    server.stub.ListAttachments(hpb.HostAgentServiceListAttachmentsRequest(), timeout=QUICK_DEADLINE)
    one_more = server.stub.WatchEvents(hpb.WatchEventsRequest(), timeout=30)
    err = _refusal(lambda: next(one_more))
    message = err.details()
    assert "WatchEvents refused" in message
    assert "blockwire-agent has 3 streams open" in message
    assert "[limits] max_streams = 3" in message
    assert "close idle streams" in message
    assert "not a lack of space" in message
    assert dict(err.trailing_metadata())[LIMIT_METADATA] == "max_streams"  # type: ignore[attr-defined]

    with HostAgentClient(channel=server.channel, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(ConcurrencyLimit) as typed:
            next(iter(client.watch_events()))
        assert typed.value.bound == "max_streams"
        assert typed.value.code == "RESOURCE_EXHAUSTED"

    # the admitted streams still work: an event reaches them
    server.stub.AttachVolume(hpb.AttachVolumeRequest(domain="vm1", volume_id=server.v1), timeout=10)
    for s in streams:
        assert next(s).volume_id == server.v1
    # a stream that ends gives its place back
    streams[0].cancel()
    wait_until("a stream's place given back", lambda: server.gates.streams.running == 2, 10)
    again = server.stub.WatchEvents(hpb.WatchEventsRequest(), timeout=30)
    wait_until("the new stream admitted", lambda: server.gates.streams.running == 3, 10)
    for s in (*streams[1:], again):
        s.cancel()
    wait_until("every stream's place given back", lambda: server.gates.streams.running == 0, 10)


def test_long_calls_past_their_bound_are_refused_and_quick_calls_run(server: Server) -> None:
    server.fake.hold.add("AttachVolume")
    pending = server.stub.AttachVolume.future(
        hpb.AttachVolumeRequest(domain="vm1", volume_id=server.v1), timeout=30
    )
    wait_until("the attach admitted", lambda: server.gates.long.running == 1, 10)

    err = _refusal(
        lambda: server.stub.DetachVolume(
            hpb.DetachVolumeRequest(domain="vm1", volume_id=server.v2), timeout=QUICK_DEADLINE
        )
    )
    assert "DetachVolume refused" in err.details()
    assert "[limits] max_long_calls = 1" in err.details()
    assert "retry when some have finished" in err.details()
    server.stub.GetConnector(hpb.GetConnectorRequest(), timeout=QUICK_DEADLINE)  # quick: its own bound
    assert server.health() == health_pb2.HealthCheckResponse.SERVING

    server.fake.release.set()
    assert pending.result(timeout=10).attachment.volume_id == server.v1
    wait_until("the long call's place given back", lambda: server.gates.long.running == 0, 10)
    server.stub.DetachVolume(hpb.DetachVolumeRequest(domain="vm1", volume_id=server.v1), timeout=10)


def test_health_answers_with_every_class_at_its_bound(server: Server) -> None:
    server.fake.hold.update({"AttachVolume", "GetConnector"})
    streams = [server.stub.WatchEvents(hpb.WatchEventsRequest(), timeout=30) for _ in range(3)]
    attach = server.stub.AttachVolume.future(
        hpb.AttachVolumeRequest(domain="vm1", volume_id=server.v1), timeout=30
    )
    quick = server.stub.GetConnector.future(hpb.GetConnectorRequest(), timeout=30)
    gates = server.gates
    wait_until(
        "every class at its bound",
        lambda: (gates.streams.running, gates.long.running, gates.quick.running) == (3, 1, 1),
        10,
    )
    for _ in range(20):
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
    err = _refusal(
        lambda: server.stub.ListAttachments(
            hpb.HostAgentServiceListAttachmentsRequest(), timeout=QUICK_DEADLINE
        )
    )
    assert "[limits] max_quick_calls = 1" in err.details()
    server.fake.release.set()
    attach.result(timeout=10)
    quick.result(timeout=10)
    for s in streams:
        s.cancel()


def test_the_cli_says_busy_not_out_of_space(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.fake.hold.add("AttachVolume")
    pending = server.stub.AttachVolume.future(
        hpb.AttachVolumeRequest(domain="vm1", volume_id=server.v1), timeout=30
    )
    wait_until("the attach admitted", lambda: server.gates.long.running == 1, 10)
    code = cli.main(["--agent", server.address, "--no-progress", "attach", "vm1", server.v2])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BUSY == 9
    assert "[limits] max_long_calls = 1" in err
    assert "not a lack of space" in err
    assert "free space" not in err
    server.fake.release.set()
    pending.result(timeout=10)
