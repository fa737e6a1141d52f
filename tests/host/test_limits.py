"""Host tier, real daemons: streams and long calls cannot starve them (README "Concurrency").

* blockwire-agent with [limits] max_streams = 24: 24 idle WatchEvents streams are open (more than the
  16 threads the server once had), and Health/Check and ListAttachments still answer within 2 s; a 25th
  stream is refused with RESOURCE_EXHAUSTED naming the bound; the 24 streams still get the events of a
  real attach and detach; a stream that ends gives its place back.
* blockwire-storage with [limits] max_streams = 4: 4 idle streams (Health/Watch) open, health,
  ListVolumes and GetVolume answer, a WatchVolume past the bound is refused, and admitted once one ends.
* A detach that waits for DEVICE_REMOVED (a bus='virtio' disk of a domain without a guest OS: the
  unplug never completes) does not hold the domain: an attach to the same domain finishes meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import grpc
import libvirt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blockwire.limits import LIMIT_METADATA
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from tests.fakes.daemon_rig import Rig, define_domain, force_cleanup, remove_domain
from tests.host.daemons import Started, Tgtd
from tests.rig import wait_until

AGENT_STREAMS = 24  # more than the 16 threads the agent's server once had in all
STORAGE_STREAMS = 4
QUICK = 2.0  # deadline of the calls that must not starve, seconds


@pytest.fixture
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture
def rig(tmp_path: Path, tgtd: Tgtd, virt: libvirt.virConnect) -> Iterator[Rig]:
    r = Rig(
        work=tmp_path,
        tgtd=tgtd,
        virt=virt,
        agent_config=f"[limits]\nmax_streams = {AGENT_STREAMS}\n",
        storage_config=f"[limits]\nmax_streams = {STORAGE_STREAMS}\n",
    )
    with r.running():
        yield r


@pytest.fixture
def domain(rig: Rig) -> Iterator[str]:
    name = define_domain(rig.lv(), "bw-limits")
    try:
        yield name
    finally:
        force_cleanup(rig, name)
        remove_domain(rig.lv(), name)


def health(channel: grpc.Channel) -> int:
    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=QUICK)
    return int(r.status)


def refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    return info.value


def test_idle_watch_streams_do_not_starve_the_agent(rig: Rig, domain: str) -> None:
    assert rig.agent_proc is not None
    channel = rig.agent_proc.channel
    streams = [rig.agent.WatchEvents(hpb.WatchEventsRequest(), timeout=120) for _ in range(AGENT_STREAMS)]
    with ThreadPoolExecutor(AGENT_STREAMS + 2) as pool:
        try:
            # The agent sends a stream's headers once it has subscribed it: then it holds a thread.
            admitted = [pool.submit(s.initial_metadata) for s in streams]
            wait(admitted, timeout=5)

            t0 = time.monotonic()
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
            rig.agent.ListAttachments(hpb.HostAgentServiceListAttachmentsRequest(), timeout=QUICK)
            print(
                f"\nhealth + ListAttachments with {AGENT_STREAMS} streams open: {time.monotonic() - t0:.3f}s"
            )
            assert all(f.done() for f in admitted), "not every stream was admitted"

            extra = rig.agent.WatchEvents(hpb.WatchEventsRequest(), timeout=QUICK)
            err = refusal(lambda: next(extra))
            message = err.details()
            assert f"blockwire-agent has {AGENT_STREAMS} streams open" in message
            assert f"[limits] max_streams = {AGENT_STREAMS}" in message
            assert "close idle streams" in message
            assert dict(err.trailing_metadata())[LIMIT_METADATA] == "max_streams"  # type: ignore[attr-defined]
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING

            # The admitted streams still work: each sees a real attach and detach.
            volume = rig.create_volume()
            seen: list[Future[list[int]]] = [pool.submit(_events_until, s, volume.id) for s in streams]
            rig.attach(domain, volume.id)
            rig.detach(domain, volume.id)
            for f in seen:
                types = f.result(timeout=30)
                assert hpb.EVENT_TYPE_ATTACHED in types, types
                assert hpb.EVENT_TYPE_DETACHED in types, types
            assert rig.nothing_left(domain, volume.id) == {}
            rig.delete_volume(volume.id)

            # A stream that ends gives its place back (once the agent has seen it go: within 0.25 s).
            streams[0].cancel()

            def reopened() -> bool:
                s = rig.agent.WatchEvents(hpb.WatchEventsRequest(), timeout=60)
                streams.append(s)
                return _admitted(pool, s)

            wait_until("a stream admitted in the freed place", reopened, 10)
        finally:
            for s in streams:
                s.cancel()


def _events_until(stream: Any, volume_id: str) -> list[int]:
    """The event types `stream` delivers for `volume_id` until DETACHED."""
    types: list[int] = []
    for event in stream:
        if event.volume_id != volume_id:
            continue
        types.append(event.type)
        if event.type in (hpb.EVENT_TYPE_DETACHED, hpb.EVENT_TYPE_DETACH_FAILED):
            return types
    return types


def _admitted(pool: ThreadPoolExecutor, stream: Any) -> bool:
    f = pool.submit(stream.initial_metadata)
    wait([f], timeout=1)
    return f.done() and not stream.done()


def test_idle_streams_do_not_starve_storage(rig: Rig) -> None:
    assert rig.storage_proc is not None
    channel = rig.storage_proc.channel
    volume = rig.create_volume()
    # WatchVolume ends once the volume is settled; Health/Watch streams stay open and idle, and count
    # as streams like any other server stream.
    watch = health_pb2_grpc.HealthStub(channel).Watch
    streams = [watch(health_pb2.HealthCheckRequest(), timeout=120) for _ in range(STORAGE_STREAMS)]
    try:
        for s in streams:
            assert next(s).status == health_pb2.HealthCheckResponse.SERVING  # it holds a thread now
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        rig.storage.ListVolumes(spb.ListVolumesRequest(), timeout=QUICK)
        rig.storage.GetVolume(spb.GetVolumeRequest(volume_id=volume.id), timeout=QUICK)
        extra = rig.storage.WatchVolume(spb.WatchVolumeRequest(volume_id=volume.id), timeout=QUICK)
        err = refusal(lambda: next(extra))
        assert f"blockwire-storage has {STORAGE_STREAMS} streams open" in err.details()
        assert f"[limits] max_streams = {STORAGE_STREAMS}" in err.details()
        streams.pop().cancel()
        wait_until(
            "a WatchVolume in the freed place",
            lambda: _first_volume(rig, volume.id),
            10,
        )
    finally:
        for s in streams:
            s.cancel()
    rig.delete_volume(volume.id)


def _first_volume(rig: Rig, volume_id: str) -> bool:
    try:
        first = next(rig.storage.WatchVolume(spb.WatchVolumeRequest(volume_id=volume_id), timeout=QUICK))
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    return bool(first.volume.id == volume_id)


def test_a_detach_waiting_for_device_removed_does_not_hold_the_domain(rig: Rig, domain: str) -> None:
    stuck, other = rig.create_volume(), rig.create_volume()
    rig.agent.AttachVolume(
        hpb.AttachVolumeRequest(
            domain=domain, volume_id=stuck.id, disk=pb.DiskOptions(bus=pb.DISK_BUS_VIRTIO)
        ),
        timeout=60,
    )
    with ThreadPoolExecutor(1) as pool:
        # No guest OS answers the PCI unplug: libvirt gives up waiting after 5 s, the agent waits on
        # for DEVICE_REMOVED until its detach_timeout (10 s) and then says so.
        t0 = time.monotonic()
        detach = pool.submit(rig.detach, domain, stuck.id, 60)
        wait_until("the detach under way", lambda: _detaching(rig, stuck.id), 10)
        rig.attach(domain, other.id)  # the same domain
        attached_s = time.monotonic() - t0
        assert not detach.done(), f"the detach ended before the attach ({attached_s:.1f}s)"
        with pytest.raises(grpc.RpcError) as info:
            detach.result(timeout=60)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
        print(f"\nattach beside a pending detach: done {attached_s:.1f}s after the detach began")
    targets = sorted(d.find("target").get("dev") for d in rig.live_disks(domain))  # type: ignore[union-attr]
    assert targets == ["sda", "vda"]  # the stuck disk is still there, the new one beside it


def _detaching(rig: Rig, volume_id: str) -> bool:
    a = rig.agent.GetAttachment(hpb.HostAgentServiceGetAttachmentRequest(volume_id=volume_id), timeout=10)
    return bool(a.attachment.state == pb.ATTACHMENT_STATE_DETACHING)
