"""The `blockwire` command line: volumes, snapshots, attach and detach, health.

It talks to `blockwire-storage` (``--storage``) and to the `blockwire-agent` of this host (``--agent``)
through `blockwire.client`. Output is a table or key/value block for people, or JSON with ``--json``;
progress goes to stderr; the exit code says what went wrong (see `EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO, TypeVar

from google.protobuf.message import Message

from blockwire import __version__, completion
from blockwire import output as out
from blockwire.client import (
    DEFAULT_AGENT_TARGET,
    DEFAULT_STORAGE_TARGET,
    HEALTH_SERVING,
    LONG_CALL_TIMEOUTS,
    Clock,
    HostAgentClient,
    StorageClient,
    TlsOptions,
)
from blockwire.errors import BlockwireError, ConcurrencyLimit, InvalidArgument
from blockwire.sizes import format_size, parse_size
from blockwire.v1 import hostagent_pb2, types_pb2

_T = TypeVar("_T")

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_CONFLICT: Final = 4
EXIT_UNAVAILABLE: Final = 5
EXIT_PERMISSION: Final = 6
EXIT_DEADLINE: Final = 7
EXIT_NO_SPACE: Final = 8
EXIT_BUSY: Final = 9
EXIT_FINDINGS: Final = 10  # `doctor`: something is unaccounted for
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final[dict[str, int]] = {
    "INVALID_ARGUMENT": EXIT_USAGE,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "ALREADY_EXISTS": EXIT_CONFLICT,
    "FAILED_PRECONDITION": EXIT_CONFLICT,
    "ABORTED": EXIT_CONFLICT,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "PERMISSION_DENIED": EXIT_PERMISSION,
    "UNAUTHENTICATED": EXIT_PERMISSION,
    "DEADLINE_EXCEEDED": EXIT_DEADLINE,
    "RESOURCE_EXHAUSTED": EXIT_NO_SPACE,
}
"""Exit code per gRPC status name; anything else is EXIT_ERROR."""

EPILOG: Final = """\
exit codes:
  0  success
  1  other error (a bug or an unexpected answer; see the daemon's log)
  2  usage: a bad command line or an argument the service refused (INVALID_ARGUMENT)
  3  not found (NOT_FOUND)
  4  conflict: the object's state forbids it, the name is taken, or another operation on the
     volume is in flight (FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED)
  5  a daemon cannot be reached (UNAVAILABLE), or `health` found one not serving
  6  permission denied (PERMISSION_DENIED, UNAUTHENTICATED)
  7  deadline exceeded (DEADLINE_EXCEEDED); raise --timeout or look at the daemon's log
  8  out of space (RESOURCE_EXHAUSTED)
  9  busy: a daemon runs as many calls of that kind as its [limits] allow (RESOURCE_EXHAUSTED naming
     the bound); run the command again in a moment
  130 interrupted

environment:
  BLOCKWIRE_STORAGE  default for --storage (else unix:///run/blockwire/storage.sock)
  BLOCKWIRE_AGENT    default for --agent (else unix:///run/blockwire/agent.sock)

examples:
  blockwire volume create data1 10G
  blockwire volume create web1-root --from-image /srv/images/debian.qcow2
  blockwire attach vm1 VOLUME_ID --persistent
  blockwire attachments --json
"""

_BUSES: Final = {
    "scsi": types_pb2.DISK_BUS_SCSI,
    "virtio": types_pb2.DISK_BUS_VIRTIO,
    "sata": types_pb2.DISK_BUS_SATA,
}
_CACHES: Final = {
    "none": types_pb2.DISK_CACHE_NONE,
    "writethrough": types_pb2.DISK_CACHE_WRITETHROUGH,
    "writeback": types_pb2.DISK_CACHE_WRITEBACK,
    "directsync": types_pb2.DISK_CACHE_DIRECTSYNC,
    "unsafe": types_pb2.DISK_CACHE_UNSAFE,
}
_IOS: Final = {
    "native": types_pb2.DISK_IO_NATIVE,
    "threads": types_pb2.DISK_IO_THREADS,
    "io_uring": types_pb2.DISK_IO_IO_URING,
}
_DISCARDS: Final = {"ignore": types_pb2.DISK_DISCARD_IGNORE, "unmap": types_pb2.DISK_DISCARD_UNMAP}
_IMAGE_FORMATS: Final = {"raw": types_pb2.IMAGE_FORMAT_RAW, "qcow2": types_pb2.IMAGE_FORMAT_QCOW2}
_ATTACH_EVENTS: Final = (
    hostagent_pb2.EVENT_TYPE_ATTACH_STARTED,
    hostagent_pb2.EVENT_TYPE_PROGRESS,
    hostagent_pb2.EVENT_TYPE_ATTACHED,
    hostagent_pb2.EVENT_TYPE_ATTACH_FAILED,
)
_DETACH_EVENTS: Final = (
    hostagent_pb2.EVENT_TYPE_DETACH_STARTED,
    hostagent_pb2.EVENT_TYPE_PROGRESS,
    hostagent_pb2.EVENT_TYPE_DETACHED,
    hostagent_pb2.EVENT_TYPE_DETACH_FAILED,
)

_FINAL_EVENTS: Final = frozenset(
    {
        hostagent_pb2.EVENT_TYPE_ATTACHED,
        hostagent_pb2.EVENT_TYPE_ATTACH_FAILED,
        hostagent_pb2.EVENT_TYPE_DETACHED,
        hostagent_pb2.EVENT_TYPE_DETACH_FAILED,
    }
)
_FINAL_EVENT_WAIT: Final = 2.0
_STREAM_OPEN_WAIT: Final = 5.0  # seconds the CLI waits for its event stream to be open before it calls


class UsageError(Exception):
    """A command line that cannot work; exits with EXIT_USAGE."""


class _Context:
    """What a command needs: its arguments, lazily made clients, and where to write."""

    def __init__(self, args: argparse.Namespace, clock: Clock | None) -> None:
        self.args = args
        self.clock = clock
        self.stdout: TextIO = sys.stdout
        self.stderr: TextIO = sys.stderr
        self._storage: StorageClient | None = None
        self._agent: HostAgentClient | None = None
        self.daemon = ""  # the daemon of the last client handed out, for error hints

    def _client_options(self) -> dict[str, Any]:
        a = self.args
        tls = None
        if a.tls or a.tls_ca or a.tls_cert or a.tls_key or a.tls_server_name:
            tls = TlsOptions(
                ca_file=a.tls_ca, cert_file=a.tls_cert, key_file=a.tls_key, server_name=a.tls_server_name
            )
        options: dict[str, Any] = {"tls": tls, "clock": self.clock}
        if a.timeout is not None:
            options["timeout"] = a.timeout
            options["timeouts"] = dict.fromkeys(LONG_CALL_TIMEOUTS, a.timeout)
        return options

    @property
    def storage(self) -> StorageClient:
        self.daemon = "storage"
        if self._storage is None:
            self._storage = StorageClient(self.args.storage, **self._client_options())
        return self._storage

    @property
    def agent(self) -> HostAgentClient:
        self.daemon = "agent"
        if self._agent is None:
            self._agent = HostAgentClient(self.args.agent, **self._client_options())
        return self._agent

    def close(self) -> None:
        for client in (self._storage, self._agent):
            if client is not None:
                client.close()

    def print(self, text: str) -> None:
        print(text, file=self.stdout)

    def json(self, data: Any) -> None:
        print(out.dumps(data), file=self.stdout)

    @property
    def progress(self) -> bool:
        if self.args.json and self.args.progress is None:
            return False
        if self.args.progress is not None:
            return bool(self.args.progress)
        return self.stderr.isatty()


# Volumes


def _labels(items: Sequence[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument("--label", f"{item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


class _VolumeProgress:
    """Shows a volume's CREATING progress on stderr: one rewritten line on a terminal, else lines."""

    def __init__(self, ctx: _Context, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.tty = ctx.stderr.isatty()
        self.last = ""
        self.shown = False

    def __call__(self, volume: types_pb2.Volume) -> None:
        text = f"{self.name}: {out.volume_state(volume.state)}"
        if volume.state == types_pb2.VOLUME_STATE_CREATING:
            text += f" {out.progress_text(volume.progress)}"
        if text == self.last:
            return
        self.last = text
        self.shown = True
        if self.tty:
            print(f"\r\033[K{text}", end="", file=self.ctx.stderr, flush=True)
        else:
            print(text, file=self.ctx.stderr, flush=True)

    def done(self) -> None:
        if self.tty and self.shown:
            print(file=self.ctx.stderr, flush=True)


def cmd_volume_create(ctx: _Context) -> int:
    a = ctx.args
    size = parse_size(a.size, "size") if a.size else 0
    if size == 0 and not (a.from_snapshot or a.from_volume or a.from_image):
        raise UsageError("give a SIZE (e.g. 10G) or a source (--from-snapshot, --from-volume, --from-image)")
    volume = ctx.storage.create_volume(
        a.name,
        size,
        backend=a.backend or "",
        multiattach=a.multiattach,
        labels=_labels(a.label),
        source_snapshot_id=a.from_snapshot,
        source_volume_id=a.from_volume,
        source_image=a.from_image,
        image_format=_IMAGE_FORMATS.get(a.image_format or "", types_pb2.IMAGE_FORMAT_UNSPECIFIED),
        encrypted=a.encrypted,
        key_size_bits=a.key_size or 0,
        volume_type=a.type or "",
    )
    if a.wait and volume.state not in _SETTLED:
        progress = _VolumeProgress(ctx, a.name) if ctx.progress else None
        try:
            volume = ctx.storage.wait_volume(volume.id, on_update=progress, timeout=a.timeout)
        finally:
            if progress is not None:
                progress.done()
    _show_volume(ctx, volume)
    if volume.state == types_pb2.VOLUME_STATE_ERROR:
        print(
            f"blockwire: volume {volume.id} failed: {volume.error_message or 'no reason given'}",
            file=ctx.stderr,
        )
        print(
            "hint: delete it with `blockwire volume delete " + volume.id + "` and try again", file=ctx.stderr
        )
        return EXIT_ERROR
    return EXIT_OK


_SETTLED: Final = (
    types_pb2.VOLUME_STATE_AVAILABLE,
    types_pb2.VOLUME_STATE_IN_USE,
    types_pb2.VOLUME_STATE_ERROR,
)


def _show_volume(ctx: _Context, volume: types_pb2.Volume) -> None:
    if ctx.args.json:
        ctx.json(out.message_to_dict(volume))
    else:
        ctx.print(out.volume_fields(volume))


def _print_list(ctx: _Context, items: Sequence[Message], table: Callable[[Any], str], noun: str) -> int:
    """A listing as JSON, as a table, or "no <noun>s" when empty."""
    if ctx.args.json:
        ctx.json([out.message_to_dict(i) for i in items])
    elif items:
        ctx.print(table(items))
    else:
        ctx.print(f"no {noun}s")
    return EXIT_OK


def _delete_each(ctx: _Context, ids: Sequence[str], delete: Callable[[str], None], noun: str) -> int:
    """Deletes each id in order (a failure stops there, with its exit code); JSON lists what was deleted."""
    for object_id in ids:
        delete(object_id)
        if not ctx.args.json:
            ctx.print(f"deleted {noun} {object_id}")
    if ctx.args.json:
        ctx.json({"deleted": list(ids)})
    return EXIT_OK


def cmd_volume_list(ctx: _Context) -> int:
    volumes = ctx.storage.list_volumes(label_selector=_labels(ctx.args.label))
    return _print_list(ctx, volumes, out.volume_table, "volume")


def cmd_volume_show(ctx: _Context) -> int:
    _show_volume(ctx, ctx.storage.get_volume(ctx.args.volume_id))
    return EXIT_OK


def cmd_volume_delete(ctx: _Context) -> int:
    return _delete_each(ctx, ctx.args.volume_ids, ctx.storage.delete_volume, "volume")


def cmd_volume_extend(ctx: _Context) -> int:
    a = ctx.args
    volume = ctx.storage.extend_volume(a.volume_id, parse_size(a.size, "size"))
    host_size = None
    if a.host:
        host_size = ctx.agent.extend_volume(a.volume_id, volume.size_bytes)
    if a.json:
        data = out.message_to_dict(volume)
        if host_size is not None:
            data = {"volume": data, "host_size_bytes": str(host_size)}
        ctx.json(data)
    else:
        ctx.print(out.volume_fields(volume))
        if host_size is not None:
            ctx.print(f"host and domain see {format_size(host_size)}")
    return EXIT_OK


# Snapshots


def _show_snapshot(ctx: _Context, snapshot: types_pb2.Snapshot) -> None:
    if ctx.args.json:
        ctx.json(out.message_to_dict(snapshot))
    else:
        ctx.print(out.snapshot_fields(snapshot))


def cmd_snapshot_create(ctx: _Context) -> int:
    a = ctx.args
    _show_snapshot(ctx, ctx.storage.create_snapshot(a.volume_id, a.name, labels=_labels(a.label)))
    return EXIT_OK


def cmd_snapshot_list(ctx: _Context) -> int:
    snapshots = ctx.storage.list_snapshots(volume_id=ctx.args.volume or "")
    return _print_list(ctx, snapshots, out.snapshot_table, "snapshot")


def cmd_snapshot_show(ctx: _Context) -> int:
    _show_snapshot(ctx, ctx.storage.get_snapshot(ctx.args.snapshot_id))
    return EXIT_OK


def cmd_snapshot_delete(ctx: _Context) -> int:
    return _delete_each(ctx, ctx.args.snapshot_ids, ctx.storage.delete_snapshot, "snapshot")


# Volume types and QoS specs


def _specs(items: Sequence[str] | None, option: str) -> dict[str, str]:
    specs: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(option, f"{item!r} is not KEY=VALUE")
        specs[key] = value
    return specs


def _show(ctx: _Context, message: Message, text: Callable[[Any], str]) -> int:
    if ctx.args.json:
        ctx.json(out.message_to_dict(message))
    else:
        ctx.print(text(message))
    return EXIT_OK


def cmd_type_create(ctx: _Context) -> int:
    a = ctx.args
    t = ctx.storage.create_volume_type(
        a.name, description=a.description or "", extra_specs=_specs(a.spec, "--spec"), qos_specs=a.qos or ""
    )
    return _show(ctx, t, out.volume_type_fields)


def cmd_type_list(ctx: _Context) -> int:
    return _print_list(ctx, ctx.storage.list_volume_types(), out.volume_type_table, "volume type")


def cmd_type_show(ctx: _Context) -> int:
    return _show(ctx, ctx.storage.get_volume_type(ctx.args.type), out.volume_type_fields)


def cmd_type_set(ctx: _Context) -> int:
    a = ctx.args
    if a.description is None and a.spec is None and not a.no_specs:
        raise UsageError("give --description, --spec KEY=VALUE or --no-specs")
    if a.spec is not None and a.no_specs:
        raise UsageError("--spec and --no-specs exclude each other")
    specs = {} if a.no_specs else (_specs(a.spec, "--spec") if a.spec is not None else None)
    t = ctx.storage.update_volume_type(a.type, description=a.description, extra_specs=specs)
    return _show(ctx, t, out.volume_type_fields)


def cmd_type_qos(ctx: _Context) -> int:
    a = ctx.args
    return _show(ctx, ctx.storage.set_volume_type_qos_specs(a.type, a.qos or ""), out.volume_type_fields)


def cmd_type_delete(ctx: _Context) -> int:
    return _delete_each(ctx, ctx.args.types, ctx.storage.delete_volume_type, "volume type")


def cmd_qos_create(ctx: _Context) -> int:
    a = ctx.args
    q = ctx.storage.create_qos_specs(a.name, _specs(a.limit, "--limit"), consumer=a.consumer)
    return _show(ctx, q, out.qos_specs_fields)


def cmd_qos_list(ctx: _Context) -> int:
    return _print_list(ctx, ctx.storage.list_qos_specs(), out.qos_specs_table, "QoS spec")


def cmd_qos_show(ctx: _Context) -> int:
    return _show(ctx, ctx.storage.get_qos_specs(ctx.args.qos), out.qos_specs_fields)


def cmd_qos_set(ctx: _Context) -> int:
    a = ctx.args
    if a.limit is None and not a.consumer:
        raise UsageError("give --limit KEY=VALUE or --consumer")
    specs = _specs(a.limit, "--limit") if a.limit is not None else None
    q = ctx.storage.update_qos_specs(a.qos, specs=specs, consumer=a.consumer or "")
    return _show(ctx, q, out.qos_specs_fields)


def cmd_qos_delete(ctx: _Context) -> int:
    return _delete_each(ctx, ctx.args.qos_specs, ctx.storage.delete_qos_specs, "QoS specs")


# Attach and detach


class _EventProgress:
    """Follows the agent's events for one volume in a thread and shows its steps on stderr."""

    def __init__(self, ctx: _Context, domain: str, volume_id: str, types: Sequence[int]) -> None:
        self.ctx = ctx
        self.stream = ctx.agent.watch_events(domain=domain, volume_id=volume_id, types=types)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self._run, name="blockwire-progress", daemon=True)
        self.finished = threading.Event()  # the final event was shown, or the stream ended

    def _run(self) -> None:
        try:
            for event in self.stream:
                kind = out.enum_name(hostagent_pb2.EventType, event.type, "EVENT_TYPE_")
                if event.type == hostagent_pb2.EVENT_TYPE_PROGRESS:
                    text = f"  {event.step or 'step'}: done"
                else:
                    text = f"{kind.replace('_', ' ')}"
                if event.message:
                    text += f" ({event.message})"
                print(text, file=self.ctx.stderr, flush=True)
                if event.type in _FINAL_EVENTS:
                    self.finished.set()
        except BlockwireError:
            return  # progress is best effort: an agent without events still attaches
        finally:
            self.finished.set()

    def __enter__(self) -> _EventProgress:
        self.thread.start()
        # The agent answers WatchEvents' headers once it has subscribed: the call starts after that, so
        # its first steps are not missed (bounded: progress is best effort).
        self.stream.wait_open(_STREAM_OPEN_WAIT)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            # The call's answer can overtake its last event: give the event a moment to arrive.
            self.finished.wait(timeout=_FINAL_EVENT_WAIT)
        self.stream.cancel()
        self.thread.join(timeout=5.0)


def _disk_options(a: argparse.Namespace) -> types_pb2.DiskOptions:
    return types_pb2.DiskOptions(
        bus=_BUSES.get(a.bus or "", types_pb2.DISK_BUS_UNSPECIFIED),
        cache=_CACHES.get(a.cache or "", types_pb2.DISK_CACHE_UNSPECIFIED),
        io=_IOS.get(a.io or "", types_pb2.DISK_IO_UNSPECIFIED),
        discard=_DISCARDS.get(a.discard or "", types_pb2.DISK_DISCARD_UNSPECIFIED),
        serial=a.serial or "",
        read_only=a.read_only,
        shareable=a.shareable,
        target_dev=a.target_dev or "",
    )


def cmd_attach(ctx: _Context) -> int:
    a = ctx.args
    mode = types_pb2.ACCESS_MODE_READ_ONLY if a.read_only else types_pb2.ACCESS_MODE_READ_WRITE

    if (a.volume_id is None) == (a.connection_info is None):
        raise InvalidArgument("VOLUME_ID", "give a volume id or --connection-info FILE, not both")
    cinder_info = _read_json(a.connection_info, "--connection-info") if a.connection_info else None
    volume_id = (
        a.volume_id or str(cinder_info.get("data", {}).get("volume_id", "")) if cinder_info else a.volume_id
    )

    def attach() -> types_pb2.Attachment:
        return ctx.agent.attach_volume(
            a.domain,
            volume_id=a.volume_id,
            connection_info=cinder_info,
            disk=_disk_options(a),
            access_mode=mode,
            persistent=a.persistent,
            allow_unverified_identity=a.allow_unverified_identity,
        )

    attachment = _with_events(ctx, a.domain, volume_id or "", _ATTACH_EVENTS, attach)
    if a.json:
        ctx.json(out.message_to_dict(attachment))
    else:
        ctx.print(out.attachment_fields(attachment))
    return EXIT_OK


def _read_json(path: str, option: str) -> dict[str, Any]:
    """A JSON object from a file ("-": standard input)."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
        doc = json.loads(text)
    except OSError as exc:
        raise InvalidArgument(option, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidArgument(option, f"{path} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(option, f"{path} holds no JSON object")
    return doc


def cmd_detach(ctx: _Context) -> int:
    a = ctx.args

    def detach() -> None:
        ctx.agent.detach_volume(a.domain, a.volume_id, force=a.force)

    _with_events(ctx, a.domain, a.volume_id, _DETACH_EVENTS, detach)
    if a.json:
        ctx.json({"domain": a.domain, "volume_id": a.volume_id, "detached": True})
    else:
        ctx.print(f"detached volume {a.volume_id} from {a.domain}")
    return EXIT_OK


def _with_events(
    ctx: _Context, domain: str, volume_id: str, types: Sequence[int], work: Callable[[], _T]
) -> _T:
    if not ctx.progress:
        return work()
    with _EventProgress(ctx, domain, volume_id, types):
        return work()


def cmd_attachments(ctx: _Context) -> int:
    a = ctx.args
    rows: list[tuple[str, types_pb2.Attachment]] = []
    data: dict[str, Any] = {}
    if a.source in ("agent", "both"):
        found = ctx.agent.list_attachments(a.domain or "")
        found = [x for x in found if not a.volume or x.volume_id == a.volume]
        rows += [("agent", x) for x in found]
        data["agent"] = [out.message_to_dict(x) for x in found]
    if a.source in ("storage", "both"):
        found = ctx.storage.list_attachments(volume_id=a.volume or "", host=a.host or "")
        found = [x for x in found if not a.domain or x.domain == a.domain]
        rows += [("storage", x) for x in found]
        data["storage"] = [out.message_to_dict(x) for x in found]
    if a.json:
        ctx.json(data)
    elif rows:
        ctx.print(out.attachment_table(rows))
    else:
        ctx.print("no attachments")
    return EXIT_OK


def cmd_connector(ctx: _Context) -> int:
    connector = ctx.agent.get_connector()
    if ctx.args.json:
        ctx.json(out.message_to_dict(connector))
    else:
        ctx.print(out.connector_fields(connector))
    return EXIT_OK


def cmd_doctor(ctx: _Context) -> int:
    findings = ctx.agent.audit_host(fix=ctx.args.fix)
    if ctx.args.json:
        ctx.json([out.message_to_dict(f) for f in findings])
    elif not findings:
        ctx.print("nothing unaccounted for")
    else:
        rows = [
            (f.kind, f.name, "removed" if f.fixed else "fixable" if f.fixable else "-", f.detail)
            for f in findings
        ]
        ctx.print(out.table(("KIND", "NAME", "FIX", "DETAIL"), rows))
    left = [f for f in findings if not f.fixed]
    return EXIT_FINDINGS if left else EXIT_OK


def cmd_capacity(ctx: _Context) -> int:
    backends = ctx.storage.get_capacity(ctx.args.backend or "")
    if ctx.args.json:
        ctx.json([out.message_to_dict(b) for b in backends])
    else:
        ctx.print(
            out.table(
                ("BACKEND", "TOTAL", "FREE", "PROVISIONED", "MAX VOLUME"),
                (
                    (
                        b.backend,
                        format_size(b.total_bytes),
                        format_size(b.free_bytes),
                        format_size(b.provisioned_bytes),
                        format_size(b.max_volume_bytes),
                    )
                    for b in backends
                ),
            )
        )
    return EXIT_OK


def cmd_nodes(ctx: _Context) -> int:
    nodes = ctx.storage.list_storage_nodes()
    if ctx.args.json:
        ctx.json([out.message_to_dict(n) for n in nodes])
        return EXIT_OK
    ctx.print(
        out.table(
            ("NODE", "ADDRESS", "STATE", "LAST HEARTBEAT", "BACKEND", "KIND", "SHARED", "FREE", "VOLUMES"),
            (
                (
                    n.name or "(single)",
                    n.address or "-",
                    "up" if n.up else "DOWN",
                    n.last_heartbeat.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                    b.name,
                    b.kind,
                    "yes" if b.shared else "no",
                    format_size(b.free_bytes),
                    str(b.volume_count),
                )
                for n in nodes
                for b in n.backends
            ),
        )
    )
    return EXIT_OK


def cmd_health(ctx: _Context) -> int:
    a = ctx.args
    results: list[dict[str, str]] = []
    for name in ("storage", "agent"):
        if a.only not in (None, name):
            continue
        address = getattr(a, name)
        try:
            client: StorageClient | HostAgentClient = ctx.storage if name == "storage" else ctx.agent
            status, detail = client.health(), ""
        except BlockwireError as exc:
            status, detail = ("UNREACHABLE" if exc.code == "UNAVAILABLE" else exc.code), exc.message
        results.append({"daemon": name, "address": address, "status": status, "detail": detail})
    if a.json:
        ctx.json(results)
    else:
        ctx.print(
            out.table(
                ("DAEMON", "ADDRESS", "STATUS", "DETAIL"),
                ((r["daemon"], r["address"], r["status"], r["detail"]) for r in results),
            )
        )
    bad = [r for r in results if r["status"] != HEALTH_SERVING]
    for r in bad:
        print(
            f"hint: blockwire-{r['daemon']} at {r['address']} is {r['status'].lower()}: "
            f"check `systemctl status blockwire-{r['daemon']}` and --{r['daemon']}",
            file=ctx.stderr,
        )
    return EXIT_UNAVAILABLE if bad else EXIT_OK


def cmd_completion(ctx: _Context) -> int:
    ctx.stdout.write(completion.script(ctx.args.shell, build_parser()))
    return EXIT_OK


# The parser


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before or after the command name."""

    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("connection and output")
    g.add_argument(
        "--storage",
        metavar="ADDR",
        default=d(os.environ.get("BLOCKWIRE_STORAGE", DEFAULT_STORAGE_TARGET)),
        help="blockwire-storage address: unix:///path, /path or host:port "
        f"(default: $BLOCKWIRE_STORAGE or {DEFAULT_STORAGE_TARGET})",
    )
    g.add_argument(
        "--agent",
        metavar="ADDR",
        default=d(os.environ.get("BLOCKWIRE_AGENT", DEFAULT_AGENT_TARGET)),
        help=f"blockwire-agent address of this host (default: $BLOCKWIRE_AGENT or {DEFAULT_AGENT_TARGET})",
    )
    g.add_argument(
        "--json", action="store_true", default=d(False), help="print JSON (stable, machine-readable)"
    )
    g.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=d(None),
        help="deadline of each call, retries included (default: 30s, 300s for attach and detach)",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=d(None),
        help="show progress on stderr (default: only when stderr is a terminal)",
    )
    g.add_argument("-v", "--verbose", action="store_true", default=d(False), help="log retries and calls")
    t = parser.add_argument_group("TLS (for daemons listening on TCP)")
    t.add_argument("--tls", action="store_true", default=d(False), help="use TLS with the system's CAs")
    t.add_argument("--tls-ca", metavar="FILE", default=d(None), help="CA certificate (PEM) of the daemons")
    t.add_argument(
        "--tls-cert", metavar="FILE", default=d(None), help="client certificate (PEM), for mutual TLS"
    )
    t.add_argument("--tls-key", metavar="FILE", default=d(None), help="client key (PEM), for mutual TLS")
    t.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=d(None),
        help="name to verify the daemon's certificate against, if not the address's host",
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one declarative table of commands
    """The `blockwire` argument parser (also the source of the completion scripts)."""
    parser = argparse.ArgumentParser(
        prog="blockwire",
        description="Block storage for virtual machines: manage volumes and snapshots on blockwire-storage, "
        "attach them to libvirt domains through this host's blockwire-agent.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"blockwire {__version__}")
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def sub(
        group: Any, name: str, help: str, func: Callable[[_Context], int], **kw: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, help=help, description=help, parents=[common], formatter_class=_Formatter, **kw
        )
        p.set_defaults(func=func)
        return p

    # volume
    volume = commands.add_parser(
        "volume",
        help="create, list, show, delete and extend volumes",
        description="Volumes on blockwire-storage.",
    )
    vol = volume.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub(
        vol,
        "create",
        "create a volume (idempotent by name), empty or from a source, and wait until it is ready",
        func=cmd_volume_create,
        epilog="examples:\n  blockwire volume create data1 10G\n"
        "  blockwire volume create web1-root 20G --from-image /srv/images/debian.qcow2\n"
        "  blockwire volume create data1-copy --from-volume VOLUME_ID",
    )
    p.add_argument("name", metavar="NAME", help="unique name: 1-63 of [A-Za-z0-9._-]")
    p.add_argument(
        "size",
        metavar="SIZE",
        nargs="?",
        help="size like 10G, 512M or bytes (binary units; a multiple of 1M); optional with a source",
    )
    p.add_argument("--backend", metavar="NAME", help="storage backend (default: the service's default)")
    p.add_argument("--multiattach", action="store_true", help="allow several attachments at once")
    p.add_argument(
        "--encrypted", action="store_true", help="LUKS1 at rest, decrypted by QEMU (README Encryption)"
    )
    p.add_argument("--key-size", type=int, choices=(256, 512), help="with --encrypted: key bits (512)")
    p.add_argument("--label", metavar="KEY=VALUE", action="append", help="add a label (repeatable)")
    p.add_argument("--type", metavar="TYPE", help="volume type (id or name; default: the service's default)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-snapshot", metavar="SNAPSHOT_ID", help="copy of this snapshot")
    src.add_argument("--from-volume", metavar="VOLUME_ID", help="clone of this volume")
    src.add_argument("--from-image", metavar="PATH", help="copy of this image file on the storage host")
    p.add_argument(
        "--image-format", choices=sorted(_IMAGE_FORMATS), help="format of --from-image (default: probe)"
    )
    p.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until the volume is ready, showing progress (default: wait)",
    )
    p = sub(vol, "list", "list volumes", func=cmd_volume_list)
    p.add_argument(
        "--label", metavar="KEY=VALUE", action="append", help="only volumes with this label (repeatable)"
    )
    p = sub(vol, "show", "show one volume", func=cmd_volume_show)
    p.add_argument("volume_id", metavar="VOLUME_ID")
    p = sub(vol, "delete", "delete volumes (deleting one that is gone is fine)", func=cmd_volume_delete)
    p.add_argument("volume_ids", metavar="VOLUME_ID", nargs="+")
    p = sub(vol, "extend", "grow a volume, also while attached", func=cmd_volume_extend)
    p.add_argument("volume_id", metavar="VOLUME_ID")
    p.add_argument("size", metavar="SIZE", help="new size like 20G (not smaller than now)")
    p.add_argument(
        "--host",
        action="store_true",
        help="also make this host's agent rescan and resize the disk in the domain",
    )

    # snapshot
    snapshot = commands.add_parser(
        "snapshot",
        help="create, list, show and delete snapshots",
        description="Snapshots on blockwire-storage.",
    )
    snap = snapshot.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub(snap, "create", "snapshot a volume (idempotent by name)", func=cmd_snapshot_create)
    p.add_argument("volume_id", metavar="VOLUME_ID")
    p.add_argument("name", metavar="NAME", help="unique name")
    p.add_argument("--label", metavar="KEY=VALUE", action="append", help="add a label (repeatable)")
    p = sub(snap, "list", "list snapshots", func=cmd_snapshot_list)
    p.add_argument("--volume", metavar="VOLUME_ID", help="only snapshots of this volume")
    p = sub(snap, "show", "show one snapshot", func=cmd_snapshot_show)
    p.add_argument("snapshot_id", metavar="SNAPSHOT_ID")
    p = sub(snap, "delete", "delete snapshots (deleting one that is gone is fine)", func=cmd_snapshot_delete)
    p.add_argument("snapshot_ids", metavar="SNAPSHOT_ID", nargs="+")

    # volume types
    vtype = commands.add_parser(
        "type",
        help="create, list, show, change and delete volume types",
        description="Volume types on blockwire-storage: extra specs place volumes and give them properties.",
    )
    vt = vtype.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub(
        vt,
        "create",
        "create a volume type (idempotent by name)",
        func=cmd_type_create,
        epilog="examples:\n  blockwire type create fast --spec 'thin_provisioning=<is> True' --qos silver\n"
        "  blockwire type create shared --spec 'multiattach=<is> True' \\\n"
        "      --spec 'capabilities:transport=s== iscsi'",
    )
    p.add_argument("name", metavar="NAME", help="unique name: 1-63 of [A-Za-z0-9._-]")
    p.add_argument("--description", metavar="TEXT")
    p.add_argument("--spec", metavar="KEY=VALUE", action="append", help="an extra spec (repeatable)")
    p.add_argument("--qos", metavar="QOS", help="QoS specs to associate (id or name)")
    sub(vt, "list", "list volume types", func=cmd_type_list)
    p = sub(vt, "show", "show one volume type", func=cmd_type_show)
    p.add_argument("type", metavar="TYPE", help="id or name")
    p = sub(vt, "set", "change a type's description or replace all its extra specs", func=cmd_type_set)
    p.add_argument("type", metavar="TYPE", help="id or name")
    p.add_argument("--description", metavar="TEXT")
    p.add_argument("--spec", metavar="KEY=VALUE", action="append", help="an extra spec (repeatable)")
    p.add_argument("--no-specs", action="store_true", help="remove every extra spec")
    p = sub(vt, "qos", "associate a type with QoS specs, or with none", func=cmd_type_qos)
    p.add_argument("type", metavar="TYPE", help="id or name")
    p.add_argument("qos", metavar="QOS", nargs="?", help="QoS specs (id or name); omit for none")
    p = sub(vt, "delete", "delete volume types (deleting one that is gone is fine)", func=cmd_type_delete)
    p.add_argument("types", metavar="TYPE", nargs="+")

    # QoS specs
    qos = commands.add_parser(
        "qos",
        help="create, list, show, change and delete QoS specs",
        description="QoS specs on blockwire-storage: limits a volume type's disks get as libvirt <iotune>.",
    )
    qs = qos.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub(
        qs,
        "create",
        "create QoS specs (idempotent by name)",
        func=cmd_qos_create,
        epilog="examples:\n  blockwire qos create silver --limit total_iops_sec=500\n"
        "  blockwire qos create per-gb --limit read_bytes_sec_per_gb=1048576 \\\n"
        "      --limit write_iops_sec_per_gb=10",
    )
    p.add_argument("name", metavar="NAME", help="unique name: 1-63 of [A-Za-z0-9._-]")
    p.add_argument(
        "--limit", metavar="KEY=VALUE", action="append", help="a limit, e.g. total_iops_sec=500 (repeatable)"
    )
    p.add_argument(
        "--consumer", choices=("front-end", "back-end", "both"), default="front-end", help="(front-end)"
    )
    sub(qs, "list", "list QoS specs", func=cmd_qos_list)
    p = sub(qs, "show", "show QoS specs", func=cmd_qos_show)
    p.add_argument("qos", metavar="QOS", help="id or name")
    p = sub(qs, "set", "replace all limits of QoS specs, or their consumer", func=cmd_qos_set)
    p.add_argument("qos", metavar="QOS", help="id or name")
    p.add_argument("--limit", metavar="KEY=VALUE", action="append", help="a limit (repeatable)")
    p.add_argument("--consumer", choices=("front-end", "back-end", "both"))
    p = sub(qs, "delete", "delete QoS specs (deleting ones that are gone is fine)", func=cmd_qos_delete)
    p.add_argument("qos_specs", metavar="QOS", nargs="+")

    # attach, detach, attachments
    p = sub(
        commands,
        "attach",
        "attach a volume to a running libvirt domain on this host (idempotent)",
        func=cmd_attach,
        epilog="The agent exports the volume to this host, connects it, checks its identity and hot-plugs "
        "it;\nprogress (login, scan, udev, multipath, hotplug) is shown on stderr.",
    )
    p.add_argument("domain", metavar="DOMAIN", help="libvirt domain name or UUID")
    p.add_argument("volume_id", metavar="VOLUME_ID", nargs="?", help="omit with --connection-info")
    p.add_argument(
        "--connection-info",
        metavar="FILE",
        help="attach with Cinder's connection_info (a JSON file, - for stdin) instead of a volume id",
    )
    p.add_argument(
        "--allow-unverified-identity",
        action="store_true",
        help="attach although the connection info announces no LUN identity (Cinder's never does)",
    )
    p.add_argument("--persistent", action="store_true", help="also add the disk to the domain's definition")
    p.add_argument("--read-only", action="store_true", help="attach read-only")
    p.add_argument("--bus", choices=list(_BUSES), help="disk bus (default: scsi)")
    p.add_argument(
        "--target-dev", metavar="DEV", help="device name in the domain, e.g. sdb (default: next free)"
    )
    p.add_argument("--cache", choices=list(_CACHES), help="host cache mode (default: none)")
    p.add_argument("--io", choices=list(_IOS), help="QEMU I/O mode (default: native for block devices)")
    p.add_argument(
        "--discard", choices=list(_DISCARDS), help="pass discards down (default: unmap if supported)"
    )
    p.add_argument("--serial", metavar="SERIAL", help="disk serial the guest sees (default: the volume's)")
    p.add_argument("--shareable", action="store_true", help="mark the disk shareable (multiattach volumes)")
    p = sub(
        commands,
        "detach",
        "detach a volume from a domain and disconnect it from this host (idempotent)",
        func=cmd_detach,
    )
    p.add_argument("domain", metavar="DOMAIN", help="libvirt domain name or UUID")
    p.add_argument("volume_id", metavar="VOLUME_ID")
    p.add_argument("--force", action="store_true", help="disconnect even if the host device is still open")
    p = sub(
        commands,
        "attachments",
        "list attachments known to this host's agent and/or the storage service",
        func=cmd_attachments,
    )
    p.add_argument(
        "--from",
        dest="source",
        choices=("agent", "storage", "both"),
        default="both",
        help="where to list them (default: both)",
    )
    p.add_argument("--domain", metavar="DOMAIN", help="only attachments to this domain")
    p.add_argument("--volume", metavar="VOLUME_ID", help="only attachments of this volume")
    p.add_argument("--host", metavar="HOST", help="only attachments to this host (storage only)")

    # host and service
    sub(commands, "connector", "show this host's connector (initiator IQN, WWPNs, NQN)", func=cmd_connector)
    p = sub(
        commands,
        "doctor",
        "list what on this host no attachment accounts for; exit 10 if anything is left",
        func=cmd_doctor,
        epilog="Read-only: libvirt secrets, domain disks, iSCSI sessions and node records, SCSI disks,\n"
        "multipath maps, journal records in ERROR, attachments only storage or only this host has.\n"
        "--fix removes only what is provably orphaned (an unused blockwire libvirt secret, a storage\n"
        "attachment of this host whose domain does not run here); never a device.",
    )
    p.add_argument("--fix", action="store_true", help="remove what is provably orphaned")
    p = sub(commands, "capacity", "show space per storage backend", func=cmd_capacity)
    p.add_argument("backend", metavar="BACKEND", nargs="?", help="only this backend")
    sub(
        commands,
        "nodes",
        "list the storage nodes, whether each is up, and their backends",
        func=cmd_nodes,
    )
    p = sub(
        commands,
        "health",
        "check that both daemons are serving (gRPC health); exit 5 if not",
        func=cmd_health,
    )
    p.add_argument("--only", choices=("storage", "agent"), help="check only this daemon")
    p = sub(
        commands,
        "completion",
        "print a shell completion script",
        func=cmd_completion,
        epilog="install: blockwire completion bash > /etc/bash_completion.d/blockwire",
    )
    p.add_argument("shell", metavar="SHELL", choices=completion.SHELLS, help="bash or zsh")
    return parser


_HINTS: Final[dict[str, str]] = {
    "NOT_FOUND": "list what exists with `blockwire volume list`, `snapshot list` or `attachments`",
    "ABORTED": "another operation on this volume is in flight; run the command again in a moment",
    "PERMISSION_DENIED": "check the TLS client certificate (--tls-cert, --tls-key) and the target's CHAP/ACL",
    "UNAUTHENTICATED": "give a client certificate with --tls-cert and --tls-key",
    "RESOURCE_EXHAUSTED": "free space on the backend (see `blockwire capacity`) or use another --backend",
    "UNIMPLEMENTED": "the daemon does not support this yet; upgrade it",
    "INTERNAL": "this is a bug in the daemon; its log has the details",
}


def _exit_code(exc: BlockwireError) -> int:
    if isinstance(exc, ConcurrencyLimit):
        return EXIT_BUSY  # RESOURCE_EXHAUSTED, but not space: a script must not free space for it
    return EXIT_CODES.get(exc.code, EXIT_ERROR)


def _hint(ctx: _Context | None, exc: BlockwireError) -> str | None:
    if isinstance(exc, ConcurrencyLimit):
        return (
            "the daemon is busy (a concurrency bound, not a lack of space): run the command again in a "
            "moment; if it stays busy, close idle watches or raise the bound in the [limits] table of "
            "its config"
        )
    if exc.code == "UNAVAILABLE" and ctx is not None and ctx.daemon:
        address = getattr(ctx.args, ctx.daemon)
        flag, env = f"--{ctx.daemon}", f"BLOCKWIRE_{ctx.daemon.upper()}"
        return (
            f"is blockwire-{ctx.daemon} running and listening on {address}? "
            f"Check `systemctl status blockwire-{ctx.daemon}`, or point {flag} (or ${env}) at it"
        )
    if exc.code == "DEADLINE_EXCEEDED":
        return (
            "the daemon may still be at work: look with `show` or `attachments`, raise --timeout, see its log"
        )
    return _HINTS.get(exc.code)


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Runs the CLI; returns the exit code (see EPILOG). `clock` is for tests (retry backoff)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    ctx = _Context(args, clock)
    try:
        code: int = args.func(ctx)
        return code
    except UsageError as exc:
        print(f"blockwire: error: {exc}", file=ctx.stderr)
        return EXIT_USAGE
    except BlockwireError as exc:
        print(f"blockwire: error: {exc.message}", file=ctx.stderr)
        hint = _hint(ctx, exc)
        if hint:
            print(f"hint: {hint}", file=ctx.stderr)
        return _exit_code(exc)
    except OSError as exc:  # a TLS file that cannot be read, a closed pipe
        print(f"blockwire: error: {exc}", file=ctx.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("blockwire: interrupted", file=ctx.stderr)
        return EXIT_INTERRUPTED
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
