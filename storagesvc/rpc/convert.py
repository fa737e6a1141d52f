"""StorageService messages <-> storagesvc.model values. Shared wire types go through blockwire.convert."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from blockwire import convert as shared
from blockwire import validate
from blockwire.errors import InvalidArgument
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from storagesvc.model import (
    Attachment,
    AttachmentState,
    BackendStats,
    Capacity,
    CreateVolumeSpec,
    ImageFormat,
    ImageSource,
    OperationStats,
    QosSpecs,
    Snapshot,
    SnapshotState,
    StorageNode,
    Volume,
    VolumeSource,
    VolumeState,
    VolumeType,
)

_VOLUME_STATES = {
    VolumeState.CREATING: pb.VOLUME_STATE_CREATING,
    VolumeState.AVAILABLE: pb.VOLUME_STATE_AVAILABLE,
    VolumeState.RESERVED: pb.VOLUME_STATE_RESERVED,
    VolumeState.ATTACHING: pb.VOLUME_STATE_ATTACHING,
    VolumeState.IN_USE: pb.VOLUME_STATE_IN_USE,
    VolumeState.DETACHING: pb.VOLUME_STATE_DETACHING,
    VolumeState.EXTENDING: pb.VOLUME_STATE_EXTENDING,
    VolumeState.DELETING: pb.VOLUME_STATE_DELETING,
    VolumeState.ERROR: pb.VOLUME_STATE_ERROR,
}
_SNAPSHOT_STATES = {
    SnapshotState.CREATING: pb.SNAPSHOT_STATE_CREATING,
    SnapshotState.AVAILABLE: pb.SNAPSHOT_STATE_AVAILABLE,
    SnapshotState.DELETING: pb.SNAPSHOT_STATE_DELETING,
    SnapshotState.ERROR: pb.SNAPSHOT_STATE_ERROR,
}
_ATTACHMENT_STATES = {
    AttachmentState.RESERVED: pb.ATTACHMENT_STATE_RESERVED,
    AttachmentState.ATTACHING: pb.ATTACHMENT_STATE_ATTACHING,
    AttachmentState.ATTACHED: pb.ATTACHMENT_STATE_ATTACHED,
    AttachmentState.DETACHING: pb.ATTACHMENT_STATE_DETACHING,
    AttachmentState.ERROR: pb.ATTACHMENT_STATE_ERROR,
}
_IMAGE_FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: ImageFormat.PROBE,
    pb.IMAGE_FORMAT_RAW: ImageFormat.RAW,
    pb.IMAGE_FORMAT_QCOW2: ImageFormat.QCOW2,
}
_IMAGE_FORMATS_PB = {v: k for k, v in _IMAGE_FORMATS.items()}


def _ts(t: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def image_from_pb(m: pb.ImageSource) -> ImageSource:
    try:
        fmt = _IMAGE_FORMATS[m.format]
    except KeyError:
        raise InvalidArgument("source_image.format", f"unknown image format {m.format}") from None
    return ImageSource(path=validate.path(m.path, "source_image.path"), format=fmt)


def create_volume_from_pb(m: spb.CreateVolumeRequest) -> CreateVolumeSpec:
    which = m.WhichOneof("source")
    source = VolumeSource()
    if which == "source_snapshot_id":
        source = VolumeSource(snapshot_id=validate.object_id(m.source_snapshot_id, "source_snapshot_id"))
    elif which == "source_volume_id":
        source = VolumeSource(volume_id=validate.object_id(m.source_volume_id, "source_volume_id"))
    elif which == "source_image":
        source = VolumeSource(image=image_from_pb(m.source_image))
    if m.backend:
        validate.name(m.backend, "backend")
    return CreateVolumeSpec(
        name=m.name,
        size_bytes=m.size_bytes,
        backend=m.backend,
        multiattach=m.multiattach,
        labels=dict(m.labels),
        source=source,
        encrypted=m.encrypted,
        key_size_bits=m.key_size_bits,
        volume_type=m.volume_type,
    )


def volume_to_pb(v: Volume) -> pb.Volume:
    m = pb.Volume(
        id=v.id,
        name=v.name,
        size_bytes=v.size_bytes,
        state=_VOLUME_STATES[v.state],
        backend=v.backend,
        multiattach=v.multiattach,
        labels=dict(v.labels),
        wwn=v.wwn,
        serial=v.serial,
        attachment_ids=list(v.attachment_ids),
        progress=pb.Progress(done_bytes=v.progress.done_bytes, total_bytes=v.progress.total_bytes),
        error_message=v.error_message,
        create_time=_ts(v.create_time),
        update_time=_ts(v.update_time),
    )
    if v.source.snapshot_id:
        m.source_snapshot_id = v.source.snapshot_id
    elif v.source.volume_id:
        m.source_volume_id = v.source.volume_id
    elif v.source.image is not None:
        m.source_image.CopyFrom(
            pb.ImageSource(path=v.source.image.path, format=_IMAGE_FORMATS_PB[v.source.image.format])
        )
    if v.encryption is not None:
        m.encryption.CopyFrom(shared.encryption_to_pb(v.encryption, with_secrets=False))
    m.volume_type = v.volume_type
    return m


def volume_type_to_pb(t: VolumeType, default_type: str = "") -> pb.VolumeType:
    return pb.VolumeType(
        id=t.id,
        name=t.name,
        description=t.description,
        extra_specs=dict(t.extra_specs),
        qos_specs_id=t.qos_specs_id,
        is_default=bool(default_type) and t.name == default_type,
        create_time=_ts(t.create_time),
        update_time=_ts(t.update_time),
    )


def qos_specs_to_pb(q: QosSpecs) -> pb.QosSpecs:
    return pb.QosSpecs(
        id=q.id,
        name=q.name,
        consumer=q.consumer,
        specs=dict(q.specs),
        create_time=_ts(q.create_time),
        update_time=_ts(q.update_time),
    )


def snapshot_to_pb(s: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(
        id=s.id,
        name=s.name,
        volume_id=s.volume_id,
        size_bytes=s.size_bytes,
        state=_SNAPSHOT_STATES[s.state],
        labels=dict(s.labels),
        error_message=s.error_message,
        create_time=_ts(s.create_time),
    )


def attachment_to_pb(a: Attachment, *, with_connection: bool = True) -> pb.Attachment:
    m = pb.Attachment(
        id=a.id,
        volume_id=a.volume_id,
        connector=shared.connector_to_pb(a.connector),
        access_mode=shared.access_mode_to_pb(a.access_mode),
        state=_ATTACHMENT_STATES[a.state],
        domain=a.domain,
        target_dev=a.target_dev,
        host_device=a.host_device,
        error_message=a.error_message,
        create_time=_ts(a.create_time),
        update_time=_ts(a.update_time),
        migration_source_id=a.migration_source_id,
    )
    if with_connection and a.connection_info is not None:
        m.connection_info.CopyFrom(shared.connection_info_to_pb(a.connection_info))
    return m


def capacity_to_pb(c: Capacity) -> spb.BackendCapacity:
    return spb.BackendCapacity(
        backend=c.backend,
        total_bytes=c.total_bytes,
        free_bytes=c.free_bytes,
        provisioned_bytes=c.provisioned_bytes,
        max_volume_bytes=c.max_volume_bytes,
    )


def backend_stats_to_pb(b: BackendStats) -> spb.BackendStats:
    return spb.BackendStats(
        backend=b.backend,
        kind=b.kind,
        exporter=b.exporter,
        volume_count=b.volume_count,
        snapshot_count=b.snapshot_count,
        export_count=b.export_count,
        portals=list(b.portals),
        healthy=b.healthy,
    )


def operation_stats_to_pb(o: OperationStats) -> spb.OperationStats:
    return spb.OperationStats(
        operation=o.operation,
        count=o.count,
        errors=o.errors,
        p50_micros=o.p50_micros,
        p95_micros=o.p95_micros,
    )


def storage_node_to_pb(n: StorageNode, up: bool) -> spb.StorageNode:
    return spb.StorageNode(
        name=n.name,
        address=n.address,
        up=up,
        last_heartbeat=_ts(n.heartbeat),
        start_time=_ts(n.start_time),
        backends=[
            spb.StorageNodeBackend(
                name=b.name,
                kind=b.kind,
                shared=b.shared,
                healthy=b.healthy,
                total_bytes=b.total_bytes,
                free_bytes=b.free_bytes,
                provisioned_bytes=b.provisioned_bytes,
                volume_count=b.volume_count,
                capabilities=dict(b.capabilities),
            )
            for b in n.backends
        ],
    )
