"""Typed clients of the blockwire v1 API: `StorageClient` and `HostAgentClient`.

Both wrap the generated stubs with what every caller needs:

* a target given as ``unix:///run/blockwire/storage.sock``, a bare socket path, or ``host:port``;
* a deadline on every call (`DEFAULT_TIMEOUT`, longer ones for attach and detach), overridable per
  client and per call;
* retries with exponential backoff and jitter for UNAVAILABLE, ABORTED and a refusal by a daemon's
  concurrency bound (RESOURCE_EXHAUSTED naming the bound; never a full disk), bounded by the attempts of
  a `RetryPolicy` and by the call's deadline. Retrying is safe because every RPC of the v1 API is
  idempotent by contract (see the comments in ``proto/blockwire/v1``): a repeat returns what the first
  call made or finds it already gone;
* TLS and mutual TLS (`TlsOptions`);
* typed results: methods return the resource message of the v1 API (`types_pb2.Volume`,
  `types_pb2.Attachment`, ...), never the response envelope; deletes return None; listings return
  every page as a list. Failures raise the `blockwire.errors` exception that the status code maps to
  (`blockwire.status.error_from_rpc`), e.g. `blockwire.errors.NotFound`; a daemon at one of its
  concurrency bounds ([limits]) raises `blockwire.errors.ConcurrencyLimit`, not retried;
* server streams (`watch_volume`, `watch_events`) as `Stream` iterators that can be cancelled.

Example::

    from blockwire.client import StorageClient, HostAgentClient
    from blockwire.sizes import parse_size

    with StorageClient("unix:///run/blockwire/storage.sock") as storage:
        vol = storage.create_volume("data1", parse_size("10G"))
        vol = storage.wait_volume(vol.id)             # until AVAILABLE (or ERROR)
    with HostAgentClient("unix:///run/blockwire/agent.sock") as agent:
        att = agent.attach_volume("vm1", volume_id=vol.id)
        print(att.target_dev, att.host_device)
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar

import grpc
from google.protobuf.message import Message
from opentelemetry.trace import SpanKind

from blockwire import convert, model, tracing
from blockwire.errors import ConcurrencyLimit, DeadlineExceeded, InvalidArgument, NotFound
from blockwire.runtime.clock import Clock, SystemClock
from blockwire.status import error_from_rpc
from blockwire.v1 import (
    hostagent_pb2,
    hostagent_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
    types_pb2,
)

log = logging.getLogger(__name__)

DEFAULT_STORAGE_TARGET: Final = "unix:///run/blockwire/storage.sock"
"""Where `blockwire-storage` listens unless configured otherwise."""
DEFAULT_AGENT_TARGET: Final = "unix:///run/blockwire/agent.sock"
"""Where `blockwire-agent` listens unless configured otherwise."""

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds a unary call may take, retries included, unless the client or the call says otherwise."""

LONG_CALL_TIMEOUTS: Final[Mapping[str, float]] = {
    # Login, scan, udev and multipath waits, and libvirt's DEVICE_REMOVED event can take a while.
    "AttachVolume": 300.0,
    "DetachVolume": 300.0,
    "ConnectVolume": 300.0,
    "DisconnectVolume": 300.0,
    "ExtendVolume": 120.0,
    "CreateVolume": 120.0,
    "CreateSnapshot": 120.0,
    "CreateAttachment": 120.0,
    "DeleteAttachment": 120.0,
    "DeleteVolume": 120.0,
    "PrepareMigration": 300.0,
    "FinishIncomingMigration": 120.0,
    "FinishOutgoingMigration": 300.0,
    "AbortMigration": 300.0,
    "MigrateDomain": 900.0,
    "CreateMigrationAttachment": 120.0,
    "CompleteMigration": 120.0,
    "RollbackMigration": 120.0,
}
"""Default deadlines of the calls that do real work; others get `DEFAULT_TIMEOUT`."""

RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})

HEALTH_SERVING: Final = "SERVING"

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)
_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter.

    Attempt n (1-based) that fails with a code in `codes` waits
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))`` scaled by a random factor in
    ``[1 - jitter, 1]``, then tries again, at most `max_attempts` times in all and never past the
    call's deadline. ``RetryPolicy(max_attempts=1)`` disables retries.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidArgument("max_attempts", "must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise InvalidArgument("jitter", "must be between 0 and 1")

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * (1.0 - self.jitter * rand())


NO_RETRY: Final = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class TlsOptions:
    """TLS for a channel. All files are PEM.

    * `ca_file`: the CA that signed the server's certificate; None means the system's roots.
    * `cert_file` + `key_file`: the client's certificate and key, for mutual TLS (both or neither).
    * `server_name`: the name to check the server's certificate against, when it differs from the
      target's host (e.g. connecting by IP address).

    Example: ``TlsOptions(ca_file="/etc/blockwire/ca.pem", cert_file="c.pem", key_file="c.key")``
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument("tls", "a client certificate needs its key and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def normalize_target(target: str) -> str:
    """The gRPC target for ``unix:///path``, a bare absolute socket path, or ``host:port``.

    >>> normalize_target("/run/blockwire/agent.sock")
    'unix:///run/blockwire/agent.sock'
    >>> normalize_target("10.0.0.5:7400")
    '10.0.0.5:7400'
    """
    target = target.strip()
    if not target:
        raise InvalidArgument("target", "empty; give unix:///path/to.sock or host:port")
    if target.startswith("/"):
        return f"unix://{target}"
    return target


def make_channel(target: str, tls: TlsOptions | None = None) -> grpc.Channel:
    """A channel to `target` (see `normalize_target`), with TLS when `tls` is given."""
    target = normalize_target(target)
    options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]  # retries are ours, with backoff
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options + tls.channel_options())


class Stream(Generic[_T]):
    """A server stream as an iterator of typed items.

    Iterating yields items until the server ends the stream; errors raise `blockwire.errors`
    exceptions. `cancel()` (from any thread) ends the iteration quietly. A stream that fails with a
    retryable code before its first item is opened again (both watches are read-only). Use it as a
    context manager to cancel it on exit::

        with agent.watch_events(volume_id=vid) as events:
            for event in events:
                print(event.type, event.step)
    """

    def __init__(
        self,
        open_call: Callable[[float | None], Any],
        item: Callable[[Any], _T],
        *,
        timeout: float | None,
        retry: RetryPolicy,
        clock: Clock,
        rand: Callable[[], float],
    ) -> None:
        self._open = open_call
        self._item = item
        self._timeout = timeout
        self._retry = retry
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self._call: Any = None
        self._cancelled = False
        self._open_event = threading.Event()

    def wait_open(self, timeout: float) -> bool:
        """Waits (at most `timeout` seconds) until the iterating thread has the server's response
        headers: a server that sends them once it is subscribed (the agent's WatchEvents) then misses
        no event that happens after this returns True."""
        return self._open_event.wait(timeout)

    def cancel(self) -> None:
        """Ends the stream; a running iteration stops without an error."""
        with self._lock:
            self._cancelled = True
            if self._call is not None:
                self._call.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __iter__(self) -> Iterator[_T]:
        deadline = None if self._timeout is None else self._clock.monotonic() + self._timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(0.0, deadline - self._clock.monotonic())
            with self._lock:
                if self._cancelled:
                    return
                self._call = self._open(remaining)
            received = False
            try:
                self._call.initial_metadata()  # blocks until the headers came (or the call ended)
                self._open_event.set()
                for message in self._call:
                    received = True
                    yield self._item(message)
                return
            except grpc.RpcError as err:
                code = err.code()
                if self._cancelled and code is grpc.StatusCode.CANCELLED:
                    return
                if not received and _should_retry(self._retry, err, attempt):
                    wait = self._retry.backoff(attempt, self._rand)
                    if deadline is None or self._clock.monotonic() + wait < deadline:
                        log.debug("stream failed with %s; reopening in %.2fs", code.name, wait)
                        self._clock.sleep(wait)
                        continue
                raise error_from_rpc(err) from None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


def _should_retry(policy: RetryPolicy, err: grpc.RpcError, attempt: int) -> bool:
    """A code of the policy's, or a refusal by a daemon's concurrency bound (RESOURCE_EXHAUSTED that
    names its bound: a busy daemon, not a full disk), while attempts are left."""
    if attempt >= policy.max_attempts:
        return False
    code = err.code()
    if code in policy.codes:
        return True
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and isinstance(error_from_rpc(err), ConcurrencyLimit)


class _Client:
    """Channel ownership, deadlines and retries shared by both clients."""

    _service: str = ""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        tls: TlsOptions | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        timeouts: Mapping[str, float] | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        if channel is None:
            if target is None:
                raise InvalidArgument("target", "give a target (unix:///path or host:port) or a channel")
            channel = make_channel(target, tls)
            self._owns_channel = True
        else:
            self._owns_channel = False
        self.target = target or "<channel>"
        self.channel = channel
        self._timeout = timeout
        self._timeouts = {**LONG_CALL_TIMEOUTS, **(timeouts or {})}
        self._retry = retry or RetryPolicy()
        self._clock: Clock = clock or SystemClock()
        self._rand = rand
        self._metadata = tuple(metadata)
        self._init_stub()

    def _init_stub(self) -> None:
        """Subclasses make their stub over `self.channel`."""

    def close(self) -> None:
        """Closes the channel if this client made it."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def timeout_for(self, name: str, override: float | None = None) -> float:
        """The deadline in seconds a call of RPC `name` gets."""
        if override is not None:
            return override
        return self._timeouts.get(name, self._timeout)

    def _unary(
        self,
        name: str,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
    ) -> _Resp:
        with tracing.span(f"{self._service}/{name}", SpanKind.CLIENT, attributes=_GRPC):
            return self._unary_retried(name, method, request, timeout)

    def _unary_retried(
        self,
        name: str,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
    ) -> _Resp:
        budget = self.timeout_for(name, timeout)
        deadline = self._clock.monotonic() + budget
        metadata = tracing.inject(self._metadata)
        attempt = 0
        unavailable: grpc.RpcError | None = None  # the daemon's last "unavailable", while retried
        while True:
            attempt += 1
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                if unavailable is not None:  # it never answered: say so, not only that time ran out
                    raise error_from_rpc(unavailable) from None
                raise DeadlineExceeded(f"{self._service}.{name} did not finish within {budget:g}s")
            try:
                return method(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as err:
                code = err.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and unavailable is not None:
                    # A retry of an unreachable daemon ran out of time (a reconnect under load, or the
                    # daemon still starting): UNAVAILABLE is what the caller can act on.
                    raise error_from_rpc(unavailable) from None
                if code is grpc.StatusCode.UNAVAILABLE:
                    unavailable = err
                if _should_retry(self._retry, err, attempt):
                    wait = self._retry.backoff(attempt, self._rand)
                    if self._clock.monotonic() + wait < deadline:
                        log.debug(
                            "%s.%s failed with %s (attempt %d); retrying in %.2fs",
                            self._service,
                            name,
                            code.name,
                            attempt,
                            wait,
                        )
                        self._clock.sleep(wait)
                        continue
                raise error_from_rpc(err) from None

    def _stream(
        self,
        method: grpc.UnaryStreamMultiCallable[_Req, _Resp],
        request: _Req,
        item: Callable[[_Resp], _T],
        timeout: float | None,
    ) -> Stream[_T]:
        def open_call(remaining: float | None) -> Any:
            return method(request, timeout=remaining, metadata=tracing.inject(self._metadata))

        return Stream(open_call, item, timeout=timeout, retry=self._retry, clock=self._clock, rand=self._rand)

    def health(self, service: str | None = None, *, timeout: float | None = None) -> str:
        """The gRPC health status of the daemon: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN".

        Asks for this client's service (e.g. ``blockwire.v1.StorageService``), and for the server as a
        whole ("") if the daemon does not report that service by name. Unreachable daemons raise
        `blockwire.errors.Unavailable`.
        """
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415 - only health needs it

        stub = health_pb2_grpc.HealthStub(self.channel)
        names = [service] if service is not None else [self._service, ""]
        status = "SERVICE_UNKNOWN"
        for name in names:
            request = health_pb2.HealthCheckRequest(service=name)
            try:
                response = self._unary("Health.Check", stub.Check, request, timeout)
            except NotFound:
                continue
            status = str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            break
        return status


class StorageClient(_Client):
    """Client of `blockwire.v1.StorageService` (the `blockwire-storage` daemon).

    Every call is idempotent by the API's contract and is retried on UNAVAILABLE and ABORTED.

    Example::

        with StorageClient("unix:///run/blockwire/storage.sock") as storage:
            vol = storage.create_volume("data1", 10 * 2**30, labels={"app": "db"})
            snap = storage.create_snapshot(vol.id, "data1-before-upgrade")
            for v in storage.list_volumes():
                print(v.id, v.name, v.size_bytes)
    """

    _service = "blockwire.v1.StorageService"

    def _init_stub(self) -> None:
        self.stub = storage_pb2_grpc.StorageServiceStub(self.channel)

    # Volumes

    def create_volume(
        self,
        name: str,
        size_bytes: int = 0,
        *,
        backend: str = "",
        multiattach: bool = False,
        labels: Mapping[str, str] | None = None,
        source_snapshot_id: str | None = None,
        source_volume_id: str | None = None,
        source_image: str | None = None,
        image_format: types_pb2.ImageFormat.ValueType = types_pb2.IMAGE_FORMAT_UNSPECIFIED,
        timeout: float | None = None,
        encrypted: bool = False,
        key_size_bits: int = 0,
        volume_type: str = "",
    ) -> types_pb2.Volume:
        """Creates a volume, empty or from one source (snapshot, volume, or image path on the storage host).
        `encrypted`: LUKS1 at rest with a fresh key from the service's key manager (README "Encryption").
        `volume_type`: a type's id or name ("": the service's default type, if any); without `backend`
        its extra specs choose the backend (README "Volume types, QoS specs and the scheduler").

        Idempotent by name: a repeat with the same parameters returns the existing volume, perhaps still
        CREATING (see `wait_volume`); other parameters raise `AlreadyExists`.

        Example: ``storage.create_volume("web1-root", 0, source_image="/srv/images/debian.qcow2")``
        """
        request = storage_pb2.CreateVolumeRequest(
            name=name,
            size_bytes=size_bytes,
            backend=backend,
            multiattach=multiattach,
            labels=labels or {},
            encrypted=encrypted,
            key_size_bits=key_size_bits,
            volume_type=volume_type,
        )
        sources = [s for s in (source_snapshot_id, source_volume_id, source_image) if s is not None]
        if len(sources) > 1:
            raise InvalidArgument("source", "give at most one of snapshot, volume and image")
        if source_snapshot_id is not None:
            request.source_snapshot_id = source_snapshot_id
        elif source_volume_id is not None:
            request.source_volume_id = source_volume_id
        elif source_image is not None:
            request.source_image.CopyFrom(types_pb2.ImageSource(path=source_image, format=image_format))
        return self._unary("CreateVolume", self.stub.CreateVolume, request, timeout).volume

    def get_volume(self, volume_id: str, *, timeout: float | None = None) -> types_pb2.Volume:
        """Returns one volume; raises `NotFound` if there is none with that id."""
        request = storage_pb2.GetVolumeRequest(volume_id=volume_id)
        return self._unary("GetVolume", self.stub.GetVolume, request, timeout).volume

    def iter_volumes(
        self,
        *,
        label_selector: Mapping[str, str] | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[types_pb2.Volume]:
        """Yields every volume (carrying all of `label_selector`), fetching a page at a time."""
        token = ""
        while True:
            request = storage_pb2.ListVolumesRequest(
                page_size=page_size, page_token=token, label_selector=label_selector or {}
            )
            page = self._unary("ListVolumes", self.stub.ListVolumes, request, timeout)
            yield from page.volumes
            token = page.next_page_token
            if not token:
                return

    def list_volumes(
        self,
        *,
        label_selector: Mapping[str, str] | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> list[types_pb2.Volume]:
        """Every volume (carrying all of `label_selector`), in creation order."""
        return list(self.iter_volumes(label_selector=label_selector, page_size=page_size, timeout=timeout))

    def watch_volume(self, volume_id: str, *, timeout: float | None = None) -> Stream[types_pb2.Volume]:
        """Streams the volume each time it changes, until it settles (AVAILABLE, IN_USE or ERROR).

        The first item is the volume as it is now. `timeout` (default: none) bounds the whole watch.
        """
        request = storage_pb2.WatchVolumeRequest(volume_id=volume_id)
        return self._stream(self.stub.WatchVolume, request, lambda r: r.volume, timeout)

    def wait_volume(
        self,
        volume_id: str,
        *,
        on_update: Callable[[types_pb2.Volume], None] | None = None,
        timeout: float | None = None,
    ) -> types_pb2.Volume:
        """Watches the volume until it settles and returns its last state (which may be ERROR).

        `on_update` is called with every state seen, e.g. to show `volume.progress`.
        """
        last: types_pb2.Volume | None = None
        with self.watch_volume(volume_id, timeout=timeout) as stream:
            for volume in stream:
                last = volume
                if on_update is not None:
                    on_update(volume)
        return last if last is not None else self.get_volume(volume_id)

    def delete_volume(self, volume_id: str, *, timeout: float | None = None) -> None:
        """Deletes a volume; a repeat or an unknown id is OK. Raises `FailedPrecondition` if attached."""
        request = storage_pb2.DeleteVolumeRequest(volume_id=volume_id)
        self._unary("DeleteVolume", self.stub.DeleteVolume, request, timeout)

    def extend_volume(
        self, volume_id: str, new_size_bytes: int, *, timeout: float | None = None
    ) -> types_pb2.Volume:
        """Grows a volume (a multiple of 1 MiB, not smaller than now) and returns it.

        If the volume is attached, tell the host too: `HostAgentClient.extend_volume`.
        """
        request = storage_pb2.ExtendVolumeRequest(volume_id=volume_id, new_size_bytes=new_size_bytes)
        return self._unary("ExtendVolume", self.stub.ExtendVolume, request, timeout).volume

    # Snapshots

    def create_snapshot(
        self,
        volume_id: str,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> types_pb2.Snapshot:
        """Takes a snapshot of a volume; idempotent by name like `create_volume`."""
        request = storage_pb2.CreateSnapshotRequest(volume_id=volume_id, name=name, labels=labels or {})
        return self._unary("CreateSnapshot", self.stub.CreateSnapshot, request, timeout).snapshot

    def get_snapshot(self, snapshot_id: str, *, timeout: float | None = None) -> types_pb2.Snapshot:
        """Returns one snapshot; raises `NotFound` if there is none with that id."""
        request = storage_pb2.GetSnapshotRequest(snapshot_id=snapshot_id)
        return self._unary("GetSnapshot", self.stub.GetSnapshot, request, timeout).snapshot

    def list_snapshots(
        self, *, volume_id: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[types_pb2.Snapshot]:
        """Every snapshot, or those of one volume."""
        out: list[types_pb2.Snapshot] = []
        token = ""
        while True:
            request = storage_pb2.ListSnapshotsRequest(
                volume_id=volume_id, page_size=page_size, page_token=token
            )
            page = self._unary("ListSnapshots", self.stub.ListSnapshots, request, timeout)
            out.extend(page.snapshots)
            token = page.next_page_token
            if not token:
                return out

    def delete_snapshot(self, snapshot_id: str, *, timeout: float | None = None) -> None:
        """Deletes a snapshot; a repeat or an unknown id is OK."""
        request = storage_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        self._unary("DeleteSnapshot", self.stub.DeleteSnapshot, request, timeout)

    # Attachments (what a host agent does for you; for virt managers that connect by themselves)

    def create_attachment(
        self,
        volume_id: str,
        connector: types_pb2.Connector | model.Connector,
        *,
        access_mode: types_pb2.AccessMode.ValueType = types_pb2.ACCESS_MODE_READ_WRITE,
        domain: str = "",
        transport: types_pb2.Transport.ValueType = types_pb2.TRANSPORT_UNSPECIFIED,
        timeout: float | None = None,
    ) -> types_pb2.Attachment:
        """Exports a volume to a host's connector; returns the attachment with its connection info.

        Idempotent per (volume, host). Example::

            connector = agent.get_connector()
            att = storage.create_attachment(vol.id, connector, domain="vm1")
            device = agent.connect_volume(att.connection_info)
        """
        if isinstance(connector, model.Connector):
            connector = convert.connector_to_pb(connector)
        request = storage_pb2.CreateAttachmentRequest(
            volume_id=volume_id,
            connector=connector,
            access_mode=access_mode,
            domain=domain,
            transport=transport,
        )
        return self._unary("CreateAttachment", self.stub.CreateAttachment, request, timeout).attachment

    def complete_attachment(
        self,
        attachment_id: str,
        *,
        target_dev: str = "",
        host_device: str = "",
        timeout: float | None = None,
    ) -> types_pb2.Attachment:
        """Marks an attachment ATTACHED (the host connected); a repeat is harmless."""
        request = storage_pb2.CompleteAttachmentRequest(
            attachment_id=attachment_id, target_dev=target_dev, host_device=host_device
        )
        return self._unary("CompleteAttachment", self.stub.CompleteAttachment, request, timeout).attachment

    def delete_attachment(self, attachment_id: str, *, timeout: float | None = None) -> None:
        """Removes an attachment and its export; a repeat or an unknown id is OK."""
        request = storage_pb2.DeleteAttachmentRequest(attachment_id=attachment_id)
        self._unary("DeleteAttachment", self.stub.DeleteAttachment, request, timeout)

    def create_migration_attachment(
        self,
        source_attachment_id: str,
        connector: types_pb2.Connector | model.Connector,
        *,
        domain: str = "",
        timeout: float | None = None,
    ) -> types_pb2.Attachment:
        """The destination host's attachment of a live migration, beside the source's; a repeat returns it."""
        if isinstance(connector, model.Connector):
            connector = convert.connector_to_pb(connector)
        request = storage_pb2.CreateMigrationAttachmentRequest(
            source_attachment_id=source_attachment_id, connector=connector, domain=domain
        )
        return self._unary(
            "CreateMigrationAttachment", self.stub.CreateMigrationAttachment, request, timeout
        ).attachment

    def complete_migration(
        self, attachment_id: str, *, target_dev: str = "", host_device: str = "", timeout: float | None = None
    ) -> types_pb2.Attachment:
        """Completes a migration: the source attachment goes; a repeat is harmless."""
        request = storage_pb2.CompleteMigrationRequest(
            attachment_id=attachment_id, target_dev=target_dev, host_device=host_device
        )
        return self._unary("CompleteMigration", self.stub.CompleteMigration, request, timeout).attachment

    def rollback_migration(self, attachment_id: str, *, timeout: float | None = None) -> None:
        """Rolls a migration back: the destination attachment goes; a repeat or an unknown id is OK."""
        request = storage_pb2.RollbackMigrationRequest(attachment_id=attachment_id)
        self._unary("RollbackMigration", self.stub.RollbackMigration, request, timeout)

    def get_attachment(self, attachment_id: str, *, timeout: float | None = None) -> types_pb2.Attachment:
        """Returns one attachment, with its connection info."""
        request = storage_pb2.GetAttachmentRequest(attachment_id=attachment_id)
        return self._unary("GetAttachment", self.stub.GetAttachment, request, timeout).attachment

    def list_attachments(
        self, *, volume_id: str = "", host: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[types_pb2.Attachment]:
        """Every attachment, or those of one volume or one host (without connection info)."""
        out: list[types_pb2.Attachment] = []
        token = ""
        while True:
            request = storage_pb2.ListAttachmentsRequest(
                volume_id=volume_id, host=host, page_size=page_size, page_token=token
            )
            page = self._unary("ListAttachments", self.stub.ListAttachments, request, timeout)
            out.extend(page.attachments)
            token = page.next_page_token
            if not token:
                return out

    # Capacity and statistics

    def get_capacity(
        self, backend: str = "", *, timeout: float | None = None
    ) -> list[storage_pb2.BackendCapacity]:
        """Space per backend (or of one backend)."""
        request = storage_pb2.GetCapacityRequest(backend=backend)
        return list(self._unary("GetCapacity", self.stub.GetCapacity, request, timeout).backends)

    def list_storage_nodes(self, *, timeout: float | None = None) -> list[storage_pb2.StorageNode]:
        """The storage nodes registered in the shared catalog, with their backends and whether each is up."""
        request = storage_pb2.ListStorageNodesRequest()
        return list(self._unary("ListStorageNodes", self.stub.ListStorageNodes, request, timeout).nodes)

    def get_backend_stats(self, *, timeout: float | None = None) -> storage_pb2.GetBackendStatsResponse:
        """Backend, exporter and per-operation statistics."""
        request = storage_pb2.GetBackendStatsRequest()
        return self._unary("GetBackendStats", self.stub.GetBackendStats, request, timeout)

    # Volume types and QoS specs (admin credentials)

    def create_volume_type(
        self,
        name: str,
        *,
        description: str = "",
        extra_specs: Mapping[str, str] | None = None,
        qos_specs: str = "",
        timeout: float | None = None,
    ) -> types_pb2.VolumeType:
        """Creates a volume type; a repeat with the same parameters returns it (others: `AlreadyExists`).

        Example: ``storage.create_volume_type("fast", extra_specs={"thin_provisioning": "<is> True"})``
        """
        request = storage_pb2.CreateVolumeTypeRequest(
            name=name, description=description, extra_specs=extra_specs or {}, qos_specs=qos_specs
        )
        return self._unary("CreateVolumeType", self.stub.CreateVolumeType, request, timeout).volume_type

    def get_volume_type(self, volume_type: str, *, timeout: float | None = None) -> types_pb2.VolumeType:
        """One volume type, by id or name; raises `NotFound` if there is none."""
        request = storage_pb2.GetVolumeTypeRequest(volume_type=volume_type)
        return self._unary("GetVolumeType", self.stub.GetVolumeType, request, timeout).volume_type

    def list_volume_types(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> list[types_pb2.VolumeType]:
        """Every volume type, in creation order."""
        out: list[types_pb2.VolumeType] = []
        token = ""
        while True:
            request = storage_pb2.ListVolumeTypesRequest(page_size=page_size, page_token=token)
            page = self._unary("ListVolumeTypes", self.stub.ListVolumeTypes, request, timeout)
            out.extend(page.volume_types)
            token = page.next_page_token
            if not token:
                return out

    def update_volume_type(
        self,
        volume_type: str,
        *,
        description: str | None = None,
        extra_specs: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> types_pb2.VolumeType:
        """Replaces the description and/or all extra specs (None: kept)."""
        request = storage_pb2.UpdateVolumeTypeRequest(volume_type=volume_type)
        if description is not None:
            request.description = description
        if extra_specs is not None:
            request.extra_specs.CopyFrom(storage_pb2.ExtraSpecs(specs=extra_specs))
        return self._unary("UpdateVolumeType", self.stub.UpdateVolumeType, request, timeout).volume_type

    def delete_volume_type(self, volume_type: str, *, timeout: float | None = None) -> None:
        """Deletes a volume type; a repeat is OK. `FailedPrecondition` while volumes of the type exist."""
        request = storage_pb2.DeleteVolumeTypeRequest(volume_type=volume_type)
        self._unary("DeleteVolumeType", self.stub.DeleteVolumeType, request, timeout)

    def set_volume_type_qos_specs(
        self, volume_type: str, qos_specs: str, *, timeout: float | None = None
    ) -> types_pb2.VolumeType:
        """Associates the type with QoS specs (id or name), or with none (``""``)."""
        request = storage_pb2.SetVolumeTypeQosSpecsRequest(volume_type=volume_type, qos_specs=qos_specs)
        return self._unary(
            "SetVolumeTypeQosSpecs", self.stub.SetVolumeTypeQosSpecs, request, timeout
        ).volume_type

    def create_qos_specs(
        self,
        name: str,
        specs: Mapping[str, str],
        *,
        consumer: str = "front-end",
        timeout: float | None = None,
    ) -> types_pb2.QosSpecs:
        """Creates QoS specs; a repeat with the same limits returns them (others: `AlreadyExists`).

        Example: ``storage.create_qos_specs("silver", {"total_iops_sec_per_gb": "10"})``
        """
        request = storage_pb2.CreateQosSpecsRequest(name=name, consumer=consumer, specs=specs)
        return self._unary("CreateQosSpecs", self.stub.CreateQosSpecs, request, timeout).qos_specs

    def get_qos_specs(self, qos_specs: str, *, timeout: float | None = None) -> types_pb2.QosSpecs:
        """QoS specs by id or name; raises `NotFound` if there are none."""
        request = storage_pb2.GetQosSpecsRequest(qos_specs=qos_specs)
        return self._unary("GetQosSpecs", self.stub.GetQosSpecs, request, timeout).qos_specs

    def list_qos_specs(self, *, page_size: int = 0, timeout: float | None = None) -> list[types_pb2.QosSpecs]:
        """Every QoS specs, in creation order."""
        out: list[types_pb2.QosSpecs] = []
        token = ""
        while True:
            request = storage_pb2.ListQosSpecsRequest(page_size=page_size, page_token=token)
            page = self._unary("ListQosSpecs", self.stub.ListQosSpecs, request, timeout)
            out.extend(page.qos_specs)
            token = page.next_page_token
            if not token:
                return out

    def update_qos_specs(
        self,
        qos_specs: str,
        *,
        specs: Mapping[str, str] | None = None,
        consumer: str = "",
        timeout: float | None = None,
    ) -> types_pb2.QosSpecs:
        """Replaces the consumer ("": kept) and/or all limits (None: kept)."""
        request = storage_pb2.UpdateQosSpecsRequest(qos_specs=qos_specs, consumer=consumer)
        if specs is not None:
            request.specs.CopyFrom(storage_pb2.QosLimits(specs=specs))
        return self._unary("UpdateQosSpecs", self.stub.UpdateQosSpecs, request, timeout).qos_specs

    def delete_qos_specs(self, qos_specs: str, *, timeout: float | None = None) -> None:
        """Deletes QoS specs; a repeat is OK. `FailedPrecondition` while a type is associated with them."""
        request = storage_pb2.DeleteQosSpecsRequest(qos_specs=qos_specs)
        self._unary("DeleteQosSpecs", self.stub.DeleteQosSpecs, request, timeout)


class HostAgentClient(_Client):
    """Client of `blockwire.v1.HostAgentService` (the `blockwire-agent` daemon of one compute host).

    Every call is idempotent by the API's contract (attach of what is attached returns the existing
    attachment; detach of what is gone is OK) and is retried on UNAVAILABLE and ABORTED.

    Example::

        with HostAgentClient("unix:///run/blockwire/agent.sock") as agent:
            att = agent.attach_volume("vm1", volume_id="vol-123", persistent=True)
            agent.detach_volume("vm1", "vol-123")
    """

    _service = "blockwire.v1.HostAgentService"

    def _init_stub(self) -> None:
        self.stub = hostagent_pb2_grpc.HostAgentServiceStub(self.channel)

    def get_connector(self, *, timeout: float | None = None) -> types_pb2.Connector:
        """This host's connector (initiator IQN, WWPNs, NVMe host NQN, multipath)."""
        request = hostagent_pb2.GetConnectorRequest()
        return self._unary("GetConnector", self.stub.GetConnector, request, timeout).connector

    def attach_volume(
        self,
        domain: str,
        *,
        volume_id: str | None = None,
        connection_info: types_pb2.ConnectionInfo | model.ConnectionInfo | Mapping[str, Any] | None = None,
        disk: types_pb2.DiskOptions | None = None,
        access_mode: types_pb2.AccessMode.ValueType = types_pb2.ACCESS_MODE_UNSPECIFIED,
        persistent: bool = False,
        allow_unverified_identity: bool = False,
        timeout: float | None = None,
    ) -> types_pb2.Attachment:
        """Attaches a volume (by id, or by connection info you hold) to a running domain.

        Idempotent per (domain, volume); a repeat with other options is FAILED_PRECONDITION.
        `allow_unverified_identity` admits connection info without wwn or serial (the device is then
        not checked). `connection_info` may also be the dict Cinder's drivers return (the agent converts
        it, see `blockwire.cinder`). Default deadline: 300 s. Example::

            disk = types_pb2.DiskOptions(bus=types_pb2.DISK_BUS_SCSI, target_dev="sdb")
            att = agent.attach_volume("vm1", volume_id=vol.id, disk=disk)
        """
        if (volume_id is None) == (connection_info is None):
            raise InvalidArgument("volume", "give exactly one of volume_id and connection_info")
        request = hostagent_pb2.AttachVolumeRequest(
            domain=domain,
            access_mode=access_mode,
            persistent=persistent,
            disk=disk,
            allow_unverified_identity=allow_unverified_identity,
        )
        if volume_id is not None:
            request.volume_id = volume_id
        elif isinstance(connection_info, Mapping):
            request.cinder_connection_info = json.dumps(connection_info)
        else:
            request.connection_info.CopyFrom(_connection_info_pb(connection_info))
        return self._unary("AttachVolume", self.stub.AttachVolume, request, timeout).attachment

    def detach_volume(
        self, domain: str, volume_id: str, *, force: bool = False, timeout: float | None = None
    ) -> None:
        """Detaches a volume from a domain and disconnects it from the host; a repeat is OK."""
        request = hostagent_pb2.DetachVolumeRequest(domain=domain, volume_id=volume_id, force=force)
        self._unary("DetachVolume", self.stub.DetachVolume, request, timeout)

    def extend_volume(self, volume_id: str, new_size_bytes: int = 0, *, timeout: float | None = None) -> int:
        """After storage grew a volume: rescan and resize on the host and in the domain. Returns the size."""
        request = hostagent_pb2.HostAgentServiceExtendVolumeRequest(
            volume_id=volume_id, new_size_bytes=new_size_bytes
        )
        return self._unary("ExtendVolume", self.stub.ExtendVolume, request, timeout).size_bytes

    def get_attachment(
        self, volume_id: str, domain: str = "", *, timeout: float | None = None
    ) -> types_pb2.Attachment:
        """This host's attachment of a volume (to `domain`, or its only one)."""
        request = hostagent_pb2.HostAgentServiceGetAttachmentRequest(volume_id=volume_id, domain=domain)
        return self._unary("GetAttachment", self.stub.GetAttachment, request, timeout).attachment

    def list_attachments(
        self, domain: str = "", *, timeout: float | None = None
    ) -> list[types_pb2.Attachment]:
        """This host's attachments, or those of one domain."""
        request = hostagent_pb2.HostAgentServiceListAttachmentsRequest(domain=domain)
        return list(self._unary("ListAttachments", self.stub.ListAttachments, request, timeout).attachments)

    # -- live migration (README "Live migration": the calls a virt manager makes)

    def prepare_migration(
        self,
        domain: str,
        domain_xml: str,
        volumes: list[hostagent_pb2.MigrationVolume],
        *,
        timeout: float | None = None,
    ) -> hostagent_pb2.PrepareMigrationResponse:
        """Destination: connects the arriving domain's volumes here; returns the destination XML to pass
        to libvirt as VIR_MIGRATE_PARAM_DEST_XML. A repeat returns the same. Example::

            listed = source.list_attachments("vm1")
            volumes = [hostagent_pb2.MigrationVolume(volume_id=a.volume_id, source_attachment_id=a.id,
                                                     target_dev=a.target_dev) for a in listed]
            xml = dest.prepare_migration("vm1", dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), volumes)
        """
        request = hostagent_pb2.PrepareMigrationRequest(domain=domain, domain_xml=domain_xml, volumes=volumes)
        return self._unary("PrepareMigration", self.stub.PrepareMigration, request, timeout)

    def finish_incoming_migration(
        self, domain: str, *, timeout: float | None = None
    ) -> list[types_pb2.Attachment]:
        """Destination, after libvirt migrated: the attachments become ordinary ones here."""
        request = hostagent_pb2.FinishIncomingMigrationRequest(domain=domain)
        return list(
            self._unary(
                "FinishIncomingMigration", self.stub.FinishIncomingMigration, request, timeout
            ).attachments
        )

    def finish_outgoing_migration(self, domain: str, *, timeout: float | None = None) -> list[str]:
        """Source, after libvirt migrated: releases the domain's volumes here; the volume ids released."""
        request = hostagent_pb2.FinishOutgoingMigrationRequest(domain=domain)
        return list(
            self._unary(
                "FinishOutgoingMigration", self.stub.FinishOutgoingMigration, request, timeout
            ).volume_ids
        )

    def abort_migration(self, domain: str, *, timeout: float | None = None) -> list[str]:
        """Either side, the migration did not complete: undoes what this side made; the volume ids."""
        request = hostagent_pb2.AbortMigrationRequest(domain=domain)
        return list(self._unary("AbortMigration", self.stub.AbortMigration, request, timeout).volume_ids)

    def migrate_domain(
        self,
        domain: str,
        destination_agent: str,
        destination_libvirt_uri: str,
        *,
        timeout: float | None = None,
    ) -> hostagent_pb2.MigrateDomainResponse:
        """Source: runs the whole migration agent to agent (see the RPC's comment)."""
        request = hostagent_pb2.MigrateDomainRequest(
            domain=domain,
            destination_agent=destination_agent,
            destination_libvirt_uri=destination_libvirt_uri,
        )
        return self._unary("MigrateDomain", self.stub.MigrateDomain, request, timeout)

    def connect_volume(
        self,
        connection_info: types_pb2.ConnectionInfo | model.ConnectionInfo | Mapping[str, Any],
        *,
        allow_unverified_identity: bool = False,
        timeout: float | None = None,
    ) -> types_pb2.HostDevice:
        """Connects a volume to the host only (no libvirt) and returns the verified device.
        `connection_info` may be Cinder's dict (see `attach_volume`)."""
        request = hostagent_pb2.ConnectVolumeRequest(allow_unverified_identity=allow_unverified_identity)
        _set_connection_info(request, connection_info)
        return self._unary("ConnectVolume", self.stub.ConnectVolume, request, timeout).device

    def disconnect_volume(
        self,
        connection_info: types_pb2.ConnectionInfo | model.ConnectionInfo | Mapping[str, Any],
        *,
        force: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Disconnects what `connect_volume` made; a repeat is OK."""
        request = hostagent_pb2.DisconnectVolumeRequest(force=force)
        _set_connection_info(request, connection_info)
        self._unary("DisconnectVolume", self.stub.DisconnectVolume, request, timeout)

    def audit_host(
        self, *, fix: bool = False, timeout: float | None = None
    ) -> list[hostagent_pb2.AuditFinding]:
        """What on this host (or in storage for it) no attachment accounts for (`blockwire doctor`); with
        `fix`, what is provably orphaned removed."""
        request = hostagent_pb2.AuditHostRequest(fix=fix)
        return list(self._unary("AuditHost", self.stub.AuditHost, request, timeout).findings)

    def watch_events(
        self,
        *,
        domain: str = "",
        volume_id: str = "",
        types: Iterable[hostagent_pb2.EventType.ValueType] = (),
        timeout: float | None = None,
    ) -> Stream[hostagent_pb2.WatchEventsResponse]:
        """Streams the agent's events (attach, detach, paths, resize, progress steps) until cancelled.

        Example, showing the steps of an attach made elsewhere::

            with agent.watch_events(volume_id=vid, types=[hostagent_pb2.EVENT_TYPE_PROGRESS]) as events:
                for e in events:
                    print(e.step, e.message)
        """
        request = hostagent_pb2.WatchEventsRequest(domain=domain, volume_id=volume_id, types=list(types))
        return self._stream(self.stub.WatchEvents, request, lambda r: r, timeout)


_GRPC: Final = {"rpc.system": "grpc"}


def _set_connection_info(
    request: hostagent_pb2.ConnectVolumeRequest | hostagent_pb2.DisconnectVolumeRequest,
    info: types_pb2.ConnectionInfo | model.ConnectionInfo | Mapping[str, Any],
) -> None:
    if isinstance(info, Mapping):
        request.cinder_connection_info = json.dumps(info)
    else:
        request.connection_info.CopyFrom(_connection_info_pb(info))


def _connection_info_pb(
    info: types_pb2.ConnectionInfo | model.ConnectionInfo | None,
) -> types_pb2.ConnectionInfo:
    if isinstance(info, model.ConnectionInfo):
        return convert.connection_info_to_pb(info)
    if info is None:
        raise InvalidArgument("connection_info", "required")
    return info


__all__ = [
    "DEFAULT_AGENT_TARGET",
    "DEFAULT_STORAGE_TARGET",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "Clock",
    "HostAgentClient",
    "RetryPolicy",
    "StorageClient",
    "Stream",
    "SystemClock",
    "TlsOptions",
    "make_channel",
    "normalize_target",
]
