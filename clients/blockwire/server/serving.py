"""What both daemons' servers share: listeners (unix socket, TCP with TLS or mutual TLS), health,
reflection, logging, signal handling, and who the caller is.

* Unix sockets: the socket is made mode 0660 (or the configured mode) and its directory, when this
  module creates it, 0750. Access to the socket is access to the service: a caller on the socket is an
  **admin** (file modes are the credential, as for docker.sock or libvirt-sock).
* TCP: with `TlsServer.cert_file` set, every TCP listener is TLS; with `client_ca_file` the client
  certificate is checked against that CA, and `require_client_cert` refuses a handshake without one
  (the client then sees UNAVAILABLE: the connection closes before any RPC). With
  `require_client_cert = false` gRPC does not ask for client certificates at all, so TCP callers have
  no role and every call is UNAUTHENTICATED (health and reflection still answer). Plaintext TCP is refused
  unless `allow_insecure_tcp` says so; it is logged as a warning at start, and its callers are admins.
* Roles come from the client certificate's SAN URI: ``blockwire://agent/<host>`` (a compute host's
  agent), ``blockwire://admin/<name>`` (an operator or a controller) or
  ``blockwire://storage-node/<name>`` (another storage node forwarding a call). See `identify`.
* Concurrency: every call but Health/Check belongs to a class (stream, long, quick) with its own bound
  (`blockwire.limits.Limits`, the daemon's [limits] table); past it the call is refused at once with
  RESOURCE_EXHAUSTED naming the bound (`LimitsInterceptor`). The thread pool has a thread for every call
  the bounds admit plus a reserve, and gRPC's maximum_concurrent_rpcs is the same number, so nothing
  ever queues for a thread and health always answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent import futures
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blockwire.limits import RESERVE, Limits

log = logging.getLogger(__name__)

ROLE_URI_PREFIX = "blockwire://"
ADMIN = "admin"
AGENT = "agent"
STORAGE_NODE = "storage-node"  # another blockwire-storage process of the cluster forwarding a call
ROLES = (ADMIN, AGENT, STORAGE_NODE)
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class ServingError(Exception):
    """A listener cannot be set up as configured; the message names the key."""


@dataclass(frozen=True)
class TlsServer:
    """TLS of a daemon's TCP listeners. All files are PEM; the key file should be mode 0600."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    require_client_cert: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def check(self, where: str = "tls") -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ServingError(f"[{where}] cert_file and key_file go together")
        if self.require_client_cert and self.enabled and not self.client_ca_file:
            raise ServingError(f"[{where}] require_client_cert needs client_ca_file")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ServingError(f"[{where}] {name}: {path} is not readable")

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=Path(self.client_ca_file).read_bytes() if self.client_ca_file else None,
            require_client_auth=self.require_client_cert,
        )


@dataclass(frozen=True)
class Listeners:
    unix_socket: str = ""
    unix_mode: int = 0o660
    tcp: tuple[str, ...] = ()
    tls: TlsServer = TlsServer()
    allow_insecure_tcp: bool = False


@dataclass(frozen=True)
class Identity:
    """Who called: `role` is "admin", "agent" or "storage-node"; `name` is the agent's host, the admin's
    or the storage node's name;
    `via` is "unix", "tls" or "insecure-tcp"."""

    role: str
    name: str
    via: str


def identify(context: grpc.ServicerContext) -> Identity | None:
    """The caller's identity, or None when it presented no credential (TLS without a client
    certificate). A certificate without a blockwire role URI gives role ""."""
    if context.peer().startswith("unix:"):
        return Identity(ADMIN, "local", "unix")
    auth: dict[str, list[bytes]] = dict(context.auth_context())  # type: ignore[arg-type]
    if b"ssl" not in auth.get("transport_security_type", []):
        return Identity(ADMIN, "insecure-tcp", "insecure-tcp")
    if not auth.get("x509_pem_cert"):
        return None
    for raw in auth.get("peer_uri", []):
        uri = raw.decode(errors="replace")
        if not uri.startswith(ROLE_URI_PREFIX):
            continue
        role, _, name = uri.removeprefix(ROLE_URI_PREFIX).partition("/")
        if role in ROLES and name and "/" not in name:
            return Identity(role, name, "tls")
    subject = b",".join(auth.get("x509_subject", [])).decode(errors="replace")
    return Identity("", subject[:200], "tls")


Policy = Callable[[Identity, str, Any], None]
"""Raises `blockwire.errors.PermissionDenied` when `identity` may not call `method` with `request`."""


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor  # generic in the stubs only


class AuthInterceptor(_Interceptor):
    """Checks every call of the services under `prefix` ("/blockwire.v1.StorageService/") with `policy`
    before the handler runs. No credential -> UNAUTHENTICATED; refused -> PERMISSION_DENIED."""

    def __init__(self, prefix: str, policy: Policy) -> None:
        self.prefix = prefix
        self.policy = policy

    def _check(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        from blockwire.errors import PermissionDenied  # noqa: PLC0415 - keeps this module's imports small

        who = identify(context)
        if who is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        if not who.role:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the client certificate names no blockwire role (SAN URI blockwire://agent/<host>, "
                "blockwire://admin/<name> or blockwire://storage-node/<name>)",
            )
        try:
            self.policy(who, method, request)
        except PermissionDenied as exc:
            log.warning("denied %s to %s %s (%s): %s", method, who.role, who.name, who.via, exc.message)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.message)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method.rsplit("/", 1)[1]
        check = self._check
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                check(method, request, context)
                return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            def streaming(request: Any, context: grpc.ServicerContext) -> Any:
                check(method, request, context)
                yield from stream(request, context)

            return grpc.unary_stream_rpc_method_handler(
                streaming, handler.request_deserializer, handler.response_serializer
            )
        return handler  # no client-streaming RPCs in v1


def admin_only(identity: Identity, method: str, request: Any) -> None:
    """The agent's policy: admins (TLS admin certificate, or the unix socket) only."""
    from blockwire.errors import PermissionDenied  # noqa: PLC0415

    if identity.role != ADMIN:
        raise PermissionDenied(
            f"{method} needs an admin credential; {identity.role} {identity.name} has none"
        )


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
"""The one method no class bound refuses: it has the reserve threads (and is answered at once)."""


@dataclass(frozen=True)
class _CallClass:
    key: str  # the [limits] key
    running: str  # "streams open", as in "has 64 streams open"
    advice: str


_STREAM = _CallClass(
    "max_streams",
    "streams open",
    "close idle streams (each open WatchEvents or WatchVolume holds one), or raise",
)
_LONG = _CallClass("max_long_calls", "long calls running", "retry when some have finished, or raise")
_QUICK = _CallClass("max_quick_calls", "calls running", "retry in a moment, or raise")


class _Gate:
    """A non-blocking bound of one call class: `enter` admits a call or says how many run."""

    def __init__(self, kind: _CallClass, bound: int) -> None:
        self.kind = kind
        self.bound = bound
        self._lock = threading.Lock()
        self._running = 0
        self._full_logged = False

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    def enter(self) -> bool:
        with self._lock:
            if self._running >= self.bound:
                first = not self._full_logged
                self._full_logged = True
            else:
                self._running += 1
                return True
        if first:
            log.warning(
                "%d %s: the bound [limits] %s is reached; further calls of that kind are refused "
                "(RESOURCE_EXHAUSTED) until some end",
                self.bound,
                self.kind.running,
                self.kind.key,
            )
        return False

    def leave(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running < self.bound:
                self._full_logged = False


class LimitsInterceptor(_Interceptor):
    """Bounds concurrent calls per class (`blockwire.limits`): server or client streaming handlers are
    "stream", the methods in `long_methods` (full names, "/blockwire.v1.HostAgentService/AttachVolume")
    "long", the rest "quick"; Health/Check is exempt. A call past its class's bound is refused at once
    with RESOURCE_EXHAUSTED, a message naming the bound, its value and what to do, and trailing metadata
    `blockwire.limits.LIMIT_METADATA` = the bound's key (`blockwire.status.abort_with` of a
    `ConcurrencyLimit`). The count is taken in the worker thread when the handler starts, and given
    back when it ends (a stream: when its generator ends or is closed)."""

    def __init__(
        self, limits: Limits, long_methods: Collection[str] = (), daemon: str = "the server"
    ) -> None:
        self.limits = limits
        self.long_methods = frozenset(long_methods)
        self.daemon = daemon
        self.streams = _Gate(_STREAM, limits.max_streams)
        self.long = _Gate(_LONG, limits.max_long_calls)
        self.quick = _Gate(_QUICK, limits.max_quick_calls)

    def gate_for(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> _Gate | None:
        if method == HEALTH_CHECK:
            return None
        if handler.request_streaming or handler.response_streaming:
            return self.streams
        return self.long if method in self.long_methods else self.quick

    def _admit(self, gate: _Gate, method: str, context: grpc.ServicerContext) -> None:
        if gate.enter():
            return
        from blockwire.errors import ConcurrencyLimit  # noqa: PLC0415 - keeps this module's imports small
        from blockwire.status import abort_with  # noqa: PLC0415

        kind = gate.kind
        message = (
            f"{method.rsplit('/', 1)[-1]} refused: {self.daemon} has {gate.bound} {kind.running}, its "
            f"bound ([limits] {kind.key} = {gate.bound}); {kind.advice} [limits] {kind.key} in its "
            "config. This is a concurrency bound, not a lack of space."
        )
        log.debug("refused %s: %s at its bound %d", method, kind.key, gate.bound)
        abort_with(context, ConcurrencyLimit(message, kind.key))

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        gate = self.gate_for(method, handler)
        if gate is None:
            return handler
        return _gated(handler, lambda context: self._admit(gate, method, context), gate.leave)


def status_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status a handler ended with: what abort() or set_code() set; None when it set none."""
    code = context.code()  # type: ignore[attr-defined]  # not in the stubs
    return code if isinstance(code, grpc.StatusCode) else None


def around(
    handler: grpc.RpcMethodHandler[Any, Any],
    scope: Callable[[grpc.ServicerContext], AbstractContextManager[object]],
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with its behavior run inside `scope(context)`: entered before it starts (for a stream:
    when the worker starts it), left once it has ended, failed or not. The one place interceptors
    (limits, metrics, tracing) wrap a call."""

    def once(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            with scope(context):
                return behavior(request, context)

        return run

    def streamed(behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with scope(context):  # in the generator: entered when the worker starts the stream
                yield from behavior(request, context)

        return run

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(once(handler.unary_unary), des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streamed(handler.unary_stream), des, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(once(handler.stream_unary), des, ser)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streamed(handler.stream_stream), des, ser)
    return handler


def _gated(
    handler: grpc.RpcMethodHandler[Any, Any],
    admit: Callable[[grpc.ServicerContext], None],
    leave: Callable[[], None],
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with `admit` before its behavior runs and `leave` once it has ended."""

    @contextlib.contextmanager
    def gate(context: grpc.ServicerContext) -> Iterator[None]:
        admit(context)
        try:
            yield
        finally:
            leave()

    return around(handler, gate)


@dataclass
class Serving:
    server: grpc.Server
    health: health.HealthServicer
    addresses: tuple[str, ...]
    services: tuple[str, ...]
    gates: LimitsInterceptor

    def stop(self, grace: float) -> None:
        """NOT_SERVING, stop accepting, let calls in flight finish within `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)


def _prepare_unix(path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o750)
    if path.is_socket() or path.is_symlink():
        path.unlink()  # a stale socket of a previous run
    elif path.exists():
        raise ServingError(f"{path} exists and is not a socket")


def start(
    *,
    services: Sequence[str],
    register: Callable[[grpc.Server], None],
    listeners: Listeners,
    limits: Limits | None = None,
    long_methods: Collection[str] = (),
    daemon: str = "the server",
    interceptors: Iterable[grpc.ServerInterceptor[Any, Any]] = (),
    outer: Iterable[grpc.ServerInterceptor[Any, Any]] = (),
) -> Serving:
    """Builds, binds and starts a server with `register`'s services, health and reflection; health
    reports SERVING for "" and each of `services` once every listener is bound.

    Every call passes a `LimitsInterceptor` with `limits` (`long_methods`: full method names of the
    daemon's long calls; `daemon` names it in refusals) before `interceptors`; `outer` ones (metrics) see
    every call first, refusals included. The pool has
    `limits.threads` threads and the server takes no more calls in flight than that."""
    if listeners.tls.enabled:
        listeners.tls.check()
    limits = limits or Limits()
    gates = LimitsInterceptor(limits, long_methods, daemon)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.threads, thread_name_prefix="rpc"),
        interceptors=[*outer, gates, *interceptors],
        maximum_concurrent_rpcs=limits.threads,
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    addresses: list[str] = []
    if listeners.unix_socket:
        path = Path(listeners.unix_socket)
        _prepare_unix(path)
        server.add_insecure_port(f"unix:{path}")
        addresses.append(f"unix://{path}")
    for address in listeners.tcp:
        try:
            if listeners.tls.enabled:
                port = server.add_secure_port(address, listeners.tls.credentials())
            elif listeners.allow_insecure_tcp:
                log.warning("%s: plaintext TCP without authentication (allow_insecure_tcp = true)", address)
                port = server.add_insecure_port(address)
            else:
                raise ServingError(
                    f"TCP listener {address}: configure [tls] cert_file and key_file, "
                    "or set allow_insecure_tcp = true (plaintext, no authentication)"
                )
        except RuntimeError as exc:
            raise ServingError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise ServingError(f"cannot listen on {address}")
        scheme = "tls" if listeners.tls.enabled else "tcp"
        addresses.append(f"{scheme}://{address.rpartition(':')[0]}:{port}")
    if not addresses:
        raise ServingError("no listener: set a unix socket or a TCP address")
    server.start()
    if listeners.unix_socket:
        os.chmod(listeners.unix_socket, listeners.unix_mode)
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "%s takes %d streams, %d long calls and %d other calls at once (%d threads, %d kept for health)",
        daemon,
        limits.max_streams,
        limits.max_long_calls,
        limits.max_quick_calls,
        limits.threads,
        RESERVE,
    )
    return Serving(server, health_servicer, tuple(addresses), tuple(services), gates)


# -- logging and signals (daemons only: the libraries never configure logging)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class KvFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        level = record.levelname.lower()
        line = f"ts={ts} level={level} logger={record.name} msg={json.dumps(record.getMessage())}"
        if record.exc_info:
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


def configure_logging(fmt: str, level: str) -> None:
    """One handler on stderr: "json" (an object a line) or "kv" (key=value)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KvFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class ShutdownSignal:
    """Set by SIGTERM or SIGINT (or `set()`); `wait()` blocks the main thread until then.

    A bare `threading.Event.wait()` is not enough: the kernel may deliver a process-directed signal to
    any thread (a gRPC poller, a worker), and then CPython only flags the handler for the main thread,
    which stays asleep in the lock until something else wakes it. Here the C-level handler also writes
    a byte to `signal.set_wakeup_fd`'s socket, whichever thread takes the signal, and `wait()` sleeps on
    that socket, so the main thread wakes, runs the Python handler and sees the event.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        self.set()

    def set(self) -> None:
        self._event.set()
        with contextlib.suppress(BlockingIOError):
            self._writer.send(b"\0")

    def wait(self) -> None:
        """Returns once shutdown was asked for. Only the main thread may call it."""
        while not self._event.is_set():
            self._reader.recv(512)  # a signal's byte, or set()'s; the Python handler runs on return


def stop_on_signals() -> ShutdownSignal:
    """Installs the SIGTERM and SIGINT handlers (main thread, before any other thread starts)."""
    return ShutdownSignal()
