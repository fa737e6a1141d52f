"""The HostAgentService servicer: convert -> api call -> convert (STYLE.md).

Thin on purpose: every decision, and every check of an argument, is in `hostagent.api.HostAgent` (so
that an embedder calling it directly gets the same checks); errors leave only through
`blockwire.status.abort_with`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import grpc

from blockwire import cinder, convert, validate
from blockwire.errors import FailedPrecondition, InvalidArgument
from blockwire.model import ConnectionInfo
from blockwire.status import abort_with
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc
from blockwire.v1 import types_pb2 as tpb
from hostagent.api import HostAgent
from hostagent.migration import MigrationVolume, PeerAgent
from hostagent.rpc.convert import (
    attachment_to_pb,
    disk_options_from_pb,
    event_to_pb,
    event_types_from_pb,
    host_device_to_pb,
)

log = logging.getLogger(__name__)


class PeerClient(PeerAgent, Protocol):
    """A destination agent reached over the network, closed after use (hostagent.rpc.peer_client)."""

    def close(self) -> None: ...


_WATCH_SLICE = 0.25  # seconds between checks that the watcher is still there


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Servicer = TypeVar("Servicer")


def _unary(
    fn: Callable[[Servicer, Req, grpc.ServicerContext], Resp],
) -> Callable[[Servicer, Req, grpc.ServicerContext], Resp]:
    """Every exception leaves through the one mapping, blockwire.status.abort_with."""

    @functools.wraps(fn)
    def wrapper(self: Servicer, request: Req, context: grpc.ServicerContext) -> Resp:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code, INTERNAL for bugs
            abort_with(context, exc)

    return wrapper


class HostAgentServicer(hostagent_pb2_grpc.HostAgentServiceServicer):
    """Serves blockwire.v1.HostAgentService on a HostAgent."""

    def __init__(self, agent: HostAgent, peer_for: Callable[[str], PeerClient] | None = None) -> None:
        """`peer_for` opens a destination agent by address for MigrateDomain (None: MigrateDomain is
        FAILED_PRECONDITION)."""
        self.agent = agent
        self.peer_for = peer_for

    @_unary
    def GetConnector(
        self, request: hpb.GetConnectorRequest, context: grpc.ServicerContext
    ) -> hpb.GetConnectorResponse:
        return hpb.GetConnectorResponse(connector=convert.connector_to_pb(self.agent.connector))

    @_unary
    def AttachVolume(
        self, request: hpb.AttachVolumeRequest, context: grpc.ServicerContext
    ) -> hpb.AttachVolumeResponse:
        which = request.WhichOneof("volume")
        if which is None:
            raise InvalidArgument("volume", "set volume_id, connection_info or cinder_connection_info")
        info = (
            None
            if which == "volume_id"
            else _connection_info(request.connection_info, request.cinder_connection_info, which)
        )
        a = self.agent.attach(
            request.domain,
            volume_id=request.volume_id if which == "volume_id" else "",
            connection_info=info,
            disk=disk_options_from_pb(request.disk),
            access_mode=convert.access_mode_from_pb(request.access_mode),
            persistent=request.persistent,
            allow_unverified_identity=request.allow_unverified_identity,
        )
        return hpb.AttachVolumeResponse(attachment=attachment_to_pb(a, self.agent.connector))

    @_unary
    def DetachVolume(
        self, request: hpb.DetachVolumeRequest, context: grpc.ServicerContext
    ) -> hpb.DetachVolumeResponse:
        self.agent.detach(request.domain, request.volume_id, force=request.force)
        return hpb.DetachVolumeResponse()

    @_unary
    def ExtendVolume(
        self, request: hpb.HostAgentServiceExtendVolumeRequest, context: grpc.ServicerContext
    ) -> hpb.HostAgentServiceExtendVolumeResponse:
        size = self.agent.extend(request.volume_id, request.new_size_bytes)
        return hpb.HostAgentServiceExtendVolumeResponse(size_bytes=size)

    @_unary
    def GetAttachment(
        self, request: hpb.HostAgentServiceGetAttachmentRequest, context: grpc.ServicerContext
    ) -> hpb.HostAgentServiceGetAttachmentResponse:
        a = self.agent.get(request.volume_id, request.domain)
        return hpb.HostAgentServiceGetAttachmentResponse(attachment=attachment_to_pb(a, self.agent.connector))

    @_unary
    def ListAttachments(
        self, request: hpb.HostAgentServiceListAttachmentsRequest, context: grpc.ServicerContext
    ) -> hpb.HostAgentServiceListAttachmentsResponse:
        found = self.agent.list_attachments(request.domain)
        return hpb.HostAgentServiceListAttachmentsResponse(
            attachments=[attachment_to_pb(a, self.agent.connector) for a in found]
        )

    @_unary
    def ConnectVolume(
        self, request: hpb.ConnectVolumeRequest, context: grpc.ServicerContext
    ) -> hpb.ConnectVolumeResponse:
        info = _either_connection_info(request)
        device = self.agent.connect_volume(info, allow_unverified_identity=request.allow_unverified_identity)
        return hpb.ConnectVolumeResponse(device=host_device_to_pb(device))

    @_unary
    def DisconnectVolume(
        self, request: hpb.DisconnectVolumeRequest, context: grpc.ServicerContext
    ) -> hpb.DisconnectVolumeResponse:
        info = _either_connection_info(request)
        self.agent.disconnect_volume(info, force=request.force)
        return hpb.DisconnectVolumeResponse()

    @_unary
    def PrepareMigration(
        self, request: hpb.PrepareMigrationRequest, context: grpc.ServicerContext
    ) -> hpb.PrepareMigrationResponse:
        volumes = [
            MigrationVolume(v.volume_id, v.source_attachment_id, v.target_dev) for v in request.volumes
        ]
        prepared = self.agent.prepare_migration(
            request.domain,
            request.domain_xml,
            volumes,
            allow_unverified_identity=request.allow_unverified_identity,
        )
        return hpb.PrepareMigrationResponse(
            destination_domain_xml=prepared.domain_xml,
            disks=[
                hpb.PreparedDisk(
                    volume_id=d.volume_id,
                    attachment_id=d.attachment_id,
                    target_dev=d.target_dev,
                    disk_xml=d.disk_xml,
                )
                for d in prepared.disks
            ],
        )

    @_unary
    def FinishIncomingMigration(
        self, request: hpb.FinishIncomingMigrationRequest, context: grpc.ServicerContext
    ) -> hpb.FinishIncomingMigrationResponse:
        found = self.agent.finish_incoming_migration(request.domain)
        return hpb.FinishIncomingMigrationResponse(
            attachments=[attachment_to_pb(a, self.agent.connector) for a in found]
        )

    @_unary
    def FinishOutgoingMigration(
        self, request: hpb.FinishOutgoingMigrationRequest, context: grpc.ServicerContext
    ) -> hpb.FinishOutgoingMigrationResponse:
        return hpb.FinishOutgoingMigrationResponse(
            volume_ids=self.agent.finish_outgoing_migration(request.domain)
        )

    @_unary
    def AbortMigration(
        self, request: hpb.AbortMigrationRequest, context: grpc.ServicerContext
    ) -> hpb.AbortMigrationResponse:
        return hpb.AbortMigrationResponse(volume_ids=self.agent.abort_migration(request.domain))

    @_unary
    def MigrateDomain(
        self, request: hpb.MigrateDomainRequest, context: grpc.ServicerContext
    ) -> hpb.MigrateDomainResponse:
        validate.domain(request.domain)
        if not request.destination_agent:
            raise InvalidArgument("destination_agent", "required: the destination agent's address")
        if self.peer_for is None:
            raise FailedPrecondition("this agent cannot reach other agents (no peer client configured)")
        peer = self.peer_for(request.destination_agent)
        try:
            result = self.agent.migrate_domain(request.domain, peer, request.destination_libvirt_uri)
        finally:
            peer.close()
        return hpb.MigrateDomainResponse(
            volume_ids=list(result.volume_ids),
            prepare_seconds=result.prepare_seconds,
            libvirt_seconds=result.libvirt_seconds,
            finish_seconds=result.finish_seconds,
        )

    @_unary
    def AuditHost(
        self, request: hpb.AuditHostRequest, context: grpc.ServicerContext
    ) -> hpb.AuditHostResponse:
        findings = sorted(self.agent.audit(fix=request.fix), key=lambda f: (f.kind, f.name))
        return hpb.AuditHostResponse(
            findings=[
                hpb.AuditFinding(
                    kind=f.kind,
                    name=f.name,
                    detail=f.detail,
                    fixable=f.fixable,
                    fixed=f.fixed,
                    volume_id=f.volume_id,
                )
                for f in findings
            ]
        )

    def WatchEvents(
        self, request: hpb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[hpb.WatchEventsResponse]:
        try:
            # Filters of the event stream, which has no HostAgent call: the same rules as everywhere.
            validate.domain(request.domain, required=False)
            if request.volume_id:
                validate.object_id(request.volume_id, "volume_id")
            types = event_types_from_pb(list(request.types))
        except InvalidArgument as exc:
            abort_with(context, exc)
        with self.agent.events.subscribe() as sub:
            # Headers now: a client that waits for them knows every later event will reach it.
            context.send_initial_metadata(())
            while context.is_active():
                event = sub.get(timeout=_WATCH_SLICE)
                if event is None:
                    continue
                if request.domain and event.domain != request.domain:
                    continue
                if request.volume_id and event.volume_id != request.volume_id:
                    continue
                if types and event.type not in types:
                    continue
                yield event_to_pb(event)


def _connection_info(typed: tpb.ConnectionInfo, cinder_json: str, which: str) -> ConnectionInfo:
    """The typed connection info of a request: blockwire's own message, or Cinder's dict as JSON."""
    if which == "connection_info":
        return convert.connection_info_from_pb(typed)
    try:
        doc = json.loads(cinder_json)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(cinder.FIELD, f"not JSON: {exc.msg} at character {exc.pos}") from None
    return cinder.connection_info_from_cinder(doc)


def _either_connection_info(
    request: hpb.ConnectVolumeRequest | hpb.DisconnectVolumeRequest,
) -> ConnectionInfo:
    has_typed, has_cinder = request.HasField("connection_info"), bool(request.cinder_connection_info)
    if has_typed == has_cinder:
        raise InvalidArgument(
            "connection_info", "give exactly one of connection_info and cinder_connection_info"
        )
    which = "connection_info" if has_typed else "cinder_connection_info"
    return _connection_info(request.connection_info, request.cinder_connection_info, which)
