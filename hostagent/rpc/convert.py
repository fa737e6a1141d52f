"""HostAgentService messages <-> hostagent values. Shared wire types go through blockwire.convert."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from blockwire import convert
from blockwire.errors import InvalidArgument
from blockwire.model import Connector
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import types_pb2 as pb
from hostagent.model import (
    AttachmentState,
    Bus,
    Cache,
    Discard,
    DiskOptions,
    Event,
    EventType,
    HostDevice,
    Io,
    JournalRecord,
)

T = TypeVar("T")

_BUS = {pb.DISK_BUS_VIRTIO: Bus.VIRTIO, pb.DISK_BUS_SCSI: Bus.SCSI, pb.DISK_BUS_SATA: Bus.SATA}
_CACHE = {
    pb.DISK_CACHE_NONE: Cache.NONE,
    pb.DISK_CACHE_WRITETHROUGH: Cache.WRITETHROUGH,
    pb.DISK_CACHE_WRITEBACK: Cache.WRITEBACK,
    pb.DISK_CACHE_DIRECTSYNC: Cache.DIRECTSYNC,
    pb.DISK_CACHE_UNSAFE: Cache.UNSAFE,
}
_IO = {pb.DISK_IO_NATIVE: Io.NATIVE, pb.DISK_IO_THREADS: Io.THREADS, pb.DISK_IO_IO_URING: Io.IO_URING}
_DISCARD = {pb.DISK_DISCARD_IGNORE: Discard.IGNORE, pb.DISK_DISCARD_UNMAP: Discard.UNMAP}
_STATE = {
    AttachmentState.ATTACHING: pb.ATTACHMENT_STATE_ATTACHING,
    AttachmentState.ATTACHED: pb.ATTACHMENT_STATE_ATTACHED,
    AttachmentState.DETACHING: pb.ATTACHMENT_STATE_DETACHING,
    AttachmentState.ERROR: pb.ATTACHMENT_STATE_ERROR,
    AttachmentState.MIGRATING: pb.ATTACHMENT_STATE_MIGRATING,
}


def _pick(table: Mapping[Any, T], value: int, field: str) -> T | None:
    """None for UNSPECIFIED (the caller's default applies)."""
    if value == 0:
        return None
    if value not in table:
        raise InvalidArgument(field, f"unknown value {value}")
    return table[value]


def disk_options_from_pb(m: pb.DiskOptions) -> DiskOptions:
    return DiskOptions(
        bus=_pick(_BUS, m.bus, "disk.bus") or Bus.SCSI,
        cache=_pick(_CACHE, m.cache, "disk.cache") or Cache.NONE,
        io=_pick(_IO, m.io, "disk.io"),
        discard=_pick(_DISCARD, m.discard, "disk.discard"),
        iotune=convert.iotune_from_pb(m.iotune),
        serial=m.serial,
        read_only=m.read_only,
        shareable=m.shareable,
        target_dev=m.target_dev,
        logical_block_size=m.logical_block_size,
        physical_block_size=m.physical_block_size,
        boot_order=m.boot_order,
    )


def host_device_to_pb(d: HostDevice) -> pb.HostDevice:
    return pb.HostDevice(
        path=d.path,
        wwn=d.wwn,
        size_bytes=d.size_bytes,
        multipath_name=d.multipath_name,
        path_devices=list(d.path_devices),
        qemu_native=d.qemu_native,
    )


def attachment_to_pb(a: JournalRecord, connector: Connector) -> pb.Attachment:
    m = pb.Attachment(
        id=a.attachment_id,
        volume_id=a.volume_id,
        connector=convert.connector_to_pb(connector),
        access_mode=convert.access_mode_to_pb(a.access_mode),
        state=_STATE[a.state],
        connection_info=convert.connection_info_to_pb(a.connection_info, with_secrets=False),
        domain=a.domain,
        target_dev=a.target_dev,
        host_device=a.host_device,
        error_message=a.error_message,
        migration_source_id=a.migration_source_id,
    )
    if a.create_time is not None:
        m.create_time.FromDatetime(a.create_time)
    if a.update_time is not None:
        m.update_time.FromDatetime(a.update_time)
    return m


def event_to_pb(e: Event) -> hpb.WatchEventsResponse:
    ts = Timestamp()
    ts.FromDatetime(e.time)
    return hpb.WatchEventsResponse(
        type=e.type.value,  # type: ignore[arg-type]
        time=ts,
        volume_id=e.volume_id,
        domain=e.domain,
        attachment_id=e.attachment_id,
        path=e.path,
        step=e.step,
        message=e.message,
    )


def event_types_from_pb(values: list[int]) -> set[EventType]:
    out = set()
    for v in values:
        try:
            out.add(EventType(v))
        except ValueError:
            raise InvalidArgument("types", f"unknown event type {v}") from None
    return out
