"""The SDK (`blockwire.client`) over in-process gRPC servers running the REAL services: a StorageService
on a file backend and a HostAgent on fakes at its seams, using that storage (tests.fakes.services).

Faults a real service cannot be driven into (UNAVAILABLE, ABORTED, a code the SDK must map, a hang) come
from a Faults interceptor in front of the real servicer."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockwire import errors, model
from blockwire.client import (
    NO_RETRY,
    HostAgentClient,
    RetryPolicy,
    StorageClient,
    TlsOptions,
    normalize_target,
)
from blockwire.v1 import hostagent_pb2, types_pb2
from tests.fakes.clock import FakeClock
from tests.fakes.faults import Faults
from tests.fakes.grpc_server import STORAGE_SERVICE, Running, serve
from tests.fakes.images import image_file
from tests.fakes.services import HOST_IQN, Services, services
from tests.fakes.storage_rig import StorageRig

GIB = 1024**3
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "backend restarting")


STEPS = ("export", "connect", "hotplug")  # the PROGRESS steps of a real attach, in order


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Services]:
    with services(tmp_path) as running:
        yield running


@pytest.fixture
def server(env: Services) -> Running:
    return env.storage_server


@pytest.fixture
def fake(env: Services) -> Faults:
    """Refusals and holds in front of the real StorageServicer."""
    return env.storage_faults


@contextmanager
def storage_only(root: Path, **kwargs: Any) -> Iterator[Running]:
    """Just the real StorageService, served with `kwargs` (address, credentials)."""
    rig = StorageRig.make(root)
    try:
        with serve(rig.servicer, **kwargs) as running:
            yield running
    finally:
        rig.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def storage(server: Running, clock: FakeClock) -> Iterator[StorageClient]:
    with StorageClient(server.address, clock=clock, rand=lambda: 0.0) as client:
        yield client


# Targets and policies


def test_normalize_target() -> None:
    assert normalize_target("/run/blockwire/storage.sock") == "unix:///run/blockwire/storage.sock"
    assert normalize_target("unix:///run/x.sock") == "unix:///run/x.sock"
    assert normalize_target("10.0.0.5:7400") == "10.0.0.5:7400"
    with pytest.raises(errors.InvalidArgument):
        normalize_target("  ")


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.2, multiplier=2.0, max_backoff=1.0, jitter=0.5)
    assert policy.backoff(1, lambda: 0.0) == pytest.approx(0.2)
    assert policy.backoff(2, lambda: 0.0) == pytest.approx(0.4)
    assert policy.backoff(3, lambda: 1.0) == pytest.approx(0.4)  # 0.8 with full jitter taken off half
    assert policy.backoff(10, lambda: 0.0) == pytest.approx(1.0)
    with pytest.raises(errors.InvalidArgument):
        RetryPolicy(max_attempts=0)
    with pytest.raises(errors.InvalidArgument):
        RetryPolicy(jitter=1.5)


def test_client_needs_a_target_or_a_channel() -> None:
    with pytest.raises(errors.InvalidArgument):
        StorageClient()


def test_per_call_timeouts(storage: StorageClient) -> None:
    assert storage.timeout_for("GetVolume") == 30.0
    assert storage.timeout_for("CreateVolume") == 120.0
    assert storage.timeout_for("GetVolume", 2.0) == 2.0
    agent = HostAgentClient("127.0.0.1:1", timeout=5.0, timeouts={"AttachVolume": 60.0})
    with agent:
        assert agent.timeout_for("AttachVolume") == 60.0
        assert agent.timeout_for("DetachVolume") == 300.0
        assert agent.timeout_for("GetConnector") == 5.0


# Calls, results and errors


def test_volume_calls_return_typed_messages(storage: StorageClient) -> None:
    vol = storage.create_volume("data1", 10 * GIB, labels={"app": "db"})
    assert isinstance(vol, types_pb2.Volume)
    assert (vol.name, vol.size_bytes, vol.labels["app"]) == ("data1", 10 * GIB, "db")
    assert storage.create_volume("data1", 10 * GIB, labels={"app": "db"}).id == vol.id  # a repeat: the same
    with pytest.raises(errors.AlreadyExists, match="other parameters"):
        storage.create_volume("data1", 10 * GIB)  # the labels are parameters too
    assert storage.get_volume(vol.id) == vol
    assert storage.extend_volume(vol.id, 20 * GIB).size_bytes == 20 * GIB
    storage.delete_volume(vol.id)
    storage.delete_volume(vol.id)  # a repeat is OK
    with pytest.raises(errors.NotFound, match=vol.id):
        storage.get_volume(vol.id)


def test_listing_follows_pages(storage: StorageClient, fake: Faults) -> None:
    names = [f"v{i}" for i in range(7)]
    for name in names:
        storage.create_volume(name, GIB, labels={"even": str(int(name[1:]) % 2 == 0)})
    assert sorted(v.name for v in storage.list_volumes(page_size=2)) == names
    assert fake.count("ListVolumes") == 4  # pages of 2
    even = storage.list_volumes(label_selector={"even": "True"}, page_size=2)
    assert sorted(v.name for v in even) == ["v0", "v2", "v4", "v6"]
    assert sorted(v.name for v in storage.list_volumes(page_size=100)) == names
    assert fake.count("ListVolumes") == 4 + 2 + 1


def test_errors_are_typed(storage: StorageClient) -> None:
    vol = storage.create_volume("data1", GIB)
    with pytest.raises(errors.AlreadyExists):
        storage.create_volume("data1", 2 * GIB)
    with pytest.raises(errors.FailedPrecondition, match="only grow"):
        storage.extend_volume(vol.id, GIB // 2 // (1024 * 1024) * (1024 * 1024))
    with pytest.raises(errors.InvalidArgument) as info:
        storage.create_volume("", GIB)
    assert info.value.field == "name"
    with pytest.raises(errors.InvalidArgument):
        storage.create_volume("x", GIB, source_volume_id="a", source_image="/b")
    with pytest.raises(errors.NotFound, match="att-1"):
        storage.get_attachment("att-1")


def test_snapshots(storage: StorageClient) -> None:
    vol = storage.create_volume("data1", GIB)
    snap = storage.create_snapshot(vol.id, "s1", labels={"k": "v"})
    assert storage.create_snapshot(vol.id, "s1", labels={"k": "v"}).id == snap.id  # a repeat: the same
    with pytest.raises(errors.AlreadyExists, match="other labels"):
        storage.create_snapshot(vol.id, "s1")
    assert storage.get_snapshot(snap.id) == snap
    assert storage.list_snapshots(volume_id=vol.id) == [snap]
    copy = storage.create_volume("copy", 0, source_snapshot_id=snap.id)
    assert copy.source_snapshot_id == snap.id
    # the copy runs in the background; its snapshot cannot be deleted until the copy has settled
    assert storage.wait_volume(copy.id).state == types_pb2.VOLUME_STATE_AVAILABLE
    storage.delete_snapshot(snap.id)
    assert storage.list_snapshots() == []
    with pytest.raises(errors.NotFound):
        storage.create_volume("copy2", 0, source_snapshot_id=snap.id)


# Retries and deadlines


def test_unavailable_twice_then_ok(storage: StorageClient, fake: Faults, clock: FakeClock) -> None:
    fake.refuse["ListVolumes"] = [UNAVAILABLE, UNAVAILABLE]
    assert storage.list_volumes() == []
    assert fake.count("ListVolumes") == 3
    assert clock.sleeps == [pytest.approx(0.2), pytest.approx(0.4)]


def test_aborted_is_retried(storage: StorageClient, fake: Faults) -> None:
    fake.refuse["CreateVolume"] = [(grpc.StatusCode.ABORTED, "volume busy")]
    assert storage.create_volume("data1", GIB).name == "data1"
    assert fake.count("CreateVolume") == 2


def test_retries_are_bounded(storage: StorageClient, fake: Faults, clock: FakeClock) -> None:
    fake.refuse["GetVolume"] = [UNAVAILABLE] * 10
    with pytest.raises(errors.Unavailable, match="backend restarting"):
        storage.get_volume("vol-1")
    assert fake.count("GetVolume") == 5
    assert len(clock.sleeps) == 4


def test_other_codes_are_not_retried(storage: StorageClient, fake: Faults, clock: FakeClock) -> None:
    fake.refuse["GetVolume"] = [(grpc.StatusCode.INTERNAL, "bug"), (grpc.StatusCode.INTERNAL, "bug")]
    with pytest.raises(errors.Internal):
        storage.get_volume("vol-1")
    assert fake.count("GetVolume") == 1
    assert clock.sleeps == []


def test_no_retry_policy(server: Running, fake: Faults) -> None:
    fake.refuse["ListVolumes"] = [UNAVAILABLE]
    with StorageClient(server.address, retry=NO_RETRY) as client, pytest.raises(errors.Unavailable):
        client.list_volumes()
    assert fake.count("ListVolumes") == 1


def test_retries_stop_at_the_deadline(server: Running, fake: Faults, clock: FakeClock) -> None:
    fake.refuse["ListVolumes"] = [UNAVAILABLE] * 10
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.4, multiplier=2.0, jitter=0.0)
    client = StorageClient(server.address, retry=policy, clock=clock, timeout=1.0)
    with client, pytest.raises(errors.Unavailable):
        client.list_volumes()
    assert clock.sleeps == [pytest.approx(0.4)]  # the next wait (0.8 s) would pass the 1 s deadline
    assert fake.count("ListVolumes") == 2


def test_a_retry_of_an_unavailable_daemon_that_runs_out_of_time_is_unavailable(
    server: Running, fake: Faults
) -> None:
    fake.refuse["ListVolumes"] = [UNAVAILABLE]
    fake.hold.add("ListVolumes")  # the retry: no answer before the deadline
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.05, multiplier=1.0, jitter=0.0)
    try:
        client = StorageClient(server.address, retry=policy, timeout=0.5)
        with client, pytest.raises(errors.Unavailable, match="backend restarting"):
            client.list_volumes()
        assert fake.count("ListVolumes") == 2
    finally:
        fake.release.set()


def test_deadline_exceeded(storage: StorageClient, fake: Faults) -> None:
    fake.hold.add("GetVolume")
    try:
        with pytest.raises(errors.DeadlineExceeded):
            storage.get_volume("vol-1", timeout=0.2)
    finally:
        fake.release.set()


# Streams


def test_watch_volume_until_settled(storage: StorageClient, tmp_path: Path) -> None:
    image = image_file(tmp_path, "image.qcow2", "qcow2", 3 * GIB)
    vol = storage.create_volume(
        "root", 3 * GIB, source_image=str(image), image_format=types_pb2.IMAGE_FORMAT_QCOW2
    )
    assert vol.state == types_pb2.VOLUME_STATE_CREATING
    seen: list[int] = []
    final = storage.wait_volume(vol.id, on_update=lambda v: seen.append(v.progress.done_bytes))
    assert final.state == types_pb2.VOLUME_STATE_AVAILABLE
    # The first update is the volume as the watch finds it: on a loaded machine the copy of the sparse
    # image may be done by then, so only the order and the end are certain.
    assert seen == sorted(seen)  # progress only grows
    assert seen[-1] == 3 * GIB


def test_watch_of_a_missing_volume(storage: StorageClient) -> None:
    with pytest.raises(errors.NotFound):
        list(storage.watch_volume("vol-x"))


def test_stream_reopens_after_unavailable_before_its_first_item(
    storage: StorageClient, fake: Faults, clock: FakeClock
) -> None:
    vol = storage.create_volume("data1", GIB)
    fake.refuse["WatchVolume"] = [UNAVAILABLE]
    assert [v.id for v in storage.watch_volume(vol.id)] == [vol.id]
    assert fake.count("WatchVolume") == 2
    assert len(clock.sleeps) == 1


@pytest.fixture
def agent_env(env: Services) -> Iterator[tuple[Services, HostAgentClient, StorageClient]]:
    storage, agent = StorageClient(env.storage_server.address), HostAgentClient(env.agent_server.address)
    with storage, agent:
        yield env, agent, storage


def test_agent_calls(agent_env: tuple[Services, HostAgentClient, StorageClient]) -> None:
    _, agent, storage = agent_env
    connector = agent.get_connector()
    assert connector.initiator_iqn == HOST_IQN
    vol = storage.create_volume("data1", GIB)
    att = agent.attach_volume("vm1", volume_id=vol.id, disk=types_pb2.DiskOptions(target_dev="sdc"))
    assert (att.state, att.target_dev) == (types_pb2.ATTACHMENT_STATE_ATTACHED, "sdc")
    assert agent.attach_volume("vm1", volume_id=vol.id).id == att.id
    assert agent.get_attachment(vol.id).id == att.id
    assert [a.volume_id for a in agent.list_attachments("vm1")] == [vol.id]
    assert agent.list_attachments("vm2") == []
    assert [a.id for a in storage.list_attachments(volume_id=vol.id)] == [att.id]
    with pytest.raises(errors.FailedPrecondition, match="check that storage finished the extend"):
        agent.extend_volume(vol.id, 2 * GIB)  # the real agent reads the LUN's size: storage extends first
    storage.extend_volume(vol.id, 2 * GIB)
    assert agent.extend_volume(vol.id, 2 * GIB) == 2 * GIB
    agent.detach_volume("vm1", vol.id)
    agent.detach_volume("vm1", vol.id)
    with pytest.raises(errors.NotFound):
        agent.get_attachment(vol.id)
    with pytest.raises(errors.InvalidArgument):
        agent.attach_volume("vm1")
    info = model.ConnectionInfo(transport=model.LocalConnection("/dev/sdz"), volume_id=vol.id)
    with pytest.raises(errors.DeadlineExceeded, match="/dev/sdz"):
        agent.connect_volume(info)  # the model was converted and sent: the agent waited for its device


def test_watch_events_sees_progress_and_cancels(
    agent_env: tuple[Services, HostAgentClient, StorageClient],
) -> None:
    env, agent, storage = agent_env
    vol = storage.create_volume("data1", GIB)
    seen: list[hostagent_pb2.WatchEventsResponse] = []
    got_all = threading.Event()
    stream = agent.watch_events(volume_id=vol.id, types=[hostagent_pb2.EVENT_TYPE_PROGRESS])

    def consume() -> None:
        for event in stream:
            seen.append(event)
            if len(seen) == len(STEPS):
                got_all.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert env.events.wait_subscribed()  # from here the stream gets every event
    agent.attach_volume("vm1", volume_id=vol.id)
    assert got_all.wait(timeout=10)
    stream.cancel()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert [e.step for e in seen] == list(STEPS)
    assert stream.cancelled


# Channels, health, TLS


def test_context_manager_closes_its_own_channel_only(server: Running) -> None:
    with StorageClient(server.address) as client:
        client.list_volumes()
    with pytest.raises(ValueError, match="closed channel"):
        client.list_volumes()
    channel = grpc.insecure_channel(server.address)
    with StorageClient(channel=channel) as borrowed:
        borrowed.list_volumes()
    StorageClient(channel=channel).list_volumes()  # still open
    channel.close()


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "storage.sock"
    with storage_only(tmp_path, address=f"unix://{sock}"), StorageClient(str(sock)) as client:
        assert client.create_volume("x", GIB).name == "x"


def test_health(server: Running, storage: StorageClient) -> None:
    assert storage.health() == "SERVING"
    server.set_serving(STORAGE_SERVICE, serving=False)
    assert storage.health() == "NOT_SERVING"
    assert storage.health("blockwire.v1.Nothing") == "SERVICE_UNKNOWN"


def test_health_of_an_unreachable_daemon() -> None:
    with StorageClient("127.0.0.1:1", timeout=2.0) as client, pytest.raises(errors.Unavailable):
        client.health()


OPENSSL = shutil.which("openssl")


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    if OPENSSL is None:
        pytest.skip("openssl is not installed (scripts/setup installs it)")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=blockwire test CA",
        cwd=tmp_path,
    )
    for name in ("server", "client"):
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=tmp_path
        )
        (tmp_path / f"{name}.ext").write_text("subjectAltName=DNS:storage.test\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=tmp_path,
        )  # fmt: skip
    return tmp_path


def test_mutual_tls(pki: Path) -> None:
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    tls = TlsOptions(
        ca_file=str(pki / "ca.pem"),
        cert_file=str(pki / "client.pem"),
        key_file=str(pki / "client.key"),
        server_name="storage.test",
    )
    with storage_only(pki / "storage", credentials=credentials) as running:
        with StorageClient(running.address, tls=tls) as client:
            assert client.create_volume("secure", GIB).name == "secure"
        no_cert = TlsOptions(ca_file=str(pki / "ca.pem"), server_name="storage.test")
        refused = StorageClient(running.address, tls=no_cert, retry=NO_RETRY, timeout=5)
        with refused, pytest.raises(errors.Unavailable):
            refused.list_volumes()


def test_tls_options_need_cert_and_key_together() -> None:
    with pytest.raises(errors.InvalidArgument):
        TlsOptions(cert_file="c.pem")


def test_agent_migration_calls(agent_env: tuple[Services, HostAgentClient, StorageClient]) -> None:
    """The SDK's migration calls reach the agent and map its answers (the whole flow runs in
    tests/host/test_migration.py between two libvirt hosts)."""
    _, agent, storage = agent_env
    vol = storage.create_volume("mig1", GIB)
    att = agent.attach_volume("vm1", volume_id=vol.id)
    assert agent.abort_migration("vm1") == []  # nothing prepared on this side
    assert [a.id for a in agent.finish_incoming_migration("vm1")] == [att.id]  # nothing pending: a repeat
    with pytest.raises(errors.FailedPrecondition, match="still runs on this host"):
        agent.finish_outgoing_migration("vm1")
    with pytest.raises(errors.InvalidArgument, match="volumes"):
        agent.prepare_migration("vm2", "<domain/>", [])
    with pytest.raises(errors.FailedPrecondition, match="cannot reach other agents"):
        agent.migrate_domain("vm1", "127.0.0.1:1", "qemu+tcp://elsewhere/system")
    agent.detach_volume("vm1", vol.id)
