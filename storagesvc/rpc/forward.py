"""Forwarding between storage nodes: the one place a call is sent to the node that must run it.

Any node accepts any call. A call that needs a volume's backend (`auth.FORWARDED`: volume, snapshot
and attachment changes; an attachment's export is made on the target of the node that serves the
backend) runs on the node serving that backend: here when this node has it (or it is shared, rbd),
otherwise it is sent on, as the same typed request, over gRPC with mutual TLS, the caller's deadline
kept, with this node's ``blockwire://storage-node/<name>`` certificate; the answer (or the status) comes
back as it is. A call a storage node forwarded is never forwarded again. A create is placed by the
scheduler over every registered backend (`Cluster.place`) and goes to the chosen backend's node with
that backend named, to the next one when that node is unreachable or out of space
(`max_attempts`). The owning node down: UNAVAILABLE naming it, before anything is sent.

`ForwardInterceptor` runs after the auth interceptor (the caller was authorized here) and before the
servicer; without ``[node]`` the daemon does not install it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from blockwire.errors import Unavailable
from blockwire.server.serving import STORAGE_NODE, identify
from blockwire.status import abort_with
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from storagesvc import voltypes
from storagesvc.catalog import Catalog
from storagesvc.encryption import HEADER_BYTES as ENCRYPTION_HEADER_BYTES
from storagesvc.model import StorageNode
from storagesvc.nodes import Cluster
from storagesvc.rpc.auth import FORWARDED, SERVICE_PREFIX
from storagesvc.scheduler import PlacementRequest
from storagesvc.service import StorageService

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor

TRACE_METADATA = frozenset({"traceparent", "tracestate"})

RESCHEDULE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""A create sent to another node that ends so goes to the next backend the scheduler ranked."""


@dataclass(frozen=True)
class PeerTls:
    """This node's client certificate for calls to other nodes, and the CA of their server certificates."""

    cert_file: str
    key_file: str
    ca_file: str

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes(),
            certificate_chain=Path(self.cert_file).read_bytes(),
        )


class Peers:
    """One channel per other node's address, made on first use and kept."""

    def __init__(self, tls: PeerTls) -> None:
        self._credentials = tls.credentials()
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, address: str) -> storage_pb2_grpc.StorageServiceStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.secure_channel(address, self._credentials)
            return storage_pb2_grpc.StorageServiceStub(channel)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


class Router:
    """Which node runs a call (None: this one), from the request and the shared catalog.
    `type_specs`: the extra specs of a volume type by name ("": the default type; {} for none);
    `default_backend`: [service] default_backend, where a volume that names no backend or type goes."""

    def __init__(
        self,
        cluster: Cluster,
        catalog: Catalog,
        *,
        type_specs: Callable[[str], Mapping[str, str]] = lambda name: {},
        default_backend: str = "",
    ) -> None:
        self.cluster = cluster
        self.catalog = catalog
        self.type_specs = type_specs
        self.default_backend = default_backend

    @classmethod
    def of(cls, cluster: Cluster, service: StorageService) -> Router:
        """The router of a service: its volume types and default backend."""

        def type_specs(name: str) -> Mapping[str, str]:
            vtype = voltypes.VolumeTypes(service.ctx).for_create(name)
            return dict(vtype.extra_specs) if vtype is not None else {}

        return cls(
            cluster,
            service.catalog,
            type_specs=type_specs,
            default_backend=service.ctx.scheduler.default_backend,
        )

    def _volume_backend(self, volume_id: str) -> str:
        v = self.catalog.get_volume(volume_id) if volume_id else None
        return v.backend if v is not None else ""

    def _attachment_backend(self, attachment_id: str) -> str:
        a = self.catalog.get_attachment(attachment_id) if attachment_id else None
        return self._volume_backend(a.volume_id) if a is not None else ""

    def backend_of(self, method: str, request: Any) -> str:
        """The backend a (non-create) call needs; "" when its object does not exist (served here, where
        it gets its own answer: NOT_FOUND, or OK for a delete)."""
        if method in ("DeleteVolume", "ExtendVolume", "CreateSnapshot", "CreateAttachment"):
            return self._volume_backend(request.volume_id)
        if method == "DeleteSnapshot":
            s = self.catalog.get_snapshot(request.snapshot_id) if request.snapshot_id else None
            return s.backend if s is not None else ""
        if method == "CreateMigrationAttachment":
            return self._attachment_backend(request.source_attachment_id)
        return self._attachment_backend(request.attachment_id)

    def route(self, method: str, request: Any) -> StorageNode | None:
        backend = self.backend_of(method, request)
        return self.cluster.route(backend) if backend else None

    def create_backends(self, request: spb.CreateVolumeRequest) -> list[str]:
        """The backends a create may go to, in order: the existing volume's (a repeat by name), the
        source's (a clone or a volume from a snapshot stays on its source's backend), the one asked for,
        or the scheduler's ranking."""
        existing = self.catalog.volume_by_name(request.name) if request.name else None
        if existing is not None:
            return [request.backend or existing.backend]
        if request.backend:
            return [request.backend]
        if request.WhichOneof("source") == "source_snapshot_id":
            s = self.catalog.get_snapshot(request.source_snapshot_id)
            return [s.backend] if s is not None else [""]
        if request.WhichOneof("source") == "source_volume_id":
            return [self._volume_backend(request.source_volume_id)]
        specs = self.type_specs(request.volume_type)
        if not specs and self.default_backend:
            return [self.default_backend]
        size = request.size_bytes + (ENCRYPTION_HEADER_BYTES if request.encrypted else 0)
        ranked = self.cluster.place(PlacementRequest(size_bytes=size, extra_specs=specs))
        return [b.backend for b in ranked]


class ForwardInterceptor(_Interceptor):
    def __init__(
        self, router: Router, peers: Peers, *, default_timeout: float = 120.0, max_attempts: int = 3
    ) -> None:
        self.router = router
        self.peers = peers
        self.default_timeout = default_timeout
        self.max_attempts = max_attempts

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method.rsplit("/", 1)[1]
        if method not in FORWARDED or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        serve = self.serve

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            return serve(method, request, context, inner)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )

    def serve(
        self,
        method: str,
        request: Any,
        context: grpc.ServicerContext,
        here: Callable[[Any, grpc.ServicerContext], Any],
    ) -> Any:
        who = identify(context)
        if who is not None and who.role == STORAGE_NODE:
            return here(request, context)  # forwarded to this node: never sent on again
        if method == "CreateVolume":
            return self._create(request, context, here)
        try:
            node = self.router.route(method, request)
        except Exception as exc:  # noqa: BLE001 - becomes the call's status
            abort_with(context, exc)
        if node is None:
            return here(request, context)
        return self._send(node, method, request, context)

    def _create(
        self,
        request: spb.CreateVolumeRequest,
        context: grpc.ServicerContext,
        here: Callable[[Any, grpc.ServicerContext], Any],
    ) -> Any:
        cluster = self.router.cluster
        try:
            backends = self.router.create_backends(request)
        except Exception as exc:  # noqa: BLE001 - no backend passed the scheduler: its status
            abort_with(context, exc)
        failures: list[str] = []
        for backend in backends[: self.max_attempts]:
            if not backend or backend in cluster.pools:
                if backend:
                    request.backend = backend
                return here(request, context)
            try:
                node = cluster.route(backend)
            except Unavailable as exc:
                failures.append(exc.message)
                continue
            if node is None:
                return here(request, context)
            request.backend = backend
            try:
                return self._call(node, "CreateVolume", request, context)
            except grpc.RpcError as err:
                if err.code() not in RESCHEDULE or len(backends) == 1:
                    context.abort(err.code(), self._details(node, err))
                failures.append(f"{backend} on {node.name}: {err.details()}")
                log.warning("create of %s on backend %s failed; trying the next one", request.name, backend)
        abort_with(context, Unavailable("no backend could take the volume: " + "; ".join(failures)))

    def _call(self, node: StorageNode, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        remaining = context.time_remaining()
        timeout = self.default_timeout if remaining is None else max(0.0, remaining)
        log.debug("forwarding %s to storage node %s at %s", method, node.name, node.address)
        call = getattr(self.peers.stub(node.address), method)
        trace = tuple(
            (key, value) for key, value in context.invocation_metadata() if key in TRACE_METADATA
        )  # the caller's trace goes on with the call
        return call(request, timeout=timeout, metadata=trace)

    def _send(self, node: StorageNode, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return self._call(node, method, request, context)
        except grpc.RpcError as err:
            context.abort(err.code(), self._details(node, err))

    @staticmethod
    def _details(node: StorageNode, err: grpc.RpcError) -> str:
        details = err.details() or ""
        if err.code() == grpc.StatusCode.UNAVAILABLE and node.name not in details:
            return f"storage node {node.name} ({node.address}) is unreachable: {details}"
        return details
