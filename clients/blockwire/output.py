"""How the CLI shows things: aligned tables and key/value blocks for people, stable JSON for programs.

JSON is the proto3 JSON mapping with the .proto field names (``size_bytes``, not ``sizeBytes``), every
field present (zero values included), enums by name, 64-bit integers as strings, timestamps in RFC 3339.
Secrets (CHAP passwords, RBD keys) are always shown as ``********``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from blockwire.secret import REDACTED
from blockwire.sizes import format_size
from blockwire.v1 import types_pb2

_SECRET_KEYS = frozenset({"password", "key"})


def message_to_dict(message: Message) -> dict[str, Any]:
    """The stable JSON form of a message, secrets redacted."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    redacted: dict[str, Any] = _redact(_ordered(message.DESCRIPTOR, data))
    return redacted


def _ordered(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its keys in the order of the .proto (MessageToDict puts zero values last)."""
    out: dict[str, Any] = {}
    for f in descriptor.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        nested = f.message_type
        if nested is not None and not nested.GetOptions().map_entry:
            if isinstance(value, dict):
                value = _ordered(nested, value)
            elif isinstance(value, list):
                value = [_ordered(nested, v) if isinstance(v, dict) else v for v in value]
        out[f.name] = value
    out.update((k, v) for k, v in data.items() if k not in out)
    return out


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (REDACTED if k in _SECRET_KEYS and isinstance(v, str) and v else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def dumps(data: Any) -> str:
    """JSON text: indented, keys in the order of the .proto."""
    return json.dumps(data, indent=2, ensure_ascii=False)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An aligned table with a header row; the last column is not padded."""
    rows = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def fields(pairs: Iterable[tuple[str, str]]) -> str:
    """A key/value block: ``key:  value`` with the values aligned."""
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}" for k, v in pairs)


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """``VOLUME_STATE_AVAILABLE`` -> ``available``; unknown numbers stay numbers."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower() if name.startswith(prefix) else name.lower()


def timestamp(ts: Timestamp) -> str:
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def volume_state(value: int) -> str:
    return enum_name(types_pb2.VolumeState, value, "VOLUME_STATE_")


def progress_text(progress: types_pb2.Progress) -> str:
    if progress.total_bytes:
        pct = 100 * progress.done_bytes // progress.total_bytes
        return f"{pct}% ({format_size(progress.done_bytes)} of {format_size(progress.total_bytes)})"
    if progress.done_bytes:
        return f"{format_size(progress.done_bytes)} done"
    return "-"


def volume_source(v: types_pb2.Volume) -> str:
    which = v.WhichOneof("source")
    if which == "source_snapshot_id":
        return f"snapshot {v.source_snapshot_id}"
    if which == "source_volume_id":
        return f"volume {v.source_volume_id}"
    if which == "source_image":
        fmt = enum_name(types_pb2.ImageFormat, v.source_image.format, "IMAGE_FORMAT_")
        return f"image {v.source_image.path}" + ("" if fmt == "unspecified" else f" ({fmt})")
    return "-"


def labels_text(labels: Any) -> str:
    return ", ".join(f"{k}={labels[k]}" for k in sorted(labels)) or "-"


def volume_table(volumes: Iterable[types_pb2.Volume]) -> str:
    return table(
        ("ID", "NAME", "SIZE", "STATE", "BACKEND", "ATTACHMENTS"),
        (
            (
                v.id,
                v.name,
                format_size(v.size_bytes),
                volume_state(v.state),
                v.backend or "-",
                str(len(v.attachment_ids)),
            )
            for v in volumes
        ),
    )


def volume_fields(v: types_pb2.Volume) -> str:
    pairs = [
        ("id", v.id),
        ("name", v.name),
        ("size", f"{format_size(v.size_bytes)} ({v.size_bytes} bytes)"),
        ("state", volume_state(v.state)),
        ("backend", v.backend or "-"),
        ("type", v.volume_type or "-"),
        ("multiattach", "yes" if v.multiattach else "no"),
        ("wwn", v.wwn or "-"),
        ("serial", v.serial or "-"),
        ("source", volume_source(v)),
        ("attachments", ", ".join(v.attachment_ids) or "-"),
        ("labels", labels_text(v.labels)),
    ]
    if v.state == types_pb2.VOLUME_STATE_CREATING or v.progress.total_bytes:
        pairs.append(("progress", progress_text(v.progress)))
    if v.error_message:
        pairs.append(("error", v.error_message))
    pairs += [("created", timestamp(v.create_time)), ("updated", timestamp(v.update_time))]
    return fields(pairs)


def snapshot_state(value: int) -> str:
    return enum_name(types_pb2.SnapshotState, value, "SNAPSHOT_STATE_")


def snapshot_table(snapshots: Iterable[types_pb2.Snapshot]) -> str:
    return table(
        ("ID", "NAME", "VOLUME", "SIZE", "STATE"),
        ((s.id, s.name, s.volume_id, format_size(s.size_bytes), snapshot_state(s.state)) for s in snapshots),
    )


def snapshot_fields(s: types_pb2.Snapshot) -> str:
    pairs = [
        ("id", s.id),
        ("name", s.name),
        ("volume", s.volume_id),
        ("size", f"{format_size(s.size_bytes)} ({s.size_bytes} bytes)"),
        ("state", snapshot_state(s.state)),
        ("labels", labels_text(s.labels)),
    ]
    if s.error_message:
        pairs.append(("error", s.error_message))
    pairs.append(("created", timestamp(s.create_time)))
    return fields(pairs)


def volume_type_table(types: Iterable[types_pb2.VolumeType]) -> str:
    return table(
        ("ID", "NAME", "DEFAULT", "QOS", "EXTRA SPECS"),
        (
            (t.id, t.name, "yes" if t.is_default else "", t.qos_specs_id or "-", labels_text(t.extra_specs))
            for t in types
        ),
    )


def volume_type_fields(t: types_pb2.VolumeType) -> str:
    return fields(
        [
            ("id", t.id),
            ("name", t.name),
            ("description", t.description or "-"),
            ("default", "yes" if t.is_default else "no"),
            ("extra specs", labels_text(t.extra_specs)),
            ("qos specs", t.qos_specs_id or "-"),
            ("created", timestamp(t.create_time)),
            ("updated", timestamp(t.update_time)),
        ]
    )


def qos_specs_table(specs: Iterable[types_pb2.QosSpecs]) -> str:
    return table(
        ("ID", "NAME", "CONSUMER", "LIMITS"),
        ((q.id, q.name, q.consumer, labels_text(q.specs)) for q in specs),
    )


def qos_specs_fields(q: types_pb2.QosSpecs) -> str:
    return fields(
        [
            ("id", q.id),
            ("name", q.name),
            ("consumer", q.consumer),
            ("limits", labels_text(q.specs)),
            ("created", timestamp(q.create_time)),
            ("updated", timestamp(q.update_time)),
        ]
    )


def attachment_state(value: int) -> str:
    return enum_name(types_pb2.AttachmentState, value, "ATTACHMENT_STATE_")


def connection_text(info: types_pb2.ConnectionInfo) -> str:
    which = info.WhichOneof("transport")
    if which == "iscsi":
        paths = ", ".join(f"{p.portal} {p.target_iqn} lun {p.lun}" for p in info.iscsi.paths)
        chap = " (CHAP)" if info.iscsi.HasField("chap") else ""
        return f"iscsi {paths}{chap}"
    if which == "fc":
        return f"fc lun {info.fc.lun} via {', '.join(info.fc.target_wwpns)}"
    if which == "nvmeof":
        return f"nvmeof {info.nvmeof.subsystem_nqn}"
    if which == "rbd":
        return f"rbd {info.rbd.pool}/{info.rbd.image}"
    if which == "local":
        return f"local {info.local.path}"
    return "-"


def attachment_table(rows: Iterable[tuple[str, types_pb2.Attachment]]) -> str:
    """Rows of (where it was listed: "agent" or "storage", attachment)."""
    return table(
        ("FROM", "ID", "VOLUME", "DOMAIN", "HOST", "STATE", "TARGET", "HOST DEVICE"),
        (
            (
                src,
                a.id or "-",
                a.volume_id,
                a.domain or "-",
                a.connector.host or "-",
                attachment_state(a.state),
                a.target_dev or "-",
                a.host_device or "-",
            )
            for src, a in rows
        ),
    )


def attachment_fields(a: types_pb2.Attachment) -> str:
    pairs = [
        ("id", a.id or "-"),
        ("volume", a.volume_id),
        ("domain", a.domain or "-"),
        ("host", a.connector.host or "-"),
        ("state", attachment_state(a.state)),
        ("access", enum_name(types_pb2.AccessMode, a.access_mode, "ACCESS_MODE_")),
        ("target dev", a.target_dev or "-"),
        ("host device", a.host_device or "-"),
        ("connection", connection_text(a.connection_info)),
    ]
    if a.error_message:
        pairs.append(("error", a.error_message))
    return fields(pairs)


def connector_fields(c: types_pb2.Connector) -> str:
    return fields(
        [
            ("host", c.host),
            ("ips", ", ".join(c.ips) or "-"),
            ("initiator iqn", c.initiator_iqn or "-"),
            ("kernel iscsi", "yes" if c.kernel_iscsi else "no (QEMU's initiator)"),
            ("wwpns", ", ".join(c.wwpns) or "-"),
            ("wwnns", ", ".join(c.wwnns) or "-"),
            ("nvme host nqn", c.nvme_host_nqn or "-"),
            ("multipath", "yes" if c.multipath else "no"),
            (
                "transports",
                ", ".join(enum_name(types_pb2.Transport, t, "TRANSPORT_") for t in c.transports) or "-",
            ),
            ("platform", c.platform or "-"),
        ]
    )
