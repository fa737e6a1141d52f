"""StorageService roles (storagesvc/rpc/auth.py) over mutual TLS: what an agent credential may do for its
own host, what only an admin may do, and what a certificate without a role gets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from tests.fakes.storage_rig import StorageRig
from tests.fakes.tls_rig import Identities, storage_server

C = grpc.StatusCode
MIB = 1 << 20


def connector(host: str) -> pb.Connector:
    return pb.Connector(host=host, initiator_iqn=f"iqn.2026-01.io.example:{host}")


@dataclass
class World:
    stubs: dict[str, storage_pb2_grpc.StorageServiceStub]
    volume_id: str
    attachment_b: str  # an attachment of host-b, made by an admin


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ids = Identities.make(tmp_path_factory.mktemp("role-certs"))
    rig = StorageRig.make(tmp_path_factory.mktemp("role-storage"))
    with storage_server(rig, ids) as running:
        channels = {
            name: running.channel(ids.tls(pair))
            for name, pair in (
                ("admin", ids.admin),
                ("agent-a", ids.agent_a),
                ("agent-b", ids.agent_b),
                ("no-role", ids.no_role),
            )
        }
        channels["unix"] = grpc.insecure_channel(running.unix)
        stubs = {k: storage_pb2_grpc.StorageServiceStub(ch) for k, ch in channels.items()}
        admin = stubs["admin"]
        v = admin.CreateVolume(
            spb.CreateVolumeRequest(name="shared", size_bytes=MIB, multiattach=True), timeout=10
        )
        b = admin.CreateAttachment(
            spb.CreateAttachmentRequest(volume_id=v.volume.id, connector=connector("host-b")), timeout=10
        )
        yield World(stubs, v.volume.id, b.attachment.id)
        for ch in channels.values():
            ch.close()
    rig.close()


def code(fn: object, request: object) -> grpc.StatusCode:
    try:
        fn(request, timeout=10)  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return C.OK


ADMIN_ONLY = [
    ("CreateVolume", spb.CreateVolumeRequest(name="by-agent", size_bytes=MIB)),
    ("ListVolumes", spb.ListVolumesRequest()),
    ("DeleteVolume", spb.DeleteVolumeRequest(volume_id="0" * 32)),
    ("ExtendVolume", spb.ExtendVolumeRequest(volume_id="0" * 32, new_size_bytes=MIB)),
    ("CreateSnapshot", spb.CreateSnapshotRequest(volume_id="0" * 32, name="s")),
    ("GetSnapshot", spb.GetSnapshotRequest(snapshot_id="0" * 32)),
    ("ListSnapshots", spb.ListSnapshotsRequest()),
    ("DeleteSnapshot", spb.DeleteSnapshotRequest(snapshot_id="0" * 32)),
    ("ListAttachments", spb.ListAttachmentsRequest()),
    ("GetCapacity", spb.GetCapacityRequest()),
    ("GetBackendStats", spb.GetBackendStatsRequest()),
    # volume types and QoS specs: agents neither write nor read them
    ("CreateVolumeType", spb.CreateVolumeTypeRequest(name="by-agent")),
    ("GetVolumeType", spb.GetVolumeTypeRequest(volume_type="none")),
    ("ListVolumeTypes", spb.ListVolumeTypesRequest()),
    ("UpdateVolumeType", spb.UpdateVolumeTypeRequest(volume_type="none")),
    ("DeleteVolumeType", spb.DeleteVolumeTypeRequest(volume_type="none")),
    ("SetVolumeTypeQosSpecs", spb.SetVolumeTypeQosSpecsRequest(volume_type="none")),
    ("CreateQosSpecs", spb.CreateQosSpecsRequest(name="by-agent")),
    ("GetQosSpecs", spb.GetQosSpecsRequest(qos_specs="none")),
    ("ListQosSpecs", spb.ListQosSpecsRequest()),
    ("UpdateQosSpecs", spb.UpdateQosSpecsRequest(qos_specs="none")),
    ("DeleteQosSpecs", spb.DeleteQosSpecsRequest(qos_specs="none")),
]


@pytest.mark.parametrize(("rpc", "request_"), ADMIN_ONLY, ids=[r for r, _ in ADMIN_ONLY])
def test_agent_may_not_manage_volumes_snapshots_or_list(world: World, rpc: str, request_: object) -> None:
    assert code(getattr(world.stubs["agent-a"], rpc), request_) is C.PERMISSION_DENIED
    assert code(getattr(world.stubs["admin"], rpc), request_) in (C.OK, C.NOT_FOUND)
    assert code(getattr(world.stubs["unix"], rpc), request_) in (C.OK, C.NOT_FOUND)


def test_watch_volume_is_admin_only(world: World) -> None:
    stream = world.stubs["agent-a"].WatchVolume(spb.WatchVolumeRequest(volume_id=world.volume_id), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() is C.PERMISSION_DENIED


def test_agent_attaches_its_own_host_only(world: World) -> None:
    a = world.stubs["agent-a"]
    assert code(a.GetVolume, spb.GetVolumeRequest(volume_id=world.volume_id)) is C.OK
    other = spb.CreateAttachmentRequest(volume_id=world.volume_id, connector=connector("host-b"))
    assert code(a.CreateAttachment, other) is C.PERMISSION_DENIED
    own = a.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=world.volume_id, connector=connector("host-a")), timeout=10
    ).attachment
    assert own.connection_info.iscsi.chap.password  # its own credentials come back to it
    assert code(a.CompleteAttachment, spb.CompleteAttachmentRequest(attachment_id=own.id)) is C.OK
    assert code(a.GetAttachment, spb.GetAttachmentRequest(attachment_id=own.id)) is C.OK
    # host-b's attachment (and its CHAP secret) is not host-a's business
    for rpc, req in (
        ("GetAttachment", spb.GetAttachmentRequest(attachment_id=world.attachment_b)),
        ("CompleteAttachment", spb.CompleteAttachmentRequest(attachment_id=world.attachment_b)),
        ("DeleteAttachment", spb.DeleteAttachmentRequest(attachment_id=world.attachment_b)),
    ):
        assert code(getattr(a, rpc), req) is C.PERMISSION_DENIED, rpc
    assert (
        code(world.stubs["agent-b"].GetAttachment, spb.GetAttachmentRequest(attachment_id=world.attachment_b))
        is C.OK
    )
    assert code(a.DeleteAttachment, spb.DeleteAttachmentRequest(attachment_id=own.id)) is C.OK
    assert code(a.DeleteAttachment, spb.DeleteAttachmentRequest(attachment_id=own.id)) is C.OK  # a repeat
    assert code(a.GetAttachment, spb.GetAttachmentRequest(attachment_id="f" * 32)) is C.NOT_FOUND


def test_certificate_without_a_role_is_denied_everything(world: World) -> None:
    s = world.stubs["no-role"]
    assert code(s.GetVolume, spb.GetVolumeRequest(volume_id=world.volume_id)) is C.PERMISSION_DENIED
    assert code(s.ListVolumes, spb.ListVolumesRequest()) is C.PERMISSION_DENIED


def test_denials_say_why_and_name_no_secret(world: World) -> None:
    with pytest.raises(grpc.RpcError) as err:
        world.stubs["agent-a"].GetAttachment(
            spb.GetAttachmentRequest(attachment_id=world.attachment_b), timeout=10
        )
    assert "another host" in (err.value.details() or "")
    secret = (
        world.stubs["admin"]
        .GetAttachment(spb.GetAttachmentRequest(attachment_id=world.attachment_b), timeout=10)
        .attachment.connection_info.iscsi.chap.password
    )
    assert secret
    assert secret not in (err.value.details() or "")


def test_agent_migrates_to_its_own_host_only(world: World) -> None:
    """The destination agent makes, completes or rolls back the migration attachment of its own host;
    never one for another host, nor another host's."""
    admin, a = world.stubs["admin"], world.stubs["agent-a"]
    admin.CompleteAttachment(spb.CompleteAttachmentRequest(attachment_id=world.attachment_b), timeout=10)
    to_b = spb.CreateMigrationAttachmentRequest(
        source_attachment_id=world.attachment_b, connector=connector("host-b")
    )
    assert code(a.CreateMigrationAttachment, to_b) is C.PERMISSION_DENIED
    dest = a.CreateMigrationAttachment(
        spb.CreateMigrationAttachmentRequest(
            source_attachment_id=world.attachment_b, connector=connector("host-a")
        ),
        timeout=10,
    ).attachment
    assert dest.migration_source_id == world.attachment_b
    b = world.stubs["agent-b"]
    assert (
        code(b.RollbackMigration, spb.RollbackMigrationRequest(attachment_id=dest.id)) is C.PERMISSION_DENIED
    )
    assert (
        code(b.CompleteMigration, spb.CompleteMigrationRequest(attachment_id=dest.id)) is C.PERMISSION_DENIED
    )
    assert code(a.RollbackMigration, spb.RollbackMigrationRequest(attachment_id=dest.id)) is C.OK
