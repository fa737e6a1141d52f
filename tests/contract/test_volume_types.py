"""Volume types and QoS specs through the generated stub against the real StorageService: every mutating
RPC twice gives the same result, bad specs get INVALID_ARGUMENT naming the key, a type in use cannot be
deleted, and a type's QoS specs reach the connection info of its volumes' attachments."""

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
GIB = 1 << 30
C = grpc.StatusCode
CONNECTOR = pb.Connector(host="host-a", initiator_iqn="iqn.2026-01.io.example:host-a")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[StorageRig, Any]]:
    r = StorageRig.make(tmp_path)
    try:
        for channel in _serve(storage_pb2_grpc.add_StorageServiceServicer_to_server, r.servicer):
            yield r, storage_pb2_grpc.StorageServiceStub(channel)
    finally:
        r.close()


def error(call: Any, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value


def no_time(m: Any) -> bytes:
    c = type(m)()
    c.CopyFrom(m)
    c.ClearField("update_time")
    return c.SerializeToString(deterministic=True)  # type: ignore[no-any-return]


def test_types_and_qos_specs_crud_and_repeats(rig: tuple[StorageRig, Any]) -> None:
    _, stub = rig
    qreq = spb.CreateQosSpecsRequest(name="silver", specs={"total_iops_sec": "500"})
    q1 = stub.CreateQosSpecs(qreq).qos_specs
    assert stub.CreateQosSpecs(qreq).qos_specs == q1  # a repeat returns the same specs
    assert q1.consumer == "front-end"
    assert error(stub.CreateQosSpecs, spb.CreateQosSpecsRequest(name="silver")).code() is C.ALREADY_EXISTS

    treq = spb.CreateVolumeTypeRequest(
        name="fast",
        description="thin iSCSI",
        extra_specs={"thin_provisioning": "<is> True"},
        qos_specs="silver",
    )
    t1 = stub.CreateVolumeType(treq).volume_type
    assert stub.CreateVolumeType(treq).volume_type == t1
    assert t1.qos_specs_id == q1.id
    assert not t1.is_default
    other = spb.CreateVolumeTypeRequest(name="fast", description="other")
    assert error(stub.CreateVolumeType, other).code() is C.ALREADY_EXISTS

    # by id or by name
    assert stub.GetVolumeType(spb.GetVolumeTypeRequest(volume_type="fast")).volume_type == t1
    assert stub.GetVolumeType(spb.GetVolumeTypeRequest(volume_type=t1.id)).volume_type == t1
    assert stub.GetQosSpecs(spb.GetQosSpecsRequest(qos_specs=q1.id)).qos_specs == q1
    assert error(stub.GetVolumeType, spb.GetVolumeTypeRequest(volume_type="none")).code() is C.NOT_FOUND

    # update: unset fields kept, repeat unchanged
    up = spb.UpdateVolumeTypeRequest(
        volume_type="fast", extra_specs=spb.ExtraSpecs(specs={"capabilities:transport": "s== iscsi"})
    )
    t2 = stub.UpdateVolumeType(up).volume_type
    assert dict(t2.extra_specs) == {"capabilities:transport": "s== iscsi"}
    assert t2.description == "thin iSCSI"
    assert stub.UpdateVolumeType(up).volume_type == t2
    q2 = stub.UpdateQosSpecs(
        spb.UpdateQosSpecsRequest(qos_specs="silver", specs=spb.QosLimits(specs={"read_iops_sec": "300"}))
    ).qos_specs
    assert dict(q2.specs) == {"read_iops_sec": "300"}
    assert q2.consumer == "front-end"

    # association: at most one, repeat unchanged, "" removes it
    stub.CreateQosSpecs(spb.CreateQosSpecsRequest(name="gold", specs={"total_bytes_sec": "1000000"}))
    assoc = spb.SetVolumeTypeQosSpecsRequest(volume_type="fast", qos_specs="gold")
    t3 = stub.SetVolumeTypeQosSpecs(assoc).volume_type
    assert no_time(stub.SetVolumeTypeQosSpecs(assoc).volume_type) == no_time(t3)
    gold = stub.GetQosSpecs(spb.GetQosSpecsRequest(qos_specs="gold")).qos_specs
    assert t3.qos_specs_id == gold.id
    # QoS specs in use by a type cannot go
    e = error(stub.DeleteQosSpecs, spb.DeleteQosSpecsRequest(qos_specs="gold"))
    assert e.code() is C.FAILED_PRECONDITION
    assert "fast" in (e.details() or "")
    stub.DeleteQosSpecs(spb.DeleteQosSpecsRequest(qos_specs="silver"))
    stub.DeleteQosSpecs(spb.DeleteQosSpecsRequest(qos_specs="silver"))  # a repeat: OK
    assert [q.name for q in stub.ListQosSpecs(spb.ListQosSpecsRequest()).qos_specs] == ["gold"]
    assert (
        stub.SetVolumeTypeQosSpecs(
            spb.SetVolumeTypeQosSpecsRequest(volume_type="fast")
        ).volume_type.qos_specs_id
        == ""
    )

    # list pages
    stub.CreateVolumeType(spb.CreateVolumeTypeRequest(name="plain"))
    first = stub.ListVolumeTypes(spb.ListVolumeTypesRequest(page_size=1))
    assert [t.name for t in first.volume_types] == ["fast"]
    second = stub.ListVolumeTypes(spb.ListVolumeTypesRequest(page_size=1, page_token=first.next_page_token))
    assert [t.name for t in second.volume_types] == ["plain"]

    stub.DeleteVolumeType(spb.DeleteVolumeTypeRequest(volume_type="plain"))
    stub.DeleteVolumeType(spb.DeleteVolumeTypeRequest(volume_type="plain"))  # a repeat: OK
    assert [t.name for t in stub.ListVolumeTypes(spb.ListVolumeTypesRequest()).volume_types] == ["fast"]


@pytest.mark.parametrize(
    ("request_", "key"),
    [
        (
            spb.CreateVolumeTypeRequest(name="t", extra_specs={"capabilities:iops": ">= many"}),
            "capabilities:iops",
        ),
        (spb.CreateVolumeTypeRequest(name="t", extra_specs={"multiattach": "<is> maybe"}), "multiattach"),
        (spb.CreateVolumeTypeRequest(name="t", extra_specs={"qos:iops": "5"}), "qos:iops"),
        (spb.CreateVolumeTypeRequest(name="t", extra_specs={"x": "<xor> 1"}), "x"),
        (spb.CreateQosSpecsRequest(name="q", specs={"total_iops": "5"}), "total_iops"),
        (spb.CreateQosSpecsRequest(name="q", specs={"read_iops_sec": "-5"}), "read_iops_sec"),
        (
            spb.CreateQosSpecsRequest(name="q", specs={"total_iops_sec": "5", "read_iops_sec": "5"}),
            "read_iops_sec",
        ),
        (
            spb.CreateQosSpecsRequest(name="q", specs={"total_iops_sec": "5", "total_iops_sec_per_gb": "1"}),
            "total_iops_sec_per_gb",
        ),
    ],
)
def test_bad_specs_are_invalid_argument_naming_the_key(
    rig: tuple[StorageRig, Any], request_: Any, key: str
) -> None:
    r, stub = rig
    call = stub.CreateVolumeType if isinstance(request_, spb.CreateVolumeTypeRequest) else stub.CreateQosSpecs
    e = error(call, request_)
    assert e.code() is C.INVALID_ARGUMENT
    assert f"[{key}]" in (e.details() or "")
    assert r.catalog.list_volume_types(after=None, limit=10) == []
    assert r.catalog.list_qos_specs(after=None, limit=10) == []
    bad_consumer = spb.CreateQosSpecsRequest(name="q", consumer="middle")
    assert "consumer" in (error(stub.CreateQosSpecs, bad_consumer).details() or "")


def test_a_type_shapes_its_volumes_and_its_qos_reaches_the_connection_info(
    rig: tuple[StorageRig, Any],
) -> None:
    r, stub = rig
    stub.CreateQosSpecs(
        spb.CreateQosSpecsRequest(
            name="lim", specs={"read_iops_sec": "400", "write_bytes_sec_per_gb": "1048576"}
        )
    )
    stub.CreateVolumeType(
        spb.CreateVolumeTypeRequest(name="shared", extra_specs={"multiattach": "<is> True"}, qos_specs="lim")
    )
    create = spb.CreateVolumeRequest(name="v", size_bytes=1536 * MIB, volume_type="shared")
    v = stub.CreateVolume(create).volume
    assert v.volume_type == "shared"
    assert v.multiattach  # the type says so, the request did not
    assert stub.CreateVolume(create).volume.id == v.id  # a repeat
    changed = spb.CreateVolumeRequest(name="v", size_bytes=1536 * MIB)
    assert error(stub.CreateVolume, changed).code() is C.ALREADY_EXISTS

    att = stub.CreateAttachment(spb.CreateAttachmentRequest(volume_id=v.id, connector=CONNECTOR)).attachment
    qos = att.connection_info.qos
    assert qos.read_iops_sec == 400
    assert qos.write_bytes_sec == 2 * MIB  # 1 MiB/s per GiB, 1.5 GiB rounded up to 2
    assert qos.total_iops_sec == 0
    # a repeat, and a read, give the same limits (they are recorded with the attachment)
    again = stub.CreateAttachment(spb.CreateAttachmentRequest(volume_id=v.id, connector=CONNECTOR))
    assert again.attachment.connection_info.qos == qos
    got = stub.GetAttachment(spb.GetAttachmentRequest(attachment_id=att.id)).attachment
    assert got.connection_info.qos == qos

    e = error(stub.DeleteVolumeType, spb.DeleteVolumeTypeRequest(volume_type="shared"))
    assert e.code() is C.FAILED_PRECONDITION
    assert "used by 1 volume" in (e.details() or "")

    # a volume without a type gets no limits
    plain = stub.CreateVolume(spb.CreateVolumeRequest(name="p", size_bytes=MIB)).volume
    assert plain.volume_type == ""
    att2 = stub.CreateAttachment(spb.CreateAttachmentRequest(volume_id=plain.id, connector=CONNECTOR))
    assert att2.attachment.connection_info.qos == pb.IoTune()

    # unknown type: NOT_FOUND, nothing made
    missing = spb.CreateVolumeRequest(name="m", size_bytes=MIB, volume_type="nope")
    assert error(stub.CreateVolume, missing).code() is C.NOT_FOUND
    assert r.catalog.volume_by_name("m") is None


def test_a_type_whose_specs_no_backend_meets_is_refused(rig: tuple[StorageRig, Any]) -> None:
    r, stub = rig
    stub.CreateVolumeType(spb.CreateVolumeTypeRequest(name="rbd-only", extra_specs={"kind": "rbd"}))
    e = error(stub.CreateVolume, spb.CreateVolumeRequest(name="v", size_bytes=MIB, volume_type="rbd-only"))
    assert e.code() is C.FAILED_PRECONDITION
    assert "without kind='rbd' (file)" in (e.details() or "")
    assert r.files() == []
    assert r.catalog.volume_by_name("v") is None
