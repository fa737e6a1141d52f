"""TLS and mutual TLS of both services' listeners (blockwire.server.serving), through the SDK and the agent's
storage client: what a client sees for each kind of bad credential, unix socket modes, and the
configuration rules (no plaintext TCP unless asked for)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from blockwire.client import HostAgentClient, StorageClient, TlsOptions
from blockwire.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from blockwire.model import AccessMode, Connector, Transport
from blockwire.server import serving
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc, storage_pb2_grpc
from blockwire.v1 import storage_pb2 as spb
from hostagent.config import config_from_mapping
from hostagent.rpc.peer_client import GrpcPeerAgent
from hostagent.rpc.storage_client import GrpcStorageApi, channel_for, tls_options
from storagesvc.config import ConfigError, parse
from tests.fakes.storage_rig import StorageRig
from tests.fakes.tls_rig import Identities, Running, agent_server, storage_server

MIB = 1 << 20
IQN_A = "iqn.2026-01.io.example:host-a"


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    return Identities.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[StorageRig]:
    r = StorageRig.make(tmp_path)
    yield r
    r.close()


@pytest.fixture
def storage(rig: StorageRig, ids: Identities) -> Iterator[Running]:
    with storage_server(rig, ids) as running:
        yield running


def _code(tls: TlsOptions | None, running: Running) -> grpc.StatusCode:
    channel = running.channel(tls)
    try:
        storage_pb2_grpc.StorageServiceStub(channel).GetCapacity(spb.GetCapacityRequest(), timeout=5)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    finally:
        channel.close()
    return grpc.StatusCode.OK


def test_admin_certificate_manages_volumes_through_the_sdk(storage: Running, ids: Identities) -> None:
    with StorageClient(storage.tcp, tls=ids.tls(ids.admin)) as client:
        v = client.create_volume("tls-vol", MIB)
        assert client.get_volume(v.id).name == "tls-vol"
        client.delete_volume(v.id)


@pytest.mark.parametrize(
    ("who", "server_name"),
    [("none", None), ("stranger", None), ("admin", "not-the-server.example")],
    ids=["no-client-cert", "cert-of-another-ca", "wrong-server-name"],
)
def test_failed_handshakes_show_as_unavailable(
    storage: Running, ids: Identities, who: str, server_name: str | None
) -> None:
    pair = {"none": None, "stranger": ids.stranger, "admin": ids.admin}[who]
    assert _code(ids.tls(pair, server_name), storage) is grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_on_the_tls_port_is_unavailable(storage: Running) -> None:
    assert _code(None, storage) is grpc.StatusCode.UNAVAILABLE


def test_server_name_override(storage: Running, ids: Identities) -> None:
    assert _code(ids.tls(ids.admin, "localhost"), storage) is grpc.StatusCode.OK


def test_without_a_required_client_cert_the_call_is_unauthenticated(rig: StorageRig, ids: Identities) -> None:
    with storage_server(rig, ids, require_client_cert=False) as running:
        assert _code(ids.tls(None), running) is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(Unauthenticated), StorageClient(running.tcp, tls=ids.tls(None)) as client:
            client.list_volumes()
        # gRPC then does not even ask for client certificates: nobody has a role over TCP.
        assert _code(ids.tls(ids.admin), running) is grpc.StatusCode.UNAUTHENTICATED


def test_unix_socket_is_admin_and_has_private_modes(storage: Running, rig: StorageRig) -> None:
    sock = Path(storage.unix.removeprefix("unix://"))
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750
    with StorageClient(storage.unix) as client:
        assert client.list_volumes() == []


def test_agent_storage_client_over_mutual_tls(storage: Running, ids: Identities, rig: StorageRig) -> None:
    with StorageClient(storage.tcp, tls=ids.tls(ids.admin)) as admin:
        v = admin.create_volume("agent-tls", MIB)
    tls = tls_options(str(ids.certs.ca.cert), str(ids.agent_a.cert), str(ids.agent_a.key), "")
    channel = channel_for(storage.tcp, tls)
    api = GrpcStorageApi(channel, timeout=10)
    try:
        own = Connector(host="host-a", initiator_iqn=IQN_A, transports=(Transport.ISCSI,))
        att = api.create_attachment(v.id, own, AccessMode.READ_WRITE, "vm1")
        api.complete_attachment(att.id, "sda", "")
        with pytest.raises(PermissionDenied, match="own host"):
            api.create_attachment(
                v.id, Connector(host="host-b", initiator_iqn=IQN_A), AccessMode.READ_WRITE, ""
            )
        api.delete_attachment(att.id)
    finally:
        channel.close()
    assert tls_options("", "c", "k", "") is None  # no CA configured: plaintext (unix socket)


def test_agent_service_admits_admins_only(tmp_path: Path, ids: Identities) -> None:
    with agent_server(tmp_path, ids) as running:
        with HostAgentClient(running.tcp, tls=ids.tls(ids.admin)) as admin:
            assert admin.get_connector().host == "fake-host"
        with pytest.raises(PermissionDenied), HostAgentClient(running.tcp, tls=ids.tls(ids.agent_a)) as agent:
            agent.get_connector()
        with HostAgentClient(running.unix) as local:
            assert local.get_connector().host == "fake-host"


def test_another_agent_may_call_only_the_destination_part_of_a_migration(
    tmp_path: Path, ids: Identities
) -> None:
    """MigrateDomain's peer calls with the source agent's own identity (blockwire://agent/<host>):
    PrepareMigration, FinishIncomingMigration and AbortMigration pass the policy; nothing else does."""
    with agent_server(tmp_path, ids) as running:
        tls = tls_options(str(ids.certs.ca.cert), str(ids.agent_a.cert), str(ids.agent_a.key), "")
        peer = GrpcPeerAgent(running.tcp, tls)
        try:
            aborted = peer.abort_migration("vm1")  # nothing prepared here: nothing to undo
            assert list(aborted.volume_ids) == []  # type: ignore[attr-defined]
            with pytest.raises(FailedPrecondition, match="not on this host"):
                peer.finish_incoming_migration("no-such-domain")
            stub = hostagent_pb2_grpc.HostAgentServiceStub(peer.channel)
            for call, request in (
                (stub.GetConnector, hpb.GetConnectorRequest()),
                (stub.ListAttachments, hpb.HostAgentServiceListAttachmentsRequest()),
                (stub.DetachVolume, hpb.DetachVolumeRequest(domain="vm1", volume_id="vol-1")),
                (stub.FinishOutgoingMigration, hpb.FinishOutgoingMigrationRequest(domain="vm1")),
                (stub.MigrateDomain, hpb.MigrateDomainRequest(domain="vm1")),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=10)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            peer.close()


def test_tcp_without_tls_is_refused_unless_asked_for(tmp_path: Path) -> None:
    with pytest.raises(serving.ServingError, match="allow_insecure_tcp"):
        serving.start(services=(), register=lambda s: None, listeners=serving.Listeners(tcp=("127.0.0.1:0",)))
    insecure = serving.start(
        services=(),
        register=lambda s: None,
        listeners=serving.Listeners(tcp=("127.0.0.1:0",), allow_insecure_tcp=True),
    )
    insecure.stop(0)
    base = {
        "backends": [{"name": "f", "kind": "file", "exporter": "tgt", "path": str(tmp_path)}],
        "exporters": {"tgt": {"portals": ["127.0.0.1:3260"]}},
    }
    with pytest.raises(ConfigError, match="allow_insecure_tcp"):
        parse({**base, "server": {"listen": ["127.0.0.1:0"]}})
    assert parse({**base, "server": {"listen": ["127.0.0.1:0"]}, "tls": {"allow_insecure_tcp": True}})
    with pytest.raises(ConfigError, match="client_ca_file"):
        parse({**base, "tls": {"cert_file": "c", "key_file": "k"}})
    with pytest.raises(ConfigError, match="unix_socket_mode"):
        parse({**base, "server": {"unix_socket_mode": 0o666}})
    with pytest.raises(InvalidArgument, match="listen_tcp"):
        config_from_mapping({"listen_tcp": "127.0.0.1:0"})
    with pytest.raises(InvalidArgument, match=r"tls\.nope"):
        config_from_mapping({"tls": {"nope": 1}})
    ok = config_from_mapping({"listen_tcp": "127.0.0.1:0", "tls": {"allow_insecure_tcp": True}})
    assert ok.tls.allow_insecure_tcp


def test_unreadable_key_is_a_clear_error(tmp_path: Path, ids: Identities) -> None:
    tls = serving.TlsServer(str(ids.server.cert), str(tmp_path / "missing.key"), str(ids.certs.ca.cert))
    with pytest.raises(serving.ServingError, match="key_file"):
        serving.start(
            services=(), register=lambda s: None, listeners=serving.Listeners(tcp=("127.0.0.1:0",), tls=tls)
        )


def test_unavailable_maps_to_the_sdk_error(storage: Running) -> None:
    with pytest.raises(Unavailable), StorageClient(storage.tcp, timeout=3) as client:
        client.list_volumes()
