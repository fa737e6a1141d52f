"""FakeAgentServicer: an in-memory HostAgentService for the SDK and CLI tiers.

Attach and detach record attachments (and, given a FakeStorageServicer, the storage side too) and emit
the events a real agent emits, PROGRESS steps included, to every WatchEvents stream. With
`wait_for_watchers`, AttachVolume and DetachVolume wait (bounded) until a stream opened after the previous
call is there (the previous call's stream may not have been torn down yet), so that tests
of progress display are deterministic.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from blockwire.v1 import hostagent_pb2, hostagent_pb2_grpc, types_pb2
from tests.fakes.storage_servicer import FakeStorageServicer, Scripted

STEPS = ("login", "scan", "udev", "multipath", "hotplug")
CHAP_PASSWORD = "s3cret-chap-pw"


class FakeAgentServicer(hostagent_pb2_grpc.HostAgentServiceServicer):
    def __init__(
        self,
        storage: FakeStorageServicer | None = None,
        domains: tuple[str, ...] = ("vm1", "vm2"),
        wait_for_watchers: bool = False,
    ) -> None:
        self.script = Scripted()
        self.storage = storage
        self.domains = set(domains)
        self.wait_for_watchers = wait_for_watchers
        self.attachments: dict[tuple[str, str], types_pb2.Attachment] = {}
        self.connector = types_pb2.Connector(
            host="compute1",
            ips=["192.0.2.10"],
            initiator_iqn="iqn.2004-10.com.example:compute1",
            multipath=True,
            transports=[types_pb2.TRANSPORT_ISCSI],
            kernel_iscsi=False,
            platform="x86_64",
        )
        self._watchers: list[queue.Queue[hostagent_pb2.WatchEventsResponse]] = []
        self._watching = threading.Condition()
        self._registered = 0  # streams ever opened
        self._claimed = 0  # streams already waited for by an earlier call
        self._seq = 0

    def _emit(self, **fields: object) -> None:
        event = hostagent_pb2.WatchEventsResponse(**fields)  # type: ignore[arg-type]
        with self._watching:
            for q in self._watchers:
                q.put(event)

    def _await_watcher(self) -> None:
        if self.wait_for_watchers:
            with self._watching:
                self._watching.wait_for(lambda: self._registered > self._claimed, timeout=5.0)
                self._claimed = self._registered

    def GetConnector(
        self, request: hostagent_pb2.GetConnectorRequest, context: grpc.ServicerContext
    ) -> hostagent_pb2.GetConnectorResponse:
        self.script.enter("GetConnector", context)
        return hostagent_pb2.GetConnectorResponse(connector=self.connector)

    def AttachVolume(
        self, request: hostagent_pb2.AttachVolumeRequest, context: grpc.ServicerContext
    ) -> hostagent_pb2.AttachVolumeResponse:
        self.script.enter("AttachVolume", context)
        if not request.domain:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "domain: required")
        if request.WhichOneof("volume") != "volume_id":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id: required (the fake takes ids only)")
        if request.domain not in self.domains:
            context.abort(grpc.StatusCode.NOT_FOUND, f"domain {request.domain!r} not found")
        if self.storage is not None and request.volume_id not in self.storage.volumes:
            context.abort(grpc.StatusCode.NOT_FOUND, f"volume {request.volume_id} not found")
        key = (request.domain, request.volume_id)
        if key in self.attachments:
            return hostagent_pb2.AttachVolumeResponse(attachment=self.attachments[key])
        self._await_watcher()
        ids = {"volume_id": request.volume_id, "domain": request.domain}
        self._emit(type=hostagent_pb2.EVENT_TYPE_ATTACH_STARTED, **ids)
        for step in STEPS:
            self._emit(type=hostagent_pb2.EVENT_TYPE_PROGRESS, step=step, **ids)
        self._seq += 1
        attachment = types_pb2.Attachment(
            id=f"att-{self._seq:04d}",
            volume_id=request.volume_id,
            connector=self.connector,
            access_mode=request.access_mode or types_pb2.ACCESS_MODE_READ_WRITE,
            state=types_pb2.ATTACHMENT_STATE_ATTACHED,
            domain=request.domain,
            target_dev=request.disk.target_dev or f"sd{chr(ord('a') + self._seq)}",
        )
        info = attachment.connection_info
        info.volume_id = request.volume_id
        info.iscsi.paths.add(portal="192.0.2.1:3260", target_iqn="iqn.2026-01.io.blockwire:vol", lun=1)
        info.iscsi.chap.username = "user1"
        info.iscsi.chap.password = CHAP_PASSWORD
        self.attachments[key] = attachment
        if self.storage is not None:
            stored = types_pb2.Attachment()
            stored.CopyFrom(attachment)
            self.storage.add_attachment(stored)
        self._emit(type=hostagent_pb2.EVENT_TYPE_ATTACHED, attachment_id=attachment.id, **ids)
        return hostagent_pb2.AttachVolumeResponse(attachment=attachment)

    def DetachVolume(
        self, request: hostagent_pb2.DetachVolumeRequest, context: grpc.ServicerContext
    ) -> hostagent_pb2.DetachVolumeResponse:
        self.script.enter("DetachVolume", context)
        if not request.domain or not request.volume_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "domain and volume_id: required")
        attachment = self.attachments.pop((request.domain, request.volume_id), None)
        if attachment is not None:
            self._await_watcher()
            ids = {"volume_id": request.volume_id, "domain": request.domain}
            self._emit(type=hostagent_pb2.EVENT_TYPE_DETACH_STARTED, **ids)
            self._emit(type=hostagent_pb2.EVENT_TYPE_DETACHED, **ids)
            if self.storage is not None:
                self.storage.remove_attachment(attachment.id)
        return hostagent_pb2.DetachVolumeResponse()

    def ExtendVolume(
        self, request: hostagent_pb2.HostAgentServiceExtendVolumeRequest, context: grpc.ServicerContext
    ) -> hostagent_pb2.HostAgentServiceExtendVolumeResponse:
        self.script.enter("ExtendVolume", context)
        if not any(v == request.volume_id for _, v in self.attachments):
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"volume {request.volume_id} is not attached on this host"
            )
        return hostagent_pb2.HostAgentServiceExtendVolumeResponse(size_bytes=request.new_size_bytes)

    def GetAttachment(
        self, request: hostagent_pb2.HostAgentServiceGetAttachmentRequest, context: grpc.ServicerContext
    ) -> hostagent_pb2.HostAgentServiceGetAttachmentResponse:
        self.script.enter("GetAttachment", context)
        for (domain, volume_id), attachment in self.attachments.items():
            if volume_id == request.volume_id and request.domain in ("", domain):
                return hostagent_pb2.HostAgentServiceGetAttachmentResponse(attachment=attachment)
        context.abort(grpc.StatusCode.NOT_FOUND, f"volume {request.volume_id} is not attached here")

    def ListAttachments(
        self, request: hostagent_pb2.HostAgentServiceListAttachmentsRequest, context: grpc.ServicerContext
    ) -> hostagent_pb2.HostAgentServiceListAttachmentsResponse:
        self.script.enter("ListAttachments", context)
        found = [a for (d, _), a in self.attachments.items() if request.domain in ("", d)]
        return hostagent_pb2.HostAgentServiceListAttachmentsResponse(attachments=found)

    def WatchEvents(
        self, request: hostagent_pb2.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[hostagent_pb2.WatchEventsResponse]:
        self.script.enter("WatchEvents", context)
        q: queue.Queue[hostagent_pb2.WatchEventsResponse] = queue.Queue()
        with self._watching:
            self._watchers.append(q)
            self._registered += 1
            self._watching.notify_all()
        try:
            for _ in range(600):  # bounded: 60 s at most
                if not context.is_active():
                    return
                try:
                    event = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if request.volume_id and event.volume_id != request.volume_id:
                    continue
                if request.domain and event.domain != request.domain:
                    continue
                if request.types and event.type not in request.types:
                    continue
                yield event
        finally:
            with self._watching:
                self._watchers.remove(q)
