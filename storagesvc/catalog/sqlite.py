"""SqliteCatalog: the embedded catalog (one file, WAL, schema versions in PRAGMA user_version).

Each table keeps the columns it is queried by plus the whole record as JSON (`doc`), so adding a field
to a record needs no migration; a new index or column does, appended to MIGRATIONS (never edited).

One connection, shared by the service's threads under a lock: every statement is short, and SQLite
serializes writers anyway. The file holds CHAP secrets (see ExportRecord): it is created mode 0600.

Durability: WAL with ``synchronous=FULL`` (the default here): every commit fsyncs the WAL before it
returns, so a row the service has acknowledged to a caller (an attachment an agent was told about, an
export it must rebuild) survives a power loss. ``normal`` fsyncs only at checkpoints: a crash of the
process loses nothing, a power loss can drop the last acknowledged commits. It is there to measure the
difference (bench/storage_bench.py, bench/results/), not to run with.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from blockwire.model import (
    AccessMode,
    Chap,
    ConnectionInfo,
    Connector,
    IscsiConnection,
    IscsiPath,
    NvmeofConnection,
    NvmeofPortal,
    Transport,
)
from blockwire.secret import Secret
from storagesvc.catalog import Conflict, Cursor, time_key
from storagesvc.model import (
    Attachment,
    AttachmentState,
    ExportRecord,
    ImageFormat,
    ImageSource,
    Progress,
    Snapshot,
    SnapshotState,
    Volume,
    VolumeSource,
    VolumeState,
)

MIGRATIONS: tuple[str, ...] = (
    # 1: the three tables
    """
    CREATE TABLE volumes (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, backend TEXT NOT NULL,
        create_ns INTEGER NOT NULL, size_bytes INTEGER NOT NULL,
        source_snapshot_id TEXT NOT NULL DEFAULT '', source_volume_id TEXT NOT NULL DEFAULT '',
        doc TEXT NOT NULL);
    CREATE INDEX volumes_order ON volumes (create_ns, id);
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, volume_id TEXT NOT NULL, backend TEXT NOT NULL,
        create_ns INTEGER NOT NULL, doc TEXT NOT NULL);
    CREATE INDEX snapshots_order ON snapshots (create_ns, id);
    CREATE INDEX snapshots_volume ON snapshots (volume_id);
    CREATE TABLE attachments (
        id TEXT PRIMARY KEY, volume_id TEXT NOT NULL, host TEXT NOT NULL,
        create_ns INTEGER NOT NULL, doc TEXT NOT NULL);
    CREATE INDEX attachments_order ON attachments (create_ns, id);
    CREATE INDEX attachments_volume ON attachments (volume_id);
    """,
)

R = TypeVar("R")

#: ``[service] catalog_synchronous`` values -> SQLite's PRAGMA synchronous (FULL = 2, NORMAL = 1).
SYNCHRONOUS = {"full": 2, "normal": 1}


def _chap_doc(c: Chap | None) -> dict[str, str] | None:
    return None if c is None else {"username": c.username, "password": c.password.reveal()}


def _chap(d: dict[str, str] | None) -> Chap | None:
    return None if d is None else Chap(d["username"], Secret(d["password"]))


def volume_doc(v: Volume) -> dict[str, Any]:
    e = v.export
    return {
        "id": v.id,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "state": v.state.value,
        "backend": v.backend,
        "wwn": v.wwn,
        "serial": v.serial,
        "create_time": v.create_time.isoformat(),
        "update_time": v.update_time.isoformat(),
        "multiattach": v.multiattach,
        "labels": dict(v.labels),
        "source": {
            "snapshot_id": v.source.snapshot_id,
            "volume_id": v.source.volume_id,
            "image": None
            if v.source.image is None
            else {"path": v.source.image.path, "format": v.source.image.format.value},
        },
        "progress": [v.progress.done_bytes, v.progress.total_bytes],
        "error_message": v.error_message,
        "export": None
        if e is None
        else {
            "target_iqn": e.target_iqn,
            "lun": e.lun,
            "chap": _chap_doc(e.chap),
            "mutual_chap": _chap_doc(e.mutual_chap),
            "access_mode": e.access_mode.value,
        },
    }


def volume_from_doc(d: dict[str, Any]) -> Volume:
    s = d["source"]
    e = d["export"]
    return Volume(
        id=d["id"],
        name=d["name"],
        size_bytes=d["size_bytes"],
        state=VolumeState(d["state"]),
        backend=d["backend"],
        wwn=d["wwn"],
        serial=d["serial"],
        create_time=datetime.fromisoformat(d["create_time"]),
        update_time=datetime.fromisoformat(d["update_time"]),
        multiattach=d["multiattach"],
        labels=d["labels"],
        source=VolumeSource(
            snapshot_id=s["snapshot_id"],
            volume_id=s["volume_id"],
            image=None
            if s["image"] is None
            else ImageSource(s["image"]["path"], ImageFormat(s["image"]["format"])),
        ),
        progress=Progress(*d["progress"]),
        error_message=d["error_message"],
        export=None
        if e is None
        else ExportRecord(
            target_iqn=e["target_iqn"],
            lun=e["lun"],
            chap=_chap(e["chap"]),
            mutual_chap=_chap(e["mutual_chap"]),
            access_mode=AccessMode(e["access_mode"]),
        ),
    )


def snapshot_doc(s: Snapshot) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "volume_id": s.volume_id,
        "size_bytes": s.size_bytes,
        "state": s.state.value,
        "backend": s.backend,
        "create_time": s.create_time.isoformat(),
        "labels": dict(s.labels),
        "error_message": s.error_message,
    }


def snapshot_from_doc(d: dict[str, Any]) -> Snapshot:
    return Snapshot(
        id=d["id"],
        name=d["name"],
        volume_id=d["volume_id"],
        size_bytes=d["size_bytes"],
        state=SnapshotState(d["state"]),
        backend=d["backend"],
        create_time=datetime.fromisoformat(d["create_time"]),
        labels=d["labels"],
        error_message=d["error_message"],
    )


def _connector_doc(c: Connector) -> dict[str, Any]:
    return {
        "host": c.host,
        "ips": list(c.ips),
        "initiator_iqn": c.initiator_iqn,
        "wwpns": list(c.wwpns),
        "wwnns": list(c.wwnns),
        "nvme_host_nqn": c.nvme_host_nqn,
        "nvme_host_id": c.nvme_host_id,
        "multipath": c.multipath,
        "transports": [t.value for t in c.transports],
        "kernel_iscsi": c.kernel_iscsi,
        "platform": c.platform,
    }


def _connector(d: dict[str, Any]) -> Connector:
    return Connector(
        host=d["host"],
        ips=tuple(d["ips"]),
        initiator_iqn=d["initiator_iqn"],
        wwpns=tuple(d["wwpns"]),
        wwnns=tuple(d["wwnns"]),
        nvme_host_nqn=d["nvme_host_nqn"],
        nvme_host_id=d["nvme_host_id"],
        multipath=d["multipath"],
        transports=tuple(Transport(t) for t in d["transports"]),
        kernel_iscsi=d["kernel_iscsi"],
        platform=d["platform"],
    )


def _connection_doc(c: ConnectionInfo | None) -> dict[str, Any] | None:
    if c is None:
        return None
    t = c.transport
    transport: dict[str, Any]
    if isinstance(t, IscsiConnection):
        transport = {
            "iscsi": {
                "paths": [[p.portal, p.target_iqn, p.lun] for p in t.paths],
                "chap": _chap_doc(t.chap),
                "mutual_chap": _chap_doc(t.mutual_chap),
                "initiator_iqn": t.initiator_iqn,
            }
        }
    elif isinstance(t, NvmeofConnection):
        transport = {"nvmeof": _nvmeof_doc(t)}
    else:
        raise TypeError(f"the catalog records iSCSI and NVMe-oF connection info only, not {type(t).__name__}")
    return {
        **transport,
        "volume_id": c.volume_id,
        "attachment_id": c.attachment_id,
        "wwn": c.wwn,
        "serial": c.serial,
        "size_bytes": c.size_bytes,
        "access_mode": c.access_mode.value,
        "discard": c.discard,
        "logical_block_size": c.logical_block_size,
        "physical_block_size": c.physical_block_size,
    }


def _nvmeof_doc(t: NvmeofConnection) -> dict[str, Any]:
    def secret(s: Secret | None) -> str | None:
        return None if s is None else s.reveal()

    return {
        "subsystem_nqn": t.subsystem_nqn,
        "portals": [[p.address, p.transport] for p in t.portals],
        "namespace_id": t.namespace_id,
        "namespace_uuid": t.namespace_uuid,
        "namespace_nguid": t.namespace_nguid,
        "host_nqn": t.host_nqn,
        "dhchap_host_secret": secret(t.dhchap_host_secret),
        "dhchap_ctrl_secret": secret(t.dhchap_ctrl_secret),
    }


def _nvmeof(n: dict[str, Any]) -> NvmeofConnection:
    def secret(s: str | None) -> Secret | None:
        return None if s is None else Secret(s)

    return NvmeofConnection(
        subsystem_nqn=n["subsystem_nqn"],
        portals=tuple(NvmeofPortal(p[0], p[1]) for p in n["portals"]),
        namespace_id=n["namespace_id"],
        namespace_uuid=n["namespace_uuid"],
        namespace_nguid=n["namespace_nguid"],
        host_nqn=n["host_nqn"],
        dhchap_host_secret=secret(n["dhchap_host_secret"]),
        dhchap_ctrl_secret=secret(n["dhchap_ctrl_secret"]),
    )


def _connection(d: dict[str, Any] | None) -> ConnectionInfo | None:
    if d is None:
        return None
    transport: IscsiConnection | NvmeofConnection
    if "nvmeof" in d:
        transport = _nvmeof(d["nvmeof"])
    else:
        i = d["iscsi"]
        transport = IscsiConnection(
            paths=tuple(IscsiPath(p[0], p[1], p[2]) for p in i["paths"]),
            chap=_chap(i["chap"]),
            mutual_chap=_chap(i["mutual_chap"]),
            initiator_iqn=i["initiator_iqn"],
        )
    return ConnectionInfo(
        transport=transport,
        volume_id=d["volume_id"],
        attachment_id=d["attachment_id"],
        wwn=d["wwn"],
        serial=d["serial"],
        size_bytes=d["size_bytes"],
        access_mode=AccessMode(d["access_mode"]),
        discard=d["discard"],
        logical_block_size=d["logical_block_size"],
        physical_block_size=d["physical_block_size"],
    )


def attachment_doc(a: Attachment) -> dict[str, Any]:
    return {
        "id": a.id,
        "volume_id": a.volume_id,
        "connector": _connector_doc(a.connector),
        "access_mode": a.access_mode.value,
        "state": a.state.value,
        "create_time": a.create_time.isoformat(),
        "update_time": a.update_time.isoformat(),
        "connection_info": _connection_doc(a.connection_info),
        "domain": a.domain,
        "target_dev": a.target_dev,
        "host_device": a.host_device,
        "error_message": a.error_message,
    }


def attachment_from_doc(d: dict[str, Any]) -> Attachment:
    return Attachment(
        id=d["id"],
        volume_id=d["volume_id"],
        connector=_connector(d["connector"]),
        access_mode=AccessMode(d["access_mode"]),
        state=AttachmentState(d["state"]),
        create_time=datetime.fromisoformat(d["create_time"]),
        update_time=datetime.fromisoformat(d["update_time"]),
        connection_info=_connection(d["connection_info"]),
        domain=d["domain"],
        target_dev=d["target_dev"],
        host_device=d["host_device"],
        error_message=d["error_message"],
    )


class SqliteCatalog:
    """The Catalog protocol on one SQLite file (or ":memory:")."""

    def __init__(self, path: str | Path, *, synchronous: str = "full") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous: one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
        self.path = str(path)
        if self.path != ":memory:":
            p = Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={SYNCHRONOUS[synchronous]}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Applies the migrations this file has not seen, each in its own transaction."""
        with self._lock:
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"catalog {self.path} has schema version {current}, newer than this service's "
                    f"{len(MIGRATIONS)}: run a newer blockwire-storage"
                )
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in filter(str.strip, script.split(";")):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {version}")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")

    def _write(self, sql: str, args: Sequence[Any]) -> int:
        with self._lock:
            try:
                return self._db.execute(sql, args).rowcount
            except sqlite3.IntegrityError as exc:
                raise Conflict(str(exc)) from exc

    def _one(self, sql: str, args: Sequence[Any], load: Callable[[dict[str, Any]], R]) -> R | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return None if row is None else load(json.loads(row[0]))

    def _many(self, sql: str, args: Sequence[Any], load: Callable[[dict[str, Any]], R]) -> list[R]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [load(json.loads(r[0])) for r in rows]

    @staticmethod
    def _page(where: list[str], args: list[Any], after: Cursor | None, limit: int) -> str:
        if after is not None:
            where.append("(create_ns > ? OR (create_ns = ? AND id > ?))")
            args.extend([after.create_ns, after.create_ns, after.id])
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        args.append(limit)
        return f"{clause} ORDER BY create_ns, id LIMIT ?"

    # volumes
    def insert_volume(self, volume: Volume) -> None:
        self._write(
            "INSERT INTO volumes (id, name, backend, create_ns, size_bytes, source_snapshot_id, "
            "source_volume_id, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                volume.id,
                volume.name,
                volume.backend,
                time_key(volume.create_time),
                volume.size_bytes,
                volume.source.snapshot_id,
                volume.source.volume_id,
                json.dumps(volume_doc(volume)),
            ],
        )

    def update_volume(self, volume: Volume) -> None:
        self._write(
            "UPDATE volumes SET size_bytes = ?, doc = ? WHERE id = ?",
            [volume.size_bytes, json.dumps(volume_doc(volume)), volume.id],
        )

    def delete_volume(self, volume_id: str) -> None:
        self._write("DELETE FROM volumes WHERE id = ?", [volume_id])

    def get_volume(self, volume_id: str) -> Volume | None:
        return self._one("SELECT doc FROM volumes WHERE id = ?", [volume_id], volume_from_doc)

    def volume_by_name(self, name: str) -> Volume | None:
        return self._one("SELECT doc FROM volumes WHERE name = ?", [name], volume_from_doc)

    def list_volumes(
        self, *, after: Cursor | None, limit: int, labels: Mapping[str, str] | None = None
    ) -> list[Volume]:
        where: list[str] = []
        args: list[Any] = []
        for k, v in (labels or {}).items():
            where.append("json_extract(doc, '$.labels.' || json_quote(?)) = ?")
            args.extend([k, v])
        sql = "SELECT doc FROM volumes" + self._page(where, args, after, limit)  # noqa: S608 - bound values
        return self._many(sql, args, volume_from_doc)

    def volumes_from(self, *, snapshot_id: str = "", volume_id: str = "") -> list[Volume]:
        if snapshot_id:
            return self._many(
                "SELECT doc FROM volumes WHERE source_snapshot_id = ?", [snapshot_id], volume_from_doc
            )
        return self._many("SELECT doc FROM volumes WHERE source_volume_id = ?", [volume_id], volume_from_doc)

    # snapshots
    def insert_snapshot(self, snapshot: Snapshot) -> None:
        self._write(
            "INSERT INTO snapshots (id, name, volume_id, backend, create_ns, doc) VALUES (?, ?, ?, ?, ?, ?)",
            [
                snapshot.id,
                snapshot.name,
                snapshot.volume_id,
                snapshot.backend,
                time_key(snapshot.create_time),
                json.dumps(snapshot_doc(snapshot)),
            ],
        )

    def update_snapshot(self, snapshot: Snapshot) -> None:
        self._write(
            "UPDATE snapshots SET doc = ? WHERE id = ?", [json.dumps(snapshot_doc(snapshot)), snapshot.id]
        )

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._write("DELETE FROM snapshots WHERE id = ?", [snapshot_id])

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self._one("SELECT doc FROM snapshots WHERE id = ?", [snapshot_id], snapshot_from_doc)

    def snapshot_by_name(self, name: str) -> Snapshot | None:
        return self._one("SELECT doc FROM snapshots WHERE name = ?", [name], snapshot_from_doc)

    def list_snapshots(self, *, volume_id: str = "", after: Cursor | None, limit: int) -> list[Snapshot]:
        where: list[str] = []
        args: list[Any] = []
        if volume_id:
            where.append("volume_id = ?")
            args.append(volume_id)
        sql = "SELECT doc FROM snapshots" + self._page(where, args, after, limit)  # noqa: S608 - bound values
        return self._many(sql, args, snapshot_from_doc)

    # attachments
    def insert_attachment(self, attachment: Attachment) -> None:
        self._write(
            "INSERT INTO attachments (id, volume_id, host, create_ns, doc) VALUES (?, ?, ?, ?, ?)",
            [
                attachment.id,
                attachment.volume_id,
                attachment.connector.host,
                time_key(attachment.create_time),
                json.dumps(attachment_doc(attachment)),
            ],
        )

    def update_attachment(self, attachment: Attachment) -> None:
        self._write(
            "UPDATE attachments SET doc = ? WHERE id = ?",
            [json.dumps(attachment_doc(attachment)), attachment.id],
        )

    def delete_attachment(self, attachment_id: str) -> None:
        self._write("DELETE FROM attachments WHERE id = ?", [attachment_id])

    def get_attachment(self, attachment_id: str) -> Attachment | None:
        return self._one("SELECT doc FROM attachments WHERE id = ?", [attachment_id], attachment_from_doc)

    def list_attachments(
        self, *, volume_id: str = "", host: str = "", after: Cursor | None, limit: int
    ) -> list[Attachment]:
        where: list[str] = []
        args: list[Any] = []
        if volume_id:
            where.append("volume_id = ?")
            args.append(volume_id)
        if host:
            where.append("host = ?")
            args.append(host)
        sql = "SELECT doc FROM attachments" + self._page(where, args, after, limit)  # noqa: S608 - bound values
        return self._many(sql, args, attachment_from_doc)

    def attachments_of(self, volume_id: str) -> list[Attachment]:
        return self._many(
            "SELECT doc FROM attachments WHERE volume_id = ? ORDER BY create_ns, id",
            [volume_id],
            attachment_from_doc,
        )

    def backend_counts(self, backend: str) -> tuple[int, int, int]:
        with self._lock:
            vols, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM volumes WHERE backend = ?", [backend]
            ).fetchone()
            (snaps,) = self._db.execute(
                "SELECT COUNT(*) FROM snapshots WHERE backend = ?", [backend]
            ).fetchone()
        return int(vols), int(snaps), int(size)

    def close(self) -> None:
        with self._lock:
            self._db.close()
