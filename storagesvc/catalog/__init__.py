"""The catalog: where volumes, snapshots and attachments are recorded (before their side effects).

`Catalog` is the interface the service uses; `storagesvc.catalog.sqlite.SqliteCatalog` is the embedded
default, `storagesvc.catalog.postgres.PostgresCatalog` the one several storage processes share.

Listing order is (create_time, id); a page cursor is that pair of the last item returned. The catalog
knows nothing of tokens (see `storagesvc.paging`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from storagesvc.model import Attachment, NodeBackend, QosSpecs, Snapshot, StorageNode, Volume, VolumeType


@dataclass(frozen=True)
class Cursor:
    """Position after which a listing continues."""

    create_ns: int
    id: str


def time_key(t: datetime) -> int:
    """The listing order key of a create time: nanoseconds since the epoch (microsecond precision)."""
    return int(t.timestamp() * 1_000_000) * 1000


class Catalog(Protocol):
    """Durable records. Every method is atomic; `insert_*` raise `Conflict` on a duplicate name."""

    # volumes
    def insert_volume(self, volume: Volume) -> None: ...

    def update_volume(self, volume: Volume) -> None: ...

    def delete_volume(self, volume_id: str) -> None: ...

    def get_volume(self, volume_id: str) -> Volume | None: ...

    def volume_by_name(self, name: str) -> Volume | None: ...

    def list_volumes(
        self, *, after: Cursor | None, limit: int, labels: Mapping[str, str] | None = None
    ) -> Sequence[Volume]: ...

    def volumes_from(self, *, snapshot_id: str = "", volume_id: str = "") -> Sequence[Volume]: ...

    # snapshots
    def insert_snapshot(self, snapshot: Snapshot) -> None: ...

    def update_snapshot(self, snapshot: Snapshot) -> None: ...

    def delete_snapshot(self, snapshot_id: str) -> None: ...

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None: ...

    def snapshot_by_name(self, name: str) -> Snapshot | None: ...

    def list_snapshots(
        self, *, volume_id: str = "", after: Cursor | None, limit: int
    ) -> Sequence[Snapshot]: ...

    # attachments
    def insert_attachment(self, attachment: Attachment) -> None: ...

    def update_attachment(self, attachment: Attachment) -> None: ...

    def delete_attachment(self, attachment_id: str) -> None: ...

    def get_attachment(self, attachment_id: str) -> Attachment | None: ...

    def list_attachments(
        self, *, volume_id: str = "", host: str = "", after: Cursor | None, limit: int
    ) -> Sequence[Attachment]: ...

    def attachments_of(self, volume_id: str) -> list[Attachment]:
        """Every attachment of one volume, in listing order (create_time, id)."""
        ...

    # volume types and QoS specs (a volume names its type; a type names at most one QoS specs)
    def insert_volume_type(self, vtype: VolumeType) -> None: ...

    def update_volume_type(self, vtype: VolumeType) -> None: ...

    def delete_volume_type(self, type_id: str) -> None: ...

    def get_volume_type(self, type_id: str) -> VolumeType | None: ...

    def volume_type_by_name(self, name: str) -> VolumeType | None: ...

    def list_volume_types(
        self, *, after: Cursor | None, limit: int, qos_specs_id: str = ""
    ) -> Sequence[VolumeType]: ...

    def count_volumes_of_type(self, name: str) -> int: ...

    def insert_qos_specs(self, qos: QosSpecs) -> None: ...

    def update_qos_specs(self, qos: QosSpecs) -> None: ...

    def delete_qos_specs(self, qos_id: str) -> None: ...

    def get_qos_specs(self, qos_id: str) -> QosSpecs | None: ...

    def qos_specs_by_name(self, name: str) -> QosSpecs | None: ...

    def list_qos_specs(self, *, after: Cursor | None, limit: int) -> Sequence[QosSpecs]: ...

    # aggregates
    def backend_counts(self, backend: str) -> tuple[int, int, int]:
        """(volumes, snapshots, provisioned bytes) of one backend."""
        ...

    # storage nodes (README "Several storage nodes")
    def put_node(self, node: StorageNode) -> None:
        """Registers or heartbeats a node and its backends (upserts)."""
        ...

    def drop_node_backend(self, backend: str, node: str) -> None: ...

    def list_nodes(self) -> Sequence[StorageNode]:
        """Every registered node with its backends, by name."""
        ...

    def node_backend(self, backend: str) -> NodeBackend | None:
        """A registration of one backend (which node serves it, whether it is shared); None: none."""
        ...

    # transactions
    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """The calls inside the `with` block (on this thread) in ONE transaction: durable together when
        the block ends (one commit, one fsync), none of them when it raises. A transaction inside
        another joins it. Reads inside see the block's own writes; other threads see none of them
        before the commit. A `Conflict` inside spoils the whole transaction: let it propagate."""
        ...

    # locks
    def hold(self, key: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        """The lock named `key` across every process sharing this catalog, for the `with` block: waits
        up to `timeout` seconds, then raises `blockwire.errors.Aborted` naming `key`. The embedded
        catalog has one process (a no-op there: in-process locks already serialize); a server catalog
        releases it when the holder's connection ends."""
        ...

    def close(self) -> None: ...


class Conflict(Exception):
    """A unique constraint (a name) is already taken; the service re-reads and decides."""
