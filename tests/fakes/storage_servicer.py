"""FakeStorageServicer: an in-memory StorageService for the SDK and CLI tiers.

It keeps the contract's visible behaviour (idempotency by name, NOT_FOUND, deletes of what is gone are
OK, FAILED_PRECONDITION for attached volumes and shrinking, paging) without any backend. Tests script
failures per method (`fail`), make a method wait until released (`hang`), and see every call (`calls`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from blockwire.v1 import storage_pb2, storage_pb2_grpc, types_pb2

MIB = 1024 * 1024


@dataclass
class Scripted:
    """Failures to answer before the real answer, per method name; `hang` methods wait for `release`."""

    fail: dict[str, list[tuple[grpc.StatusCode, str]]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, name: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append(name)
            queue = self.fail.get(name)
            failure = queue.pop(0) if queue else None
        if failure is not None:
            context.abort(failure[0], failure[1])
        if name in self.hang:
            self.release.wait(timeout=10.0)  # bounded: the client's deadline ends the call first

    def count(self, name: str) -> int:
        return self.calls.count(name)


class FakeStorageServicer(storage_pb2_grpc.StorageServiceServicer):
    def __init__(self, page_size: int = 2, image_steps: int = 3) -> None:
        self.script = Scripted()
        self.volumes: dict[str, types_pb2.Volume] = {}
        self.snapshots: dict[str, types_pb2.Snapshot] = {}
        self.attachments: dict[str, types_pb2.Attachment] = {}
        self.page_size = page_size
        self.image_steps = image_steps
        self._seq = 0
        self._lock = threading.Lock()

    def _id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq:04d}"

    # Volumes

    def CreateVolume(
        self, request: storage_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> storage_pb2.CreateVolumeResponse:
        self.script.enter("CreateVolume", context)
        if not request.name:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "name: required; 1-63 characters of [A-Za-z0-9._-]"
            )
        source = request.WhichOneof("source")
        if source is None and request.size_bytes == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "size_bytes: required without a source")
        if request.size_bytes % MIB:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "size_bytes: must be a multiple of 1 MiB")
        if source == "source_volume_id" and request.source_volume_id not in self.volumes:
            context.abort(grpc.StatusCode.NOT_FOUND, f"source volume {request.source_volume_id} not found")
        if source == "source_snapshot_id" and request.source_snapshot_id not in self.snapshots:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"source snapshot {request.source_snapshot_id} not found"
            )
        with self._lock:
            for v in self.volumes.values():
                if v.name == request.name:
                    if (
                        v.size_bytes != (request.size_bytes or v.size_bytes)
                        or v.multiattach != request.multiattach
                    ):
                        context.abort(
                            grpc.StatusCode.ALREADY_EXISTS,
                            f"volume name {request.name!r} is taken by {v.id} with other parameters",
                        )
                    return storage_pb2.CreateVolumeResponse(volume=v)
            size = request.size_bytes or 1024 * MIB
            volume = types_pb2.Volume(
                id=self._id("vol"),
                name=request.name,
                size_bytes=size,
                state=types_pb2.VOLUME_STATE_AVAILABLE,
                backend=request.backend or "file",
                multiattach=request.multiattach,
                labels=dict(request.labels),
                wwn=f"36001405{self._seq:024x}",
                serial=f"bw{self._seq:08d}",
            )
            volume.create_time.FromSeconds(1_760_000_000 + self._seq)
            volume.update_time.CopyFrom(volume.create_time)
            if source == "source_image":
                volume.source_image.CopyFrom(request.source_image)
                volume.state = types_pb2.VOLUME_STATE_CREATING
                volume.progress.total_bytes = size
            elif source == "source_volume_id":
                volume.source_volume_id = request.source_volume_id
            elif source == "source_snapshot_id":
                volume.source_snapshot_id = request.source_snapshot_id
            self.volumes[volume.id] = volume
            return storage_pb2.CreateVolumeResponse(volume=volume)

    def _volume(self, volume_id: str, context: grpc.ServicerContext) -> types_pb2.Volume:
        if not volume_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id: required")
        volume = self.volumes.get(volume_id)
        if volume is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"volume {volume_id} not found")
        return volume

    def GetVolume(
        self, request: storage_pb2.GetVolumeRequest, context: grpc.ServicerContext
    ) -> storage_pb2.GetVolumeResponse:
        self.script.enter("GetVolume", context)
        return storage_pb2.GetVolumeResponse(volume=self._volume(request.volume_id, context))

    def ListVolumes(
        self, request: storage_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> storage_pb2.ListVolumesResponse:
        self.script.enter("ListVolumes", context)
        selected = [
            v
            for v in self.volumes.values()
            if all(v.labels.get(k) == x for k, x in request.label_selector.items())
        ]
        start = int(request.page_token or 0)
        size = request.page_size or self.page_size
        page = selected[start : start + size]
        token = str(start + size) if start + size < len(selected) else ""
        return storage_pb2.ListVolumesResponse(volumes=page, next_page_token=token)

    def WatchVolume(
        self, request: storage_pb2.WatchVolumeRequest, context: grpc.ServicerContext
    ) -> Iterator[storage_pb2.WatchVolumeResponse]:
        self.script.enter("WatchVolume", context)
        volume = self._volume(request.volume_id, context)
        yield storage_pb2.WatchVolumeResponse(volume=volume)
        if volume.state != types_pb2.VOLUME_STATE_CREATING:
            return
        total = volume.progress.total_bytes
        for step in range(1, self.image_steps + 1):
            volume.progress.done_bytes = total * step // self.image_steps
            if step == self.image_steps:
                volume.state = types_pb2.VOLUME_STATE_AVAILABLE
            yield storage_pb2.WatchVolumeResponse(volume=volume)

    def DeleteVolume(
        self, request: storage_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> storage_pb2.DeleteVolumeResponse:
        self.script.enter("DeleteVolume", context)
        if not request.volume_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id: required")
        volume = self.volumes.get(request.volume_id)
        if volume is not None and volume.attachment_ids:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {volume.id} has attachments ({', '.join(volume.attachment_ids)}); detach it first",
            )
        self.volumes.pop(request.volume_id, None)
        return storage_pb2.DeleteVolumeResponse()

    def ExtendVolume(
        self, request: storage_pb2.ExtendVolumeRequest, context: grpc.ServicerContext
    ) -> storage_pb2.ExtendVolumeResponse:
        self.script.enter("ExtendVolume", context)
        if request.new_size_bytes % MIB:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "new_size_bytes: must be a multiple of 1 MiB")
        volume = self._volume(request.volume_id, context)
        if request.new_size_bytes < volume.size_bytes:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {volume.id} is {volume.size_bytes} bytes; volumes only grow",
            )
        volume.size_bytes = request.new_size_bytes
        return storage_pb2.ExtendVolumeResponse(volume=volume)

    # Snapshots

    def CreateSnapshot(
        self, request: storage_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> storage_pb2.CreateSnapshotResponse:
        self.script.enter("CreateSnapshot", context)
        if not request.name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        volume = self._volume(request.volume_id, context)
        for s in self.snapshots.values():
            if s.name == request.name:
                if s.volume_id != volume.id:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, f"snapshot name {request.name!r} is taken")
                return storage_pb2.CreateSnapshotResponse(snapshot=s)
        snapshot = types_pb2.Snapshot(
            id=self._id("snap"),
            name=request.name,
            volume_id=volume.id,
            size_bytes=volume.size_bytes,
            state=types_pb2.SNAPSHOT_STATE_AVAILABLE,
            labels=dict(request.labels),
        )
        self.snapshots[snapshot.id] = snapshot
        return storage_pb2.CreateSnapshotResponse(snapshot=snapshot)

    def GetSnapshot(
        self, request: storage_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> storage_pb2.GetSnapshotResponse:
        self.script.enter("GetSnapshot", context)
        snapshot = self.snapshots.get(request.snapshot_id)
        if snapshot is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"snapshot {request.snapshot_id} not found")
        return storage_pb2.GetSnapshotResponse(snapshot=snapshot)

    def ListSnapshots(
        self, request: storage_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> storage_pb2.ListSnapshotsResponse:
        self.script.enter("ListSnapshots", context)
        found = [
            s for s in self.snapshots.values() if not request.volume_id or s.volume_id == request.volume_id
        ]
        return storage_pb2.ListSnapshotsResponse(snapshots=found)

    def DeleteSnapshot(
        self, request: storage_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> storage_pb2.DeleteSnapshotResponse:
        self.script.enter("DeleteSnapshot", context)
        self.snapshots.pop(request.snapshot_id, None)
        return storage_pb2.DeleteSnapshotResponse()

    # Attachments

    def ListAttachments(
        self, request: storage_pb2.ListAttachmentsRequest, context: grpc.ServicerContext
    ) -> storage_pb2.ListAttachmentsResponse:
        self.script.enter("ListAttachments", context)
        found = [
            a
            for a in self.attachments.values()
            if (not request.volume_id or a.volume_id == request.volume_id)
            and (not request.host or a.connector.host == request.host)
        ]
        listed = []
        for a in found:
            copy = types_pb2.Attachment()
            copy.CopyFrom(a)
            copy.ClearField("connection_info")
            listed.append(copy)
        return storage_pb2.ListAttachmentsResponse(attachments=listed)

    def add_attachment(self, attachment: types_pb2.Attachment) -> None:
        """What an agent's attach leaves in storage: the attachment, and its id on the volume."""
        self.attachments[attachment.id] = attachment
        volume = self.volumes.get(attachment.volume_id)
        if volume is not None:
            volume.attachment_ids.append(attachment.id)
            volume.state = types_pb2.VOLUME_STATE_IN_USE

    def remove_attachment(self, attachment_id: str) -> None:
        attachment = self.attachments.pop(attachment_id, None)
        if attachment is None:
            return
        volume = self.volumes.get(attachment.volume_id)
        if volume is not None:
            ids = [i for i in volume.attachment_ids if i != attachment_id]
            del volume.attachment_ids[:]
            volume.attachment_ids.extend(ids)
            if not ids:
                volume.state = types_pb2.VOLUME_STATE_AVAILABLE

    # Capacity

    def GetCapacity(
        self, request: storage_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> storage_pb2.GetCapacityResponse:
        self.script.enter("GetCapacity", context)
        used = sum(v.size_bytes for v in self.volumes.values())
        backend = storage_pb2.BackendCapacity(
            backend="file",
            total_bytes=100 * 1024 * MIB,
            free_bytes=100 * 1024 * MIB - used,
            provisioned_bytes=used,
            max_volume_bytes=100 * 1024 * MIB - used,
        )
        if request.backend and request.backend != "file":
            context.abort(grpc.StatusCode.NOT_FOUND, f"backend {request.backend!r} not found")
        return storage_pb2.GetCapacityResponse(backends=[backend])
