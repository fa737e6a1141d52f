"""StorageService through the generated stub: every mutating RPC twice gives the same result, bad inputs get
the documented codes and leave nothing behind (no file, no catalog row, no export)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from tests.contract.conftest import _serve
from tests.fakes.storage_rig import StorageRig

MIB = 1 << 20
CONNECTOR = pb.Connector(host="host-a", initiator_iqn="iqn.2026-01.io.example:host-a")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[StorageRig, Any]]:
    r = StorageRig.make(tmp_path)
    try:
        for channel in _serve(storage_pb2_grpc.add_StorageServiceServicer_to_server, r.servicer):
            yield r, storage_pb2_grpc.StorageServiceStub(channel)
    finally:
        r.close()


def code_of(call: Any, request: object) -> grpc.StatusCode:
    try:
        call(request, timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def nothing_left(r: StorageRig) -> None:
    assert r.files() == []
    assert r.catalog.list_volumes(after=None, limit=10) == []
    assert r.catalog.list_attachments(after=None, limit=10) == []
    assert r.exporter.targets == {}


def strip_times(m: pb.Volume | pb.Attachment) -> bytes:
    c = type(m)()
    c.CopyFrom(m)
    c.ClearField("update_time")
    return c.SerializeToString(deterministic=True)


def test_every_mutating_rpc_twice_gives_the_same_result(rig: tuple[StorageRig, Any]) -> None:
    r, stub = rig
    create = spb.CreateVolumeRequest(name="v", size_bytes=4 * MIB, labels={"k": "v"})
    v1 = stub.CreateVolume(create).volume
    v2 = stub.CreateVolume(create).volume
    assert strip_times(v1) == strip_times(v2)

    snap = spb.CreateSnapshotRequest(volume_id=v1.id, name="s")
    s1, s2 = stub.CreateSnapshot(snap).snapshot, stub.CreateSnapshot(snap).snapshot
    assert s1 == s2

    ext = spb.ExtendVolumeRequest(volume_id=v1.id, new_size_bytes=8 * MIB)
    e1, e2 = stub.ExtendVolume(ext).volume, stub.ExtendVolume(ext).volume
    assert e1.size_bytes == e2.size_bytes == 8 * MIB

    attach = spb.CreateAttachmentRequest(volume_id=v1.id, connector=CONNECTOR)
    a1 = stub.CreateAttachment(attach).attachment
    a2 = stub.CreateAttachment(attach).attachment
    assert strip_times(a1) == strip_times(a2)
    assert a1.connection_info.iscsi.chap.password  # same secrets on the repeat
    assert a1.connection_info.wwn == v1.wwn

    done = spb.CompleteAttachmentRequest(attachment_id=a1.id, target_dev="sdb")
    c1, c2 = stub.CompleteAttachment(done).attachment, stub.CompleteAttachment(done).attachment
    assert strip_times(c1) == strip_times(c2)
    assert c1.state == pb.ATTACHMENT_STATE_ATTACHED
    got = stub.GetVolume(spb.GetVolumeRequest(volume_id=v1.id)).volume
    assert got.state == pb.VOLUME_STATE_IN_USE
    assert list(got.attachment_ids) == [a1.id]

    listed = stub.ListAttachments(spb.ListAttachmentsRequest(volume_id=v1.id)).attachments
    assert not listed[0].HasField("connection_info")  # secrets only from Get/Create

    for _ in range(2):
        stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a1.id))
        stub.DeleteSnapshot(spb.DeleteSnapshotRequest(snapshot_id=s1.id))
    for _ in range(2):
        stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v1.id))
    nothing_left(r)


BAD = [
    (
        "CreateVolume",
        spb.CreateVolumeRequest(name="bad name", size_bytes=MIB),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("CreateVolume", spb.CreateVolumeRequest(name="v", size_bytes=MIB + 1), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "CreateVolume",
        spb.CreateVolumeRequest(name="v", size_bytes=1 << 59),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    (
        "CreateVolume",
        spb.CreateVolumeRequest(name="v", size_bytes=MIB, backend="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "CreateVolume",
        spb.CreateVolumeRequest(name="v", source_snapshot_id="f" * 32),
        grpc.StatusCode.NOT_FOUND,
    ),
    (
        "CreateVolume",
        spb.CreateVolumeRequest(name="v", source_image=pb.ImageSource(path="/no/such.img")),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("GetVolume", spb.GetVolumeRequest(volume_id="f" * 32), grpc.StatusCode.NOT_FOUND),
    ("ListVolumes", spb.ListVolumesRequest(page_token="forged"), grpc.StatusCode.INVALID_ARGUMENT),
    ("ListVolumes", spb.ListVolumesRequest(page_size=5000), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "ExtendVolume",
        spb.ExtendVolumeRequest(volume_id="f" * 32, new_size_bytes=MIB),
        grpc.StatusCode.NOT_FOUND,
    ),
    ("CreateSnapshot", spb.CreateSnapshotRequest(volume_id="f" * 32, name="s"), grpc.StatusCode.NOT_FOUND),
    ("GetSnapshot", spb.GetSnapshotRequest(snapshot_id="f" * 32), grpc.StatusCode.NOT_FOUND),
    ("GetAttachment", spb.GetAttachmentRequest(attachment_id="f" * 32), grpc.StatusCode.NOT_FOUND),
    ("CompleteAttachment", spb.CompleteAttachmentRequest(attachment_id="f" * 32), grpc.StatusCode.NOT_FOUND),
    ("GetCapacity", spb.GetCapacityRequest(backend="nope"), grpc.StatusCode.NOT_FOUND),
    ("DeleteVolume", spb.DeleteVolumeRequest(volume_id="f" * 32), grpc.StatusCode.OK),
    ("DeleteAttachment", spb.DeleteAttachmentRequest(attachment_id="f" * 32), grpc.StatusCode.OK),
]


@pytest.mark.parametrize(("rpc", "request_", "code"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_code_and_leaves_nothing(
    rig: tuple[StorageRig, Any], rpc: str, request_: object, code: grpc.StatusCode
) -> None:
    r, stub = rig
    assert code_of(getattr(stub, rpc), request_) is code
    nothing_left(r)


@pytest.mark.parametrize(
    ("connector", "field"),
    [
        (pb.Connector(host="h", initiator_iqn="not-an-iqn"), "connector.initiator_iqn"),
        (pb.Connector(initiator_iqn="iqn.2026-01.io.example:h"), "connector.host"),
        (
            pb.Connector(host="h", initiator_iqn="iqn.2026-01.io.example:h", transports=[pb.TRANSPORT_FC]),
            "connector",
        ),
    ],
)
def test_bad_connector_is_invalid_argument_naming_the_field_and_exports_nothing(
    rig: tuple[StorageRig, Any], connector: pb.Connector, field: str
) -> None:
    r, stub = rig
    vol = stub.CreateVolume(spb.CreateVolumeRequest(name="v", size_bytes=MIB)).volume
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateAttachment(spb.CreateAttachmentRequest(volume_id=vol.id, connector=connector))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)
    assert r.exporter.targets == {}
    assert r.catalog.list_attachments(after=None, limit=10) == []


def test_conflicts_are_failed_precondition_or_already_exists(rig: tuple[StorageRig, Any]) -> None:
    r, stub = rig
    vol = stub.CreateVolume(spb.CreateVolumeRequest(name="v", size_bytes=MIB)).volume
    assert code_of(stub.CreateVolume, spb.CreateVolumeRequest(name="v", size_bytes=2 * MIB)) is (
        grpc.StatusCode.ALREADY_EXISTS
    )
    stub.CreateAttachment(spb.CreateAttachmentRequest(volume_id=vol.id, connector=CONNECTOR))
    other = pb.Connector(host="host-b", initiator_iqn="iqn.2026-01.io.example:host-b")
    assert code_of(stub.CreateAttachment, spb.CreateAttachmentRequest(volume_id=vol.id, connector=other)) is (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        code_of(stub.DeleteVolume, spb.DeleteVolumeRequest(volume_id=vol.id))
        is grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(stub.ExtendVolume, spb.ExtendVolumeRequest(volume_id=vol.id, new_size_bytes=MIB // 2)) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert len(r.exporter.targets) == 1


def test_watch_volume_streams_an_image_copy_to_available(rig: tuple[StorageRig, Any], tmp_path: Path) -> None:
    _, stub = rig
    image = tmp_path / "image.raw"
    image.write_bytes(b"\x01" * (2 * MIB))
    vol = stub.CreateVolume(
        spb.CreateVolumeRequest(
            name="img", source_image=pb.ImageSource(path=str(image), format=pb.IMAGE_FORMAT_RAW)
        )
    ).volume
    states = [m.volume.state for m in stub.WatchVolume(spb.WatchVolumeRequest(volume_id=vol.id), timeout=30)]
    assert states[-1] == pb.VOLUME_STATE_AVAILABLE
    final = stub.GetVolume(spb.GetVolumeRequest(volume_id=vol.id)).volume
    assert final.progress.done_bytes == final.progress.total_bytes == 2 * MIB
    assert final.size_bytes == 2 * MIB


def test_paging_over_the_wire(rig: tuple[StorageRig, Any]) -> None:
    _, stub = rig
    names = [f"v{i}" for i in range(5)]
    for n in names:
        stub.CreateVolume(spb.CreateVolumeRequest(name=n, size_bytes=MIB))
    seen, token = [], ""
    for _ in range(10):
        page = stub.ListVolumes(spb.ListVolumesRequest(page_size=2, page_token=token))
        seen += [v.name for v in page.volumes]
        token = page.next_page_token
        if not token:
            break
    assert seen == names


def test_stats_report_operations(rig: tuple[StorageRig, Any]) -> None:
    _, stub = rig
    stub.CreateVolume(spb.CreateVolumeRequest(name="v", size_bytes=MIB))
    stats = stub.GetBackendStats(spb.GetBackendStatsRequest())
    assert stats.backends[0].volume_count == 1
    assert stats.backends[0].healthy
    op = next(o for o in stats.operations if o.operation == "create_volume")
    assert op.count == 1
    assert op.p95_micros >= op.p50_micros > 0
    cap = stub.GetCapacity(spb.GetCapacityRequest()).backends[0]
    assert cap.provisioned_bytes == MIB
