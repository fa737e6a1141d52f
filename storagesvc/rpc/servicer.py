"""The StorageService servicer: validate -> convert -> domain call -> convert (STYLE.md).

Every exception is mapped to a status by `blockwire.status.abort_with`, nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from blockwire import convert as shared
from blockwire import validate
from blockwire.errors import InvalidArgument, NotFound
from blockwire.status import abort_with
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from storagesvc import paging
from storagesvc.model import Attachment, Page, Snapshot, Volume, VolumeType
from storagesvc.nodes import Cluster
from storagesvc.rpc import convert
from storagesvc.service import StorageService

T = TypeVar("T")
L = TypeVar("L", bound=paging.Listed)
M = TypeVar("M", bound=Message)

#: A list response stops taking items once their encoded size would pass this: gRPC clients refuse
#: messages over 4 MiB by default (RESOURCE_EXHAUSTED, which reads as "out of space"); the rest is room
#: for the page token and framing. Volumes carry up to 64 labels of 255 characters (~70 KB each).
MAX_PAGE_BYTES = 3 * 1024 * 1024
_ITEM_FRAMING = 6  # a repeated message field: its tag and its length varint (< 2^35)


def bounded(page: Page[L], to_pb: Callable[[L], M], max_bytes: int = MAX_PAGE_BYTES) -> tuple[list[M], str]:
    """The page's items as messages, cut where their encoded size would pass `max_bytes` (never below
    one item), and the token to go on with: the page's own, or the one after the last item kept. Every
    list RPC goes through here, so no page size or label size can make a response too big to receive."""
    out: list[M] = []
    total = 0
    for i, item in enumerate(page.items):
        message = to_pb(item)
        size = message.ByteSize() + _ITEM_FRAMING
        if out and total + size > max_bytes:
            return out, paging.after(page.items[i - 1])
        out.append(message)
        total += size
    return out, page.next_token


def _call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the one place exceptions become statuses
        abort_with(context, exc)


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """Serves blockwire.v1.StorageService on a `StorageService`."""

    def __init__(
        self, service: StorageService, *, watch_interval: float = 1.0, cluster: Cluster | None = None
    ) -> None:
        self.service = service
        self.watch_interval = watch_interval
        self.cluster = cluster or Cluster(service.catalog, service.pools, service.ctx.clock)

    def _volume(self, v: Volume) -> pb.Volume:
        """A volume with the node that serves it and whether that node is down (Volume.node)."""
        m = convert.volume_to_pb(v)
        m.node, m.node_down = self.cluster.volume_node(v.backend)
        return m

    def CreateVolume(
        self, request: spb.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> spb.CreateVolumeResponse:
        v = _call(context, lambda: self.service.create_volume(convert.create_volume_from_pb(request)))
        return spb.CreateVolumeResponse(volume=self._volume(v))

    def GetVolume(
        self, request: spb.GetVolumeRequest, context: grpc.ServicerContext
    ) -> spb.GetVolumeResponse:
        v = _call(context, lambda: self.service.get_volume(request.volume_id))
        return spb.GetVolumeResponse(volume=self._volume(v))

    def ListVolumes(
        self, request: spb.ListVolumesRequest, context: grpc.ServicerContext
    ) -> spb.ListVolumesResponse:
        page = _call(
            context,
            lambda: self.service.list_volumes(
                request.page_size,
                request.page_token,
                validate.labels(request.label_selector, "label_selector"),
            ),
        )
        volumes, token = bounded(page, self._volume)
        return spb.ListVolumesResponse(volumes=volumes, next_page_token=token)

    def WatchVolume(
        self, request: spb.WatchVolumeRequest, context: grpc.ServicerContext
    ) -> Iterator[spb.WatchVolumeResponse]:
        stream = _call(
            context,
            lambda: self.service.watch_volume(
                request.volume_id, active=context.is_active, interval=self.watch_interval
            ),
        )
        first = _call(context, lambda: next(stream))
        yield spb.WatchVolumeResponse(volume=self._volume(first))
        while True:
            v = _call(context, lambda: next(stream, None))
            if v is None:
                return
            yield spb.WatchVolumeResponse(volume=self._volume(v))

    def DeleteVolume(
        self, request: spb.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> spb.DeleteVolumeResponse:
        _call(context, lambda: self.service.delete_volume(request.volume_id))
        return spb.DeleteVolumeResponse()

    def ExtendVolume(
        self, request: spb.ExtendVolumeRequest, context: grpc.ServicerContext
    ) -> spb.ExtendVolumeResponse:
        v = _call(context, lambda: self.service.extend_volume(request.volume_id, request.new_size_bytes))
        return spb.ExtendVolumeResponse(volume=self._volume(v))

    def CreateSnapshot(
        self, request: spb.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> spb.CreateSnapshotResponse:
        s = _call(
            context,
            lambda: self.service.create_snapshot(request.volume_id, request.name, dict(request.labels)),
        )
        return spb.CreateSnapshotResponse(snapshot=convert.snapshot_to_pb(s))

    def GetSnapshot(
        self, request: spb.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> spb.GetSnapshotResponse:
        s = _call(context, lambda: self.service.get_snapshot(request.snapshot_id))
        return spb.GetSnapshotResponse(snapshot=convert.snapshot_to_pb(s))

    def ListSnapshots(
        self, request: spb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> spb.ListSnapshotsResponse:
        def list_snapshots() -> Page[Snapshot]:
            if request.volume_id:
                validate.object_id(request.volume_id, "volume_id")
            return self.service.list_snapshots(request.volume_id, request.page_size, request.page_token)

        page = _call(context, list_snapshots)
        snapshots, token = bounded(page, convert.snapshot_to_pb)
        return spb.ListSnapshotsResponse(snapshots=snapshots, next_page_token=token)

    def DeleteSnapshot(
        self, request: spb.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> spb.DeleteSnapshotResponse:
        _call(context, lambda: self.service.delete_snapshot(request.snapshot_id))
        return spb.DeleteSnapshotResponse()

    def CreateAttachment(
        self, request: spb.CreateAttachmentRequest, context: grpc.ServicerContext
    ) -> spb.CreateAttachmentResponse:
        def create() -> Attachment:
            if request.transport not in (pb.TRANSPORT_UNSPECIFIED, pb.TRANSPORT_ISCSI, pb.TRANSPORT_RBD):
                raise InvalidArgument("transport", "this service attaches over iSCSI or RBD only")
            wanted = (
                shared.transport_from_pb(request.transport)
                if request.transport != pb.TRANSPORT_UNSPECIFIED
                else None
            )
            if not request.HasField("connector"):
                raise InvalidArgument("connector", "required")
            connector = shared.connector_from_pb(request.connector)
            mode = shared.access_mode_from_pb(request.access_mode)
            validate.domain(request.domain, required=False)
            return self.service.create_attachment(
                request.volume_id, connector, mode, request.domain, transport=wanted
            )

        a = _call(context, create)
        return spb.CreateAttachmentResponse(attachment=convert.attachment_to_pb(a))

    def CompleteAttachment(
        self, request: spb.CompleteAttachmentRequest, context: grpc.ServicerContext
    ) -> spb.CompleteAttachmentResponse:
        def complete() -> Attachment:
            validate.text(request.target_dev, "target_dev")
            validate.text(request.host_device, "host_device", validate.MAX_PATH)
            return self.service.complete_attachment(
                request.attachment_id, request.target_dev, request.host_device
            )

        a = _call(context, complete)
        return spb.CompleteAttachmentResponse(attachment=convert.attachment_to_pb(a))

    def DeleteAttachment(
        self, request: spb.DeleteAttachmentRequest, context: grpc.ServicerContext
    ) -> spb.DeleteAttachmentResponse:
        _call(context, lambda: self.service.delete_attachment(request.attachment_id))
        return spb.DeleteAttachmentResponse()

    def CreateMigrationAttachment(
        self, request: spb.CreateMigrationAttachmentRequest, context: grpc.ServicerContext
    ) -> spb.CreateMigrationAttachmentResponse:
        def create() -> Attachment:
            if not request.HasField("connector"):
                raise InvalidArgument("connector", "required")
            connector = shared.connector_from_pb(request.connector)
            return self.service.create_migration_attachment(
                request.source_attachment_id, connector, request.domain
            )

        a = _call(context, create)
        return spb.CreateMigrationAttachmentResponse(attachment=convert.attachment_to_pb(a))

    def CompleteMigration(
        self, request: spb.CompleteMigrationRequest, context: grpc.ServicerContext
    ) -> spb.CompleteMigrationResponse:
        def complete() -> Attachment:
            validate.text(request.target_dev, "target_dev")
            validate.text(request.host_device, "host_device", validate.MAX_PATH)
            return self.service.complete_migration(
                request.attachment_id, request.target_dev, request.host_device
            )

        a = _call(context, complete)
        return spb.CompleteMigrationResponse(attachment=convert.attachment_to_pb(a))

    def RollbackMigration(
        self, request: spb.RollbackMigrationRequest, context: grpc.ServicerContext
    ) -> spb.RollbackMigrationResponse:
        _call(context, lambda: self.service.rollback_migration(request.attachment_id))
        return spb.RollbackMigrationResponse()

    def GetAttachment(
        self, request: spb.GetAttachmentRequest, context: grpc.ServicerContext
    ) -> spb.GetAttachmentResponse:
        a = _call(context, lambda: self.service.get_attachment(request.attachment_id))
        return spb.GetAttachmentResponse(attachment=convert.attachment_to_pb(a))

    def ListAttachments(
        self, request: spb.ListAttachmentsRequest, context: grpc.ServicerContext
    ) -> spb.ListAttachmentsResponse:
        def list_attachments() -> Page[Attachment]:
            if request.volume_id:
                validate.object_id(request.volume_id, "volume_id")
            if request.host:
                validate.host(request.host, "host")
            return self.service.list_attachments(
                request.volume_id, request.host, request.page_size, request.page_token
            )

        page = _call(context, list_attachments)
        attachments, token = bounded(page, lambda a: convert.attachment_to_pb(a, with_connection=False))
        return spb.ListAttachmentsResponse(attachments=attachments, next_page_token=token)

    def GetCapacity(
        self, request: spb.GetCapacityRequest, context: grpc.ServicerContext
    ) -> spb.GetCapacityResponse:
        def capacity() -> list[spb.BackendCapacity]:
            if request.backend:
                validate.name(request.backend, "backend")
            if request.node:
                validate.name(request.node, "node")
            if not self.cluster.multi:
                if request.node:
                    raise NotFound(f"storage node {request.node} is not registered: this is a single node")
                return [convert.capacity_to_pb(c) for c in self.service.capacity(request.backend)]
            out = []
            for cap, node, down, is_shared in self.cluster.capacity(request.backend, request.node):
                m = convert.capacity_to_pb(cap)
                m.node, m.node_down, m.shared = node, down, is_shared
                out.append(m)
            return out

        return spb.GetCapacityResponse(backends=_call(context, capacity))

    def ListStorageNodes(
        self, request: spb.ListStorageNodesRequest, context: grpc.ServicerContext
    ) -> spb.ListStorageNodesResponse:
        cluster = self.cluster
        nodes = _call(context, lambda: cluster.nodes(fresh=True))
        return spb.ListStorageNodesResponse(
            nodes=[convert.storage_node_to_pb(n, cluster.up(n)) for n in nodes]
        )

    def GetBackendStats(
        self, request: spb.GetBackendStatsRequest, context: grpc.ServicerContext
    ) -> spb.GetBackendStatsResponse:
        backends, operations = _call(context, self.service.backend_stats)
        return spb.GetBackendStatsResponse(
            backends=[convert.backend_stats_to_pb(b) for b in backends],
            operations=[convert.operation_stats_to_pb(o) for o in operations],
        )

    # -- volume types and QoS specs

    def _type_pb(self, t: VolumeType) -> pb.VolumeType:
        return convert.volume_type_to_pb(t, self.service.ctx.scheduler.default_volume_type)

    def CreateVolumeType(
        self, request: spb.CreateVolumeTypeRequest, context: grpc.ServicerContext
    ) -> spb.CreateVolumeTypeResponse:
        t = _call(
            context,
            lambda: self.service.create_volume_type(
                request.name, request.description, dict(request.extra_specs), request.qos_specs
            ),
        )
        return spb.CreateVolumeTypeResponse(volume_type=self._type_pb(t))

    def GetVolumeType(
        self, request: spb.GetVolumeTypeRequest, context: grpc.ServicerContext
    ) -> spb.GetVolumeTypeResponse:
        t = _call(context, lambda: self.service.get_volume_type(request.volume_type))
        return spb.GetVolumeTypeResponse(volume_type=self._type_pb(t))

    def ListVolumeTypes(
        self, request: spb.ListVolumeTypesRequest, context: grpc.ServicerContext
    ) -> spb.ListVolumeTypesResponse:
        page = _call(context, lambda: self.service.list_volume_types(request.page_size, request.page_token))
        types, token = bounded(page, self._type_pb)
        return spb.ListVolumeTypesResponse(volume_types=types, next_page_token=token)

    def UpdateVolumeType(
        self, request: spb.UpdateVolumeTypeRequest, context: grpc.ServicerContext
    ) -> spb.UpdateVolumeTypeResponse:
        description = request.description if request.HasField("description") else None
        specs = dict(request.extra_specs.specs) if request.HasField("extra_specs") else None
        t = _call(context, lambda: self.service.update_volume_type(request.volume_type, description, specs))
        return spb.UpdateVolumeTypeResponse(volume_type=self._type_pb(t))

    def DeleteVolumeType(
        self, request: spb.DeleteVolumeTypeRequest, context: grpc.ServicerContext
    ) -> spb.DeleteVolumeTypeResponse:
        _call(context, lambda: self.service.delete_volume_type(request.volume_type))
        return spb.DeleteVolumeTypeResponse()

    def SetVolumeTypeQosSpecs(
        self, request: spb.SetVolumeTypeQosSpecsRequest, context: grpc.ServicerContext
    ) -> spb.SetVolumeTypeQosSpecsResponse:
        t = _call(context, lambda: self.service.set_volume_type_qos(request.volume_type, request.qos_specs))
        return spb.SetVolumeTypeQosSpecsResponse(volume_type=self._type_pb(t))

    def CreateQosSpecs(
        self, request: spb.CreateQosSpecsRequest, context: grpc.ServicerContext
    ) -> spb.CreateQosSpecsResponse:
        q = _call(
            context,
            lambda: self.service.create_qos_specs(request.name, request.consumer, dict(request.specs)),
        )
        return spb.CreateQosSpecsResponse(qos_specs=convert.qos_specs_to_pb(q))

    def GetQosSpecs(
        self, request: spb.GetQosSpecsRequest, context: grpc.ServicerContext
    ) -> spb.GetQosSpecsResponse:
        q = _call(context, lambda: self.service.get_qos_specs(request.qos_specs))
        return spb.GetQosSpecsResponse(qos_specs=convert.qos_specs_to_pb(q))

    def ListQosSpecs(
        self, request: spb.ListQosSpecsRequest, context: grpc.ServicerContext
    ) -> spb.ListQosSpecsResponse:
        page = _call(context, lambda: self.service.list_qos_specs(request.page_size, request.page_token))
        specs, token = bounded(page, convert.qos_specs_to_pb)
        return spb.ListQosSpecsResponse(qos_specs=specs, next_page_token=token)

    def UpdateQosSpecs(
        self, request: spb.UpdateQosSpecsRequest, context: grpc.ServicerContext
    ) -> spb.UpdateQosSpecsResponse:
        specs = dict(request.specs.specs) if request.HasField("specs") else None
        q = _call(context, lambda: self.service.update_qos_specs(request.qos_specs, request.consumer, specs))
        return spb.UpdateQosSpecsResponse(qos_specs=convert.qos_specs_to_pb(q))

    def DeleteQosSpecs(
        self, request: spb.DeleteQosSpecsRequest, context: grpc.ServicerContext
    ) -> spb.DeleteQosSpecsResponse:
        _call(context, lambda: self.service.delete_qos_specs(request.qos_specs))
        return spb.DeleteQosSpecsResponse()
