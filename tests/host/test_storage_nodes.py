"""Host tier: three storage nodes behind one API. Three real `blockwire-storage` daemons, each with its own
file backend and its own tgtd (own ports), sharing ONE PostgreSQL catalog, registered as nodes a, b, c
([node]: heartbeats, mutual TLS between them with storage-node certificates), and one real
`blockwire-agent` talking to node a only, attaching to a libvirt domain with QEMU's iSCSI initiator.

* 30 volumes created through node a spread over the three nodes per the scheduler, each made by its owner;
* attached and detached through the agent: the export is on the owning node's tgtd, no other;
* node c killed: its volumes report it down, creates go to a and b, an attach of one of its volumes is
  UNAVAILABLE naming c, the others still attach; c restarted (it reconciles): back, its volume attaches.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc, storage_pb2_grpc
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from tests.conftest import tier_unavailable
from tests.fakes.daemon_rig import define_domain, remove_domain
from tests.host.daemons import Missing, Started, Tgtd
from tests.host.nodes_rig import running_nodes
from tests.postgres import PostgresServer
from tests.rig import Daemon, wait_until

MIB = 1 << 20
NODES = ("a", "b", "c")
HEARTBEAT = 0.5
DOWN_AFTER = 3.0


def targets(tgtd: Tgtd) -> list[tuple[int, str]]:
    out = tgtd.adm("--op", "show", "--mode", "target").stdout
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^Target (\d+): (\S+)$", out, re.M)]


@dataclass
class Cluster:
    work: Path
    prefix: str
    tgtds: dict[str, Tgtd]
    storage: dict[str, Daemon]
    agent: Daemon

    def stub(self, node: str = "a") -> storage_pb2_grpc.StorageServiceStub:
        return storage_pb2_grpc.StorageServiceStub(self.storage[node].channel)

    @property
    def agent_stub(self) -> hostagent_pb2_grpc.HostAgentServiceStub:
        return hostagent_pb2_grpc.HostAgentServiceStub(self.agent.channel)

    def exported_on(self, volume_id: str) -> list[str]:
        """The nodes whose tgtd has a target of this volume."""
        return [n for n, t in self.tgtds.items() if any(volume_id in iqn for _, iqn in targets(t))]

    def up(self) -> dict[str, bool]:
        nodes = self.stub().ListStorageNodes(spb.ListStorageNodesRequest(), timeout=10).nodes
        return {n.name: n.up for n in nodes}


def agent_config(work: Path, storage_socket: Path) -> Path:
    config = work / "agent.toml"
    config.write_text(
        f"""state_dir = "{work / "agent-state"}"
storage_address = "unix://{storage_socket}"
storage_timeout = 20.0
iscsi_mode = "qemu"
listen_unix = "{work / "agent.sock"}"
initiator_file = "{work / "no-initiatorname"}"
hostnqn_file = "{work / "no-hostnqn"}"
device_timeout = 10.0
detach_timeout = 10.0
log_level = "DEBUG"
"""
    )
    return config


@pytest.fixture
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    """A connection of this test's own (libvirtd is shared: one opened earlier may have been cut)."""
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def cluster(
    host_daemons: Started, postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("nodes")
    dsn = postgres_server.create_database()
    prefix = f"iqn.2026-01.io.blockwire.n{uuid.uuid4().hex[:10]}"
    agent: Daemon | None = None
    try:
        with running_nodes(work, NODES, prefix, postgres_server, dsn, HEARTBEAT, DOWN_AFTER) as (
            tgtds,
            daemons,
        ):
            agent = Daemon.agent(agent_config(work, work / "a" / "storage.sock"), work / "agent.sock").start()
            try:
                yield Cluster(work, prefix, tgtds, daemons, agent)
            finally:
                agent.stop()
    except Missing as exc:
        tier_unavailable("host", str(exc))


@pytest.fixture
def domain(virt: libvirt.virConnect) -> Iterator[str]:
    name = define_domain(virt, "bw-nodes")
    try:
        yield name
    finally:
        remove_domain(virt, name)


def create(c: Cluster, backend: str = "") -> pb.Volume:
    name = f"v-{uuid.uuid4().hex[:8]}"
    v = c.stub().CreateVolume(
        spb.CreateVolumeRequest(name=name, size_bytes=8 * MIB, backend=backend), timeout=60
    )
    return v.volume


def attach(c: Cluster, domain: str, volume_id: str) -> pb.Attachment:
    req = hpb.AttachVolumeRequest(domain=domain, volume_id=volume_id)
    return c.agent_stub.AttachVolume(req, timeout=60).attachment


def detach(c: Cluster, domain: str, volume_id: str) -> None:
    c.agent_stub.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=volume_id), timeout=60)


def test_three_nodes_spread_attach_and_survive_one_going_down(cluster: Cluster, domain: str) -> None:
    c = cluster
    assert c.up() == {"a": True, "b": True, "c": True}

    # creates through node a spread over the nodes (the weigher: room, then fewest volumes)
    volumes = [create(c) for _ in range(30)]
    spread = Counter(v.node for v in volumes)
    # thin file backends on the same filesystem: the same total, so the room left (total x ratio -
    # provisioned, the free_capacity weigher) is largest on the backend with the fewest bytes provisioned
    assert spread == {"a": 10, "b": 10, "c": 10}, spread
    for v in volumes:
        assert v.backend == f"file-{v.node}"
        assert v.state == pb.VOLUME_STATE_AVAILABLE
        assert (c.work / v.node / "volumes").exists()
        assert any(v.id in p.name for p in (c.work / v.node / "volumes").rglob("*")), v.node
    caps = c.stub("b").GetCapacity(spb.GetCapacityRequest(), timeout=10).backends
    assert sorted((b.node, b.backend) for b in caps) == [("a", "file-a"), ("b", "file-b"), ("c", "file-c")]

    # attached through the agent (which talks to node a only): exported by the owning node's tgtd
    one_each = {v.node: v for v in reversed(volumes)}
    for node, v in sorted(one_each.items()):
        a = attach(c, domain, v.id)
        assert a.state == pb.ATTACHMENT_STATE_ATTACHED
        assert c.exported_on(v.id) == [node]
    for v in one_each.values():
        detach(c, domain, v.id)
        assert c.exported_on(v.id) == []

    # node c killed: down after its down_after, the rest keeps working
    c.storage["c"].kill()
    wait_until("node c down", lambda: c.up() == {"a": True, "b": True, "c": False}, DOWN_AFTER * 4)
    on_c = one_each["c"]
    got = c.stub().GetVolume(spb.GetVolumeRequest(volume_id=on_c.id), timeout=10).volume
    assert got.node == "c"
    assert got.node_down
    with pytest.raises(grpc.RpcError) as err:
        attach(c, domain, on_c.id)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "storage node c" in (err.value.details() or "")
    assert c.exported_on(on_c.id) == []
    placed = [create(c) for _ in range(4)]
    assert {v.node for v in placed} == {"a", "b"}
    a = attach(c, domain, one_each["b"].id)  # another node's volume still attaches
    assert c.exported_on(one_each["b"].id) == ["b"]
    detach(c, domain, one_each["b"].id)

    # c restarted: it reconciles, heartbeats, and serves its volumes again
    c.storage["c"].start()
    wait_until("node c up", lambda: c.up() == {"a": True, "b": True, "c": True}, DOWN_AFTER * 4)
    a = attach(c, domain, on_c.id)
    assert a.state == pb.ATTACHMENT_STATE_ATTACHED
    assert c.exported_on(on_c.id) == ["c"]
    detach(c, domain, on_c.id)

    for v in volumes + placed:
        c.stub().DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=60)
    assert list(c.stub().ListVolumes(spb.ListVolumesRequest(), timeout=10).volumes) == []
    for node in NODES:
        assert not any(p.is_file() for p in (c.work / node / "volumes").rglob("*")), node
