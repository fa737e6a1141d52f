"""SqlCatalog: the Catalog protocol in SQL that SQLite and PostgreSQL both speak.

The queries, the schema and its migrations live here once; a dialect (`storagesvc.catalog.sqlite`,
`storagesvc.catalog.postgres`) supplies a connection, how a statement runs, the schema version's home,
and the one expression that differs (a label inside the JSON document). Statements use ``?``
placeholders; a dialect with another paramstyle rewrites them.

MIGRATIONS is append-only: a file or database that has seen version N applies N+1.. on open. Column
types are the ones both dialects read the same way (TEXT, BIGINT: SQLite gives BIGINT integer affinity).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from storagesvc.catalog import Cursor, time_key
from storagesvc.catalog.docs import (
    attachment_doc,
    attachment_from_doc,
    node_backend_doc,
    node_backend_from_doc,
    node_doc,
    node_from_doc,
    qos_specs_doc,
    qos_specs_from_doc,
    snapshot_doc,
    snapshot_from_doc,
    volume_doc,
    volume_from_doc,
    volume_type_doc,
    volume_type_from_doc,
)
from storagesvc.model import Attachment, NodeBackend, QosSpecs, Snapshot, StorageNode, Volume, VolumeType

MIGRATIONS: tuple[str, ...] = (
    # 1: the three tables
    """
    CREATE TABLE volumes (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, backend TEXT NOT NULL,
        create_ns BIGINT NOT NULL, size_bytes BIGINT NOT NULL,
        source_snapshot_id TEXT NOT NULL DEFAULT '', source_volume_id TEXT NOT NULL DEFAULT '',
        doc TEXT NOT NULL);
    CREATE INDEX volumes_order ON volumes (create_ns, id);
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, volume_id TEXT NOT NULL, backend TEXT NOT NULL,
        create_ns BIGINT NOT NULL, doc TEXT NOT NULL);
    CREATE INDEX snapshots_order ON snapshots (create_ns, id);
    CREATE INDEX snapshots_volume ON snapshots (volume_id);
    CREATE TABLE attachments (
        id TEXT PRIMARY KEY, volume_id TEXT NOT NULL, host TEXT NOT NULL,
        create_ns BIGINT NOT NULL, doc TEXT NOT NULL);
    CREATE INDEX attachments_order ON attachments (create_ns, id);
    CREATE INDEX attachments_volume ON attachments (volume_id);
    """,
    # 2: volume types and QoS specs; the type of each volume (by name: a type's name never changes)
    """
    CREATE TABLE qos_specs (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, create_ns BIGINT NOT NULL, doc TEXT NOT NULL);
    CREATE INDEX qos_specs_order ON qos_specs (create_ns, id);
    CREATE TABLE volume_types (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, qos_specs_id TEXT NOT NULL DEFAULT '',
        create_ns BIGINT NOT NULL, doc TEXT NOT NULL);
    CREATE INDEX volume_types_order ON volume_types (create_ns, id);
    CREATE INDEX volume_types_qos ON volume_types (qos_specs_id);
    ALTER TABLE volumes ADD COLUMN volume_type TEXT NOT NULL DEFAULT '';
    CREATE INDEX volumes_type ON volumes (volume_type);
    """,
    # 3: storage nodes and the backends each registered (README "Several storage nodes")
    """
    CREATE TABLE storage_nodes (
        name TEXT PRIMARY KEY, address TEXT NOT NULL, heartbeat_ns BIGINT NOT NULL, doc TEXT NOT NULL);
    CREATE TABLE node_backends (
        name TEXT NOT NULL, node TEXT NOT NULL, shared BIGINT NOT NULL, doc TEXT NOT NULL,
        PRIMARY KEY (name, node));
    CREATE INDEX node_backends_node ON node_backends (node);
    """,
)


R = TypeVar("R")


def statements(script: str) -> list[str]:
    """A migration's statements (no statement of ours holds a ';' inside a literal)."""
    return [s.strip() for s in script.split(";") if s.strip()]


class SqlCatalog:
    """The queries. A dialect implements `_write`, `_rows`, `_label_clause`, `schema_version`,
    `_apply_migration`, `transaction` and `close`."""

    where: str = "catalog"  # how errors name this catalog (a path, a server)

    # what a dialect provides
    def _write(self, sql: str, args: Sequence[Any]) -> int:
        """Runs one statement in its own transaction; the rows it changed. `Conflict` on a unique key."""
        raise NotImplementedError

    def _rows(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _label_clause(self) -> str:
        """A condition true when the document's label (first argument) has the value (second)."""
        raise NotImplementedError

    @property
    def schema_version(self) -> int:
        raise NotImplementedError

    def _apply_migration(self, version: int, script: str) -> None:
        """Runs the script's statements and records `version`, in one transaction."""
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """The `_write`s and `_rows` of this thread inside the block in one transaction (see
        `storagesvc.catalog.Catalog.transaction`)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # shared
    def migrate(self) -> None:
        """Applies the migrations this catalog has not seen, each in its own transaction."""
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"catalog {self.where} has schema version {current}, newer than this service's "
                f"{len(MIGRATIONS)}: run a newer blockwire-storage"
            )
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            self._apply_migration(version, script)

    def _one(self, sql: str, args: Sequence[Any], load: Callable[[dict[str, Any]], R]) -> R | None:
        rows = self._rows(sql, args)
        return None if not rows else load(json.loads(rows[0][0]))

    def _many(self, sql: str, args: Sequence[Any], load: Callable[[dict[str, Any]], R]) -> list[R]:
        return [load(json.loads(r[0])) for r in self._rows(sql, args)]

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
            "source_volume_id, volume_type, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                volume.id,
                volume.name,
                volume.backend,
                time_key(volume.create_time),
                volume.size_bytes,
                volume.source.snapshot_id,
                volume.source.volume_id,
                volume.volume_type,
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
            where.append(self._label_clause())
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
        ((vols, size),) = self._rows(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM volumes WHERE backend = ?", [backend]
        )
        ((snaps,),) = self._rows("SELECT COUNT(*) FROM snapshots WHERE backend = ?", [backend])
        return int(vols), int(snaps), int(size)

    # storage nodes
    def put_node(self, node: StorageNode) -> None:
        """Registers or heartbeats a node: its row and each of its backends' rows (upserts, so a
        restarted node takes its rows back). A backend it no longer has keeps its row until
        `drop_node_backend`. A shared backend (rbd) has a row per node that reaches it."""
        with self.transaction():
            self._put_node(node)

    def _put_node(self, node: StorageNode) -> None:
        self._write(
            "INSERT INTO storage_nodes (name, address, heartbeat_ns, doc) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET address = excluded.address, "
            "heartbeat_ns = excluded.heartbeat_ns, doc = excluded.doc",
            [node.name, node.address, time_key(node.heartbeat), json.dumps(node_doc(node))],
        )
        for b in node.backends:
            self._write(
                "INSERT INTO node_backends (name, node, shared, doc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name, node) DO UPDATE SET shared = excluded.shared, doc = excluded.doc",
                [b.name, b.node, int(b.shared), json.dumps(node_backend_doc(b))],
            )

    def drop_node_backend(self, backend: str, node: str) -> None:
        self._write("DELETE FROM node_backends WHERE name = ? AND node = ?", [backend, node])

    def list_nodes(self) -> list[StorageNode]:
        """Every registered node with its backends, by name."""
        backends: dict[str, list[NodeBackend]] = {}
        for b in self._many("SELECT doc FROM node_backends ORDER BY name, node", [], node_backend_from_doc):
            backends.setdefault(b.node, []).append(b)
        return [
            node_from_doc(json.loads(doc), tuple(backends.get(name, ())))
            for name, doc in self._rows("SELECT name, doc FROM storage_nodes ORDER BY name", [])
        ]

    def node_backend(self, backend: str) -> NodeBackend | None:
        """One registration of the backend (the first node's, by name), None when no node has it."""
        return self._one(
            "SELECT doc FROM node_backends WHERE name = ? ORDER BY node LIMIT 1",
            [backend],
            node_backend_from_doc,
        )

    # volume types
    def insert_volume_type(self, vtype: VolumeType) -> None:
        self._write(
            "INSERT INTO volume_types (id, name, qos_specs_id, create_ns, doc) VALUES (?, ?, ?, ?, ?)",
            [
                vtype.id,
                vtype.name,
                vtype.qos_specs_id,
                time_key(vtype.create_time),
                json.dumps(volume_type_doc(vtype)),
            ],
        )

    def update_volume_type(self, vtype: VolumeType) -> None:
        self._write(
            "UPDATE volume_types SET qos_specs_id = ?, doc = ? WHERE id = ?",
            [vtype.qos_specs_id, json.dumps(volume_type_doc(vtype)), vtype.id],
        )

    def delete_volume_type(self, type_id: str) -> None:
        self._write("DELETE FROM volume_types WHERE id = ?", [type_id])

    def get_volume_type(self, type_id: str) -> VolumeType | None:
        return self._one("SELECT doc FROM volume_types WHERE id = ?", [type_id], volume_type_from_doc)

    def volume_type_by_name(self, name: str) -> VolumeType | None:
        return self._one("SELECT doc FROM volume_types WHERE name = ?", [name], volume_type_from_doc)

    def list_volume_types(
        self, *, after: Cursor | None, limit: int, qos_specs_id: str = ""
    ) -> list[VolumeType]:
        where: list[str] = []
        args: list[Any] = []
        if qos_specs_id:
            where.append("qos_specs_id = ?")
            args.append(qos_specs_id)
        sql = "SELECT doc FROM volume_types" + self._page(where, args, after, limit)  # noqa: S608 - bound values
        return self._many(sql, args, volume_type_from_doc)

    def count_volumes_of_type(self, name: str) -> int:
        ((n,),) = self._rows("SELECT COUNT(*) FROM volumes WHERE volume_type = ?", [name])
        return int(n)

    # QoS specs
    def insert_qos_specs(self, qos: QosSpecs) -> None:
        self._write(
            "INSERT INTO qos_specs (id, name, create_ns, doc) VALUES (?, ?, ?, ?)",
            [qos.id, qos.name, time_key(qos.create_time), json.dumps(qos_specs_doc(qos))],
        )

    def update_qos_specs(self, qos: QosSpecs) -> None:
        self._write("UPDATE qos_specs SET doc = ? WHERE id = ?", [json.dumps(qos_specs_doc(qos)), qos.id])

    def delete_qos_specs(self, qos_id: str) -> None:
        self._write("DELETE FROM qos_specs WHERE id = ?", [qos_id])

    def get_qos_specs(self, qos_id: str) -> QosSpecs | None:
        return self._one("SELECT doc FROM qos_specs WHERE id = ?", [qos_id], qos_specs_from_doc)

    def qos_specs_by_name(self, name: str) -> QosSpecs | None:
        return self._one("SELECT doc FROM qos_specs WHERE name = ?", [name], qos_specs_from_doc)

    def list_qos_specs(self, *, after: Cursor | None, limit: int) -> list[QosSpecs]:
        where: list[str] = []
        args: list[Any] = []
        sql = "SELECT doc FROM qos_specs" + self._page(where, args, after, limit)  # noqa: S608 - bound values
        return self._many(sql, args, qos_specs_from_doc)
