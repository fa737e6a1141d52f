"""Contract tier: the storage side of a live migration over gRPC against the real StorageService (file
backend, in-memory exporter): the destination attachment beside the source's, at most one pair per
volume, complete and rollback, and every repeat."""

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
from tests.contract.test_storage_contract import code_of, strip_times
from tests.fakes.storage_rig import StorageRig

MIB = 1 << 20
HOST_A = pb.Connector(host="host-a", initiator_iqn="iqn.2026-01.io.example:host-a")
HOST_B = pb.Connector(host="host-b", initiator_iqn="iqn.2026-01.io.example:host-b")
HOST_C = pb.Connector(host="host-c", initiator_iqn="iqn.2026-01.io.example:host-c")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[StorageRig, Any]]:
    r = StorageRig.make(tmp_path)
    try:
        for channel in _serve(storage_pb2_grpc.add_StorageServiceServicer_to_server, r.servicer):
            yield r, storage_pb2_grpc.StorageServiceStub(channel)
    finally:
        r.close()


def attached(stub: Any, *, multiattach: bool = False) -> tuple[pb.Volume, pb.Attachment]:
    """A volume attached (ATTACHED) to domain vm1 on host-a."""
    v = stub.CreateVolume(
        spb.CreateVolumeRequest(name="v", size_bytes=4 * MIB, multiattach=multiattach)
    ).volume
    a = stub.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=v.id, connector=HOST_A, domain="vm1")
    ).attachment
    a = stub.CompleteAttachment(
        spb.CompleteAttachmentRequest(attachment_id=a.id, target_dev="sda")
    ).attachment
    return v, a


def migrate_to(stub: Any, source: pb.Attachment, connector: pb.Connector = HOST_B) -> pb.Attachment:
    return stub.CreateMigrationAttachment(  # type: ignore[no-any-return]
        spb.CreateMigrationAttachmentRequest(source_attachment_id=source.id, connector=connector)
    ).attachment


def rows(stub: Any, volume_id: str) -> list[tuple[str, int, str]]:
    listed = stub.ListAttachments(spb.ListAttachmentsRequest(volume_id=volume_id)).attachments
    return [(a.connector.host, a.state, a.migration_source_id) for a in listed]


def acl(r: StorageRig) -> list[str]:
    (target,) = r.exporter.targets.values()
    return sorted(target.initiators)


def test_destination_attachment_beside_the_source_then_complete(rig: tuple[StorageRig, Any]) -> None:
    r, stub = rig
    v, source = attached(stub)  # not multiattach
    dest = migrate_to(stub, source)
    assert dest.state == pb.ATTACHMENT_STATE_ATTACHING
    assert dest.migration_source_id == source.id
    assert dest.domain == "vm1"  # the source's domain by default
    # the same export: target, LUN, CHAP; the destination's initiator is admitted too
    assert dest.connection_info.iscsi.paths == source.connection_info.iscsi.paths
    assert dest.connection_info.iscsi.chap.username == source.connection_info.iscsi.chap.username
    assert dest.connection_info.iscsi.initiator_iqn == HOST_B.initiator_iqn
    assert acl(r) == sorted([HOST_A.initiator_iqn, HOST_B.initiator_iqn])
    # a repeat returns the same attachment and connection info
    assert strip_times(migrate_to(stub, source)) == strip_times(dest)
    # an ordinary second attachment is still refused (not multiattach)
    assert (
        code_of(
            stub.CreateAttachment, spb.CreateAttachmentRequest(volume_id=v.id, connector=HOST_C, domain="x")
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )

    done = stub.CompleteMigration(
        spb.CompleteMigrationRequest(attachment_id=dest.id, target_dev="sdb")
    ).attachment
    assert done.state == pb.ATTACHMENT_STATE_ATTACHED
    assert done.migration_source_id == ""
    assert done.target_dev == "sdb"
    assert rows(stub, v.id) == [("host-b", pb.ATTACHMENT_STATE_ATTACHED, "")]
    assert acl(r) == [HOST_B.initiator_iqn]  # the source's ACL entry went, the target stayed
    assert stub.GetVolume(spb.GetVolumeRequest(volume_id=v.id)).volume.state == pb.VOLUME_STATE_IN_USE
    # a repeat returns it unchanged; a rollback of a completed migration is refused
    again = stub.CompleteMigration(spb.CompleteMigrationRequest(attachment_id=dest.id)).attachment
    assert strip_times(again) == strip_times(done)
    assert (
        code_of(stub.RollbackMigration, spb.RollbackMigrationRequest(attachment_id=dest.id))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    # and back: the destination is now an ordinary source
    back = migrate_to(stub, done, HOST_A)
    stub.CompleteMigration(spb.CompleteMigrationRequest(attachment_id=back.id))
    assert rows(stub, v.id) == [("host-a", pb.ATTACHMENT_STATE_ATTACHED, "")]
    assert acl(r) == [HOST_A.initiator_iqn]


def test_rollback_removes_only_the_destination(rig: tuple[StorageRig, Any]) -> None:
    r, stub = rig
    v, source = attached(stub)
    dest = migrate_to(stub, source)
    stub.RollbackMigration(spb.RollbackMigrationRequest(attachment_id=dest.id))
    assert rows(stub, v.id) == [("host-a", pb.ATTACHMENT_STATE_ATTACHED, "")]
    assert acl(r) == [HOST_A.initiator_iqn]
    got = stub.GetAttachment(spb.GetAttachmentRequest(attachment_id=source.id)).attachment
    assert got.connection_info == source.connection_info  # untouched: same target, CHAP
    # a repeat, or an unknown id, is OK
    stub.RollbackMigration(spb.RollbackMigrationRequest(attachment_id=dest.id))
    stub.RollbackMigration(spb.RollbackMigrationRequest(attachment_id="no-such-attachment"))
    # an ordinary attachment is never removed by a rollback
    assert (
        code_of(stub.RollbackMigration, spb.RollbackMigrationRequest(attachment_id=source.id))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    # a new migration may start again
    assert migrate_to(stub, source).migration_source_id == source.id


def test_at_most_one_pair_per_volume(rig: tuple[StorageRig, Any]) -> None:
    _, stub = rig
    v, source = attached(stub, multiattach=True)
    dest = migrate_to(stub, source)
    err = None
    try:
        migrate_to(stub, source, HOST_C)
    except grpc.RpcError as exc:
        err = exc
    assert err is not None
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already being migrated" in (err.details() or "")
    assert dest.id in (err.details() or "")
    # the destination itself cannot be the source of another migration before it completes
    assert (
        code_of(
            stub.CreateMigrationAttachment,
            spb.CreateMigrationAttachmentRequest(source_attachment_id=dest.id, connector=HOST_C),
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert len(rows(stub, v.id)) == 2


def test_completing_after_the_source_was_deleted_is_ok(rig: tuple[StorageRig, Any]) -> None:
    """The source host's agent finishing first (DeleteAttachment of its own) leaves the destination
    attachment, which completes alone; the export stays for it."""
    r, stub = rig
    v, source = attached(stub)
    dest = migrate_to(stub, source)
    stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=source.id))
    assert acl(r) == [HOST_B.initiator_iqn]
    done = stub.CompleteMigration(spb.CompleteMigrationRequest(attachment_id=dest.id)).attachment
    assert done.state == pb.ATTACHMENT_STATE_ATTACHED
    assert rows(stub, v.id) == [("host-b", pb.ATTACHMENT_STATE_ATTACHED, "")]


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (spb.CreateMigrationAttachmentRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (spb.CreateMigrationAttachmentRequest(source_attachment_id="nope"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            spb.CreateMigrationAttachmentRequest(source_attachment_id="nope", connector=HOST_B),
            grpc.StatusCode.NOT_FOUND,
        ),
        (spb.CompleteMigrationRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (spb.CompleteMigrationRequest(attachment_id="nope"), grpc.StatusCode.NOT_FOUND),
        (spb.RollbackMigrationRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_input(rig: tuple[StorageRig, Any], request_: Any, code: grpc.StatusCode) -> None:
    _, stub = rig
    name = type(request_).__name__.removesuffix("Request")
    assert code_of(getattr(stub, name), request_) == code


def test_source_must_be_attached_and_on_another_host(rig: tuple[StorageRig, Any]) -> None:
    _, stub = rig
    v = stub.CreateVolume(spb.CreateVolumeRequest(name="v", size_bytes=4 * MIB)).volume
    a = stub.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=v.id, connector=HOST_A, domain="vm1")
    ).attachment
    request = spb.CreateMigrationAttachmentRequest(source_attachment_id=a.id, connector=HOST_B)
    assert (
        code_of(stub.CreateMigrationAttachment, request) == grpc.StatusCode.FAILED_PRECONDITION
    )  # ATTACHING
    stub.CompleteAttachment(spb.CompleteAttachmentRequest(attachment_id=a.id))
    same_host = spb.CreateMigrationAttachmentRequest(source_attachment_id=a.id, connector=HOST_A)
    assert code_of(stub.CreateMigrationAttachment, same_host) == grpc.StatusCode.FAILED_PRECONDITION
    assert len(rows(stub, v.id)) == 1


def test_a_destination_the_exporter_cannot_admit_is_invalid_argument_and_changes_nothing(
    rig: tuple[StorageRig, Any],
) -> None:
    """An iSCSI export admits initiator IQNs: a destination that has only an NVMe host NQN is refused
    before anything is made (an nvmet export admits host NQNs: tests/unit/storagesvc/test_nvmet.py)."""
    r, stub = rig
    v, source = attached(stub)
    nvme_only = pb.Connector(
        host="host-b",
        nvme_host_nqn="nqn.2014-08.org.nvmexpress:uuid:6f1c0a4e-9d2b-4c1e-8a77-3e5d2c1b0a99",
        transports=[pb.TRANSPORT_NVME_TCP],
    )
    request = spb.CreateMigrationAttachmentRequest(source_attachment_id=source.id, connector=nvme_only)
    assert code_of(stub.CreateMigrationAttachment, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert rows(stub, v.id) == [("host-a", pb.ATTACHMENT_STATE_ATTACHED, "")]
    assert acl(r) == [HOST_A.initiator_iqn]
