"""Several storage nodes behind one API (tests/fakes/node_rig.py: three real StorageServices sharing one
SQLite catalog, each on its own file backend, served over mutual TLS with the auth and forwarding
interceptors): the registry, placement across nodes, forwarding of volume, snapshot and attachment
calls to the node that serves the backend, a node down (UNAVAILABLE naming it, the rest working), its
return, and the storage-node role."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from storagesvc.model import NodeBackend
from tests.fakes.node_rig import DOWN_AFTER, NodeRig, node_rig

MIB = 1 << 20


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[NodeRig]:
    with node_rig(tmp_path, "a", "b", "c") as r:
        yield r


def _create(stub: storage_pb2_grpc.StorageServiceStub, backend: str = "") -> pb.Volume:
    name = f"v-{uuid.uuid4().hex[:8]}"
    req = spb.CreateVolumeRequest(name=name, size_bytes=MIB, backend=backend)
    return stub.CreateVolume(req, timeout=30).volume


def _attach(stub: storage_pb2_grpc.StorageServiceStub, volume_id: str) -> pb.Attachment:
    return stub.CreateAttachment(
        spb.CreateAttachmentRequest(
            volume_id=volume_id,
            connector=pb.Connector(host="host-a", initiator_iqn="iqn.2026-01.io.example:host-a"),
            access_mode=pb.ACCESS_MODE_READ_WRITE,
        ),
        timeout=30,
    ).attachment


def test_nodes_register_their_backends(rig: NodeRig) -> None:
    nodes = rig.stub("a").ListStorageNodes(spb.ListStorageNodesRequest(), timeout=10).nodes
    assert [n.name for n in nodes] == ["a", "b", "c"]
    for n in nodes:
        assert n.up
        assert n.address == rig.nodes[n.name].address
        assert [(b.name, b.kind, b.shared, b.healthy) for b in n.backends] == [
            (f"file-{n.name}", "file", False, True)
        ]
        assert n.backends[0].total_bytes > 0
        assert n.backends[0].capabilities["transport"] == "iscsi"
    caps = rig.stub("b").GetCapacity(spb.GetCapacityRequest(node="c"), timeout=10).backends
    assert [(c.backend, c.node, c.node_down) for c in caps] == [("file-c", "c", False)]
    every = rig.stub("b").GetCapacity(spb.GetCapacityRequest(), timeout=10).backends
    assert sorted(c.node for c in every) == ["a", "b", "c"]
    with pytest.raises(grpc.RpcError) as err:
        rig.stub("a").GetCapacity(spb.GetCapacityRequest(node="zz"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "zz" in (err.value.details() or "")


def test_creates_spread_across_nodes_and_run_on_the_owner(rig: NodeRig) -> None:
    stub = rig.stub("a")
    volumes = [_create(stub) for _ in range(6)]
    assert sorted(v.node for v in volumes) == ["a", "a", "b", "b", "c", "c"]  # fewest volumes first
    for v in volumes:
        assert v.backend == f"file-{v.node}"
        assert not v.node_down
        assert rig.nodes[v.node].backend.exists(v.id)  # made by the owner, in its own directory
        for other in set(rig.nodes) - {v.node}:
            assert not rig.nodes[other].backend.exists(v.id)
    # a repeat by name through another node returns the same volume
    again = (
        rig.stub("c")
        .CreateVolume(spb.CreateVolumeRequest(name=volumes[0].name, size_bytes=MIB), timeout=30)
        .volume
    )
    assert again.id == volumes[0].id
    # an explicit backend of another node
    v = _create(rig.stub("a"), backend="file-b")
    assert v.node == "b"
    assert rig.nodes["b"].backend.exists(v.id)


def test_attachments_export_on_the_owning_node(rig: NodeRig) -> None:
    v = _create(rig.stub("a"), backend="file-b")
    a = _attach(rig.stub("a"), v.id)
    again = _attach(rig.stub("c"), v.id)  # idempotent through any node
    assert again.id == a.id
    assert len(rig.nodes["b"].exporter.list_targets("")) == 1
    assert rig.nodes["a"].exporter.list_targets("") == rig.nodes["c"].exporter.list_targets("") == []
    snap = (
        rig.stub("c")
        .CreateSnapshot(spb.CreateSnapshotRequest(volume_id=v.id, name=f"s-{v.id[:6]}"), timeout=30)
        .snapshot
    )
    assert [p.name for p in rig.nodes["b"].backend.snapshots.iterdir() if snap.id in p.name]  # made on b
    rig.stub("a").DeleteSnapshot(spb.DeleteSnapshotRequest(snapshot_id=snap.id), timeout=30)
    rig.stub("c").DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a.id), timeout=30)
    rig.stub("c").DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a.id), timeout=30)  # repeat: OK
    assert rig.nodes["b"].exporter.list_targets("") == []
    rig.stub("a").DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=30)
    assert not rig.nodes["b"].backend.exists(v.id)


def test_a_node_down_is_named_and_the_rest_keeps_working(rig: NodeRig) -> None:
    on_b = _create(rig.stub("a"), backend="file-b")
    rig.clock.advance(DOWN_AFTER + 1)  # b stops heartbeating; a and c go on
    rig.heartbeat("a", "c")
    stub = rig.stub("a")
    nodes = {n.name: n.up for n in stub.ListStorageNodes(spb.ListStorageNodesRequest(), timeout=10).nodes}
    assert nodes == {"a": True, "b": False, "c": True}
    got = stub.GetVolume(spb.GetVolumeRequest(volume_id=on_b.id), timeout=10).volume
    assert got.node == "b"
    assert got.node_down
    with pytest.raises(grpc.RpcError) as err:
        _attach(stub, on_b.id)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "storage node b" in (err.value.details() or "")
    assert "down" in (err.value.details() or "")
    assert rig.nodes["b"].exporter.list_targets("") == []  # nothing was sent to b
    with pytest.raises(grpc.RpcError) as err:
        _create(stub, backend="file-b")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "storage node b" in (err.value.details() or "")
    placed = [_create(stub) for _ in range(4)]
    assert {v.node for v in placed} == {"a", "c"}  # creates go to the nodes that are up
    rig.heartbeat("b")  # b is back
    a = _attach(stub, on_b.id)
    assert a.state == pb.ATTACHMENT_STATE_ATTACHING
    assert not stub.GetVolume(spb.GetVolumeRequest(volume_id=on_b.id), timeout=10).volume.node_down


def test_the_storage_node_role_is_served_locally_and_only_for_forwarded_calls(rig: NodeRig) -> None:
    node_a = rig.certs.client("peer-a", "blockwire://storage-node/a")
    peer = storage_pb2_grpc.StorageServiceStub(rig.channel("b", node_a))
    with pytest.raises(grpc.RpcError) as err:
        peer.ListVolumes(spb.ListVolumesRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # a forwarded call is run where it arrives, never sent on: b has no file-c
    with pytest.raises(grpc.RpcError) as err:
        peer.CreateVolume(spb.CreateVolumeRequest(name="x", size_bytes=MIB, backend="file-c"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "file-c" in (err.value.details() or "")


def test_a_node_reconciles_only_its_own_volumes(rig: NodeRig, caplog: pytest.LogCaptureFixture) -> None:
    on_b = _create(rig.stub("a"), backend="file-b")
    on_a = _create(rig.stub("a"), backend="file-a")
    _attach(rig.stub("a"), on_b.id)
    _attach(rig.stub("a"), on_a.id)
    rig.nodes["a"].service.reconcile()  # a restarted: b's volumes are b's to reconcile (and lock)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert len(rig.nodes["a"].exporter.list_targets("")) == 1  # a's own export, restored
    assert len(rig.nodes["b"].exporter.list_targets("")) == 1  # b's untouched


def test_an_unreachable_node_is_named_and_creates_go_to_the_next_backend(rig: NodeRig) -> None:
    on_b = _create(rig.stub("a"), backend="file-b")
    rig.nodes["b"].running.stop(0)  # b's server gone, its last heartbeat still fresh
    with pytest.raises(grpc.RpcError) as err:
        _attach(rig.stub("a"), on_b.id)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "storage node b" in (err.value.details() or "")
    # the scheduler ranks b first (fewest volumes after a and c get theirs); the create is rescheduled
    _create(rig.stub("a"), backend="file-a")
    _create(rig.stub("a"), backend="file-c")
    _create(rig.stub("a"), backend="file-a")
    _create(rig.stub("a"), backend="file-c")
    v = _create(rig.stub("a"))
    assert v.node in ("a", "c")
    assert not [p for p in (rig.root / "b").rglob("*") if p.is_file() and v.id in p.name]


def test_a_backend_dropped_from_a_node_is_unregistered(rig: NodeRig) -> None:
    c = rig.nodes["c"]
    gone = NodeBackend("file-old", "c", "file", False, True, 1, 1, 0, 0)
    rig.nodes["a"].catalog.put_node(replace(c.cluster.local(), backends=(gone,)))
    assert c.catalog.node_backend("file-old") is not None
    c.cluster.register()  # c restarted without it
    assert c.catalog.node_backend("file-old") is None
    assert c.catalog.node_backend("file-c") is not None


def test_a_volume_type_places_across_nodes(rig: NodeRig) -> None:
    rig.stub("b").CreateVolumeType(
        spb.CreateVolumeTypeRequest(
            name="on-c", extra_specs={"volume_backend_name": "file-c", "capabilities:transport": "s== iscsi"}
        ),
        timeout=10,
    )
    for _ in range(2):  # c gets them although it has the most volumes after the first
        v = (
            rig.stub("a")
            .CreateVolume(
                spb.CreateVolumeRequest(name=f"t-{uuid.uuid4().hex[:8]}", size_bytes=MIB, volume_type="on-c"),
                timeout=30,
            )
            .volume
        )
        assert (v.node, v.volume_type) == ("c", "on-c")
        assert rig.nodes["c"].backend.exists(v.id)
    with pytest.raises(grpc.RpcError) as err:
        rig.stub("a").CreateVolume(
            spb.CreateVolumeRequest(name="t-none", size_bytes=MIB, volume_type="nope"), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_attaches_through_two_nodes_have_one_winner(rig: NodeRig) -> None:
    v = _create(rig.stub("a"), backend="file-b")  # not multiattach
    barrier = threading.Barrier(2)

    def attach_via(node: str, host: str) -> object:
        barrier.wait(10)
        try:
            return (
                rig.stub(node)
                .CreateAttachment(
                    spb.CreateAttachmentRequest(
                        volume_id=v.id,
                        connector=pb.Connector(host=host, initiator_iqn=f"iqn.2026-01.io.example:{host}"),
                        access_mode=pb.ACCESS_MODE_READ_WRITE,
                    ),
                    timeout=30,
                )
                .attachment
            )
        except grpc.RpcError as err:
            return err.code()

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(attach_via, ("a", "c"), ("host-a", "host-c")))
    won = [r for r in results if isinstance(r, pb.Attachment)]
    assert len(won) == 1, results
    assert [r for r in results if not isinstance(r, pb.Attachment)] == [grpc.StatusCode.FAILED_PRECONDITION]
    (target,) = rig.nodes["b"].exporter.list_targets("")  # one export, on b only
    assert len(target.initiators) == 1
    assert rig.nodes["a"].exporter.list_targets("") == rig.nodes["c"].exporter.list_targets("") == []


def test_an_agent_is_authorized_by_the_node_it_calls(rig: NodeRig) -> None:
    v = _create(rig.stub("a"), backend="file-b")
    agent = rig.certs.client("agent-a", "blockwire://agent/host-a")
    stub = storage_pb2_grpc.StorageServiceStub(rig.channel("a", agent))
    a = _attach(stub, v.id)  # connector host-a: its own host; forwarded to b
    assert len(rig.nodes["b"].exporter.list_targets("")) == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateAttachment(
            spb.CreateAttachmentRequest(
                volume_id=v.id,
                connector=pb.Connector(host="host-x", initiator_iqn="iqn.2026-01.io.example:host-x"),
            ),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # refused by a, never sent to b
    stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a.id), timeout=30)
    assert rig.nodes["b"].exporter.list_targets("") == []
