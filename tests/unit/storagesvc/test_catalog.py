"""SqliteCatalog: migrations, round trips (secrets included), uniqueness, paging order, label filters.

The dialect-neutral tests (those taking the `catalog` fixture) run on PostgreSQL too:
tests/host/test_catalog_postgres.py collects them again with its own `catalog` fixture."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blockwire.model import AccessMode, Chap, ConnectionInfo, Connector, IscsiConnection, IscsiPath, Transport
from blockwire.secret import Secret
from storagesvc.catalog import Conflict, Cursor, time_key
from storagesvc.catalog.sql import MIGRATIONS, SqlCatalog
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.model import (
    Attachment,
    AttachmentState,
    ExportRecord,
    ImageFormat,
    ImageSource,
    NodeBackend,
    Snapshot,
    SnapshotState,
    StorageNode,
    Volume,
    VolumeSource,
    VolumeState,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def volume(i: int, **kw: object) -> Volume:
    base = dict(
        id=f"{i:032x}",
        name=f"vol-{i}",
        size_bytes=(i + 1) << 20,
        state=VolumeState.AVAILABLE,
        backend="file",
        wwn="6001405" + f"{i:020x}" + "00000",
        serial=f"{i:020x}",
        create_time=T0 + timedelta(seconds=i),
        update_time=T0 + timedelta(seconds=i),
    )
    base.update(kw)
    return Volume(**base)  # type: ignore[arg-type]


@pytest.fixture
def catalog(tmp_path: Path) -> SqliteCatalog:
    return SqliteCatalog(tmp_path / "c.db")


def test_new_file_is_migrated_private_and_in_wal_mode(tmp_path: Path) -> None:
    c = SqliteCatalog(tmp_path / "c.db")
    assert c.schema_version == len(MIGRATIONS)
    assert (tmp_path / "c.db").stat().st_mode & 0o777 == 0o600
    mode = sqlite3.connect(tmp_path / "c.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    c.close()
    again = SqliteCatalog(tmp_path / "c.db")  # reopening applies nothing twice
    assert again.schema_version == len(MIGRATIONS)


def test_an_opened_catalog_fsyncs_every_commit(tmp_path: Path) -> None:
    """WAL + synchronous=FULL (2): a write the service acknowledged survives a power loss. PRAGMA
    synchronous is per connection: ask the catalog's own, the one every write goes through."""
    c = SqliteCatalog(tmp_path / "c.db")
    assert c._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert c._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()
    reopened = SqliteCatalog(tmp_path / "c.db")
    assert reopened._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    reopened.close()
    normal = SqliteCatalog(tmp_path / "n.db", synchronous="normal")  # only for measurements
    assert normal._db.execute("PRAGMA synchronous").fetchone()[0] == 1
    normal.close()
    with pytest.raises(ValueError, match="synchronous"):
        SqliteCatalog(tmp_path / "x.db", synchronous="off")


def test_the_daemon_opens_its_catalog_with_full_unless_told_otherwise() -> None:
    from storagesvc.config import ConfigError, ServiceConfig, parse  # noqa: PLC0415

    base = {
        "backends": [{"name": "f", "kind": "file", "exporter": "tgt", "path": "/x"}],
        "exporters": {"tgt": {"portals": ["127.0.0.1:3260"]}},
    }
    assert parse(base).service.catalog_synchronous == ServiceConfig().catalog_synchronous == "full"
    normal = parse({**base, "service": {"catalog_synchronous": "normal"}})
    assert normal.service.catalog_synchronous == "normal"
    with pytest.raises(ConfigError, match="catalog_synchronous"):
        parse({**base, "service": {"catalog_synchronous": "off"}})


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    SqliteCatalog(tmp_path / "c.db").close()
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        SqliteCatalog(tmp_path / "c.db")


def test_volume_round_trip_keeps_export_secrets(catalog: SqlCatalog) -> None:
    export = ExportRecord(
        "iqn.2026-01.io.x:v",
        1,
        Chap("in-x", Secret("s" * 16)),
        Chap("out-x", Secret("m" * 16)),
        AccessMode.READ_ONLY,
    )
    v = volume(
        1,
        labels={"a": "b"},
        source=VolumeSource(image=ImageSource("/i.qcow2", ImageFormat.QCOW2)),
        export=export,
    )
    catalog.insert_volume(v)
    assert catalog.get_volume(v.id) == v
    assert catalog.volume_by_name("vol-1") == v
    got = catalog.get_volume(v.id)
    assert got is not None
    assert got.export is not None
    assert got.export.chap is not None
    assert got.export.chap.password.reveal() == "s" * 16


def test_names_are_unique(catalog: SqlCatalog) -> None:
    catalog.insert_volume(volume(1))
    with pytest.raises(Conflict):
        catalog.insert_volume(volume(2, name="vol-1"))


def test_update_and_delete(catalog: SqlCatalog) -> None:
    v = volume(1)
    catalog.insert_volume(v)
    catalog.update_volume(Volume(**{**v.__dict__, "size_bytes": 8 << 20, "state": VolumeState.IN_USE}))
    got = catalog.get_volume(v.id)
    assert got is not None
    assert got.size_bytes == 8 << 20
    assert got.state is VolumeState.IN_USE
    assert catalog.backend_counts("file") == (1, 0, 8 << 20)
    catalog.delete_volume(v.id)
    assert catalog.get_volume(v.id) is None


def test_listing_is_ordered_by_creation_and_pages_after_a_cursor(catalog: SqlCatalog) -> None:
    for i in (3, 1, 4, 0, 2):
        catalog.insert_volume(volume(i, labels={"even": str(i % 2 == 0)}))
    first = catalog.list_volumes(after=None, limit=2)
    assert [v.name for v in first] == ["vol-0", "vol-1"]
    rest = catalog.list_volumes(after=Cursor(time_key(first[-1].create_time), first[-1].id), limit=10)
    assert [v.name for v in rest] == ["vol-2", "vol-3", "vol-4"]
    evens = catalog.list_volumes(after=None, limit=10, labels={"even": "True"})
    assert [v.name for v in evens] == ["vol-0", "vol-2", "vol-4"]


def test_snapshots_and_attachments(catalog: SqlCatalog) -> None:
    v = volume(1)
    catalog.insert_volume(v)
    s = Snapshot("s" * 32, "snap", v.id, v.size_bytes, SnapshotState.AVAILABLE, "file", T0)
    catalog.insert_snapshot(s)
    assert catalog.list_snapshots(volume_id=v.id, after=None, limit=5) == [s]
    assert catalog.list_snapshots(volume_id="other", after=None, limit=5) == []
    info = ConnectionInfo(
        IscsiConnection((IscsiPath("127.0.0.1:3260", "iqn.2026-01.io.x:v", 1),), Chap("u", Secret("p" * 16))),
        volume_id=v.id,
        wwn=v.wwn,
    )
    a = Attachment(
        "a" * 32,
        v.id,
        Connector(host="h", initiator_iqn="iqn.2026-01.io.x:h", transports=(Transport.ISCSI,)),
        AccessMode.READ_WRITE,
        AttachmentState.ATTACHING,
        T0,
        T0,
        connection_info=info,
    )
    catalog.insert_attachment(a)
    assert catalog.get_attachment(a.id) == a
    assert catalog.list_attachments(host="h", after=None, limit=5) == [a]
    assert catalog.list_attachments(host="x", after=None, limit=5) == []


def test_attachments_of_a_volume_are_all_of_them_in_listing_order(catalog: SqlCatalog) -> None:
    v, other = volume(1), volume(2)
    catalog.insert_volume(v)
    catalog.insert_volume(other)

    def att(ident: str, volume_id: str, minutes: int) -> Attachment:
        t = T0 + timedelta(minutes=minutes)
        connector = Connector(host="h", initiator_iqn="iqn.2026-01.io.x:h", transports=(Transport.ISCSI,))
        return Attachment(
            ident * 32, volume_id, connector, AccessMode.READ_WRITE, AttachmentState.ATTACHED, t, t
        )

    later, earlier, elsewhere = att("a", v.id, 2), att("b", v.id, 1), att("c", other.id, 0)
    for a in (later, earlier, elsewhere):
        catalog.insert_attachment(a)
    assert catalog.attachments_of(v.id) == [earlier, later]
    assert catalog.attachments_of(other.id) == [elsewhere]
    assert catalog.attachments_of("d" * 32) == []


def attachment_of(v: Volume, ident: str = "a") -> Attachment:
    connector = Connector(host="h", initiator_iqn="iqn.2026-01.io.x:h", transports=(Transport.ISCSI,))
    return Attachment(ident * 32, v.id, connector, AccessMode.READ_WRITE, AttachmentState.RESERVED, T0, T0)


def seen_by_another_thread(catalog: SqlCatalog, volume_id: str) -> tuple[Volume | None, int]:
    """What a second thread reads now (a volume, the count of its attachments), within 10 s."""
    got: list[tuple[Volume | None, int]] = []
    t = threading.Thread(
        target=lambda: got.append((catalog.get_volume(volume_id), len(catalog.attachments_of(volume_id))))
    )
    t.start()
    t.join(10)
    assert got, "a read of another thread waited for the open transaction"
    return got[0]


def test_a_transaction_commits_its_writes_together(catalog: SqlCatalog) -> None:
    v = volume(1)
    catalog.insert_volume(v)
    a = attachment_of(v)
    reserved = replace(v, state=VolumeState.RESERVED)
    with catalog.transaction():
        catalog.insert_attachment(a)
        catalog.update_volume(reserved)
        # the transaction reads its own writes; another thread sees none of them before the commit
        assert catalog.get_volume(v.id) == reserved
        assert catalog.attachments_of(v.id) == [a]
        assert seen_by_another_thread(catalog, v.id) == (v, 0)
    assert seen_by_another_thread(catalog, v.id) == (reserved, 1)
    assert catalog.get_attachment(a.id) == a


def test_a_transaction_that_raises_leaves_nothing(catalog: SqlCatalog) -> None:
    v = volume(1)
    catalog.insert_volume(v)

    def reserve_then_fail() -> None:
        with catalog.transaction():
            catalog.insert_attachment(attachment_of(v))
            catalog.update_volume(replace(v, state=VolumeState.RESERVED))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        reserve_then_fail()
    assert catalog.get_volume(v.id) == v
    assert catalog.attachments_of(v.id) == []
    # atomic: a write that fails (a taken name) undoes the ones before it in the same transaction
    catalog.insert_volume(volume(2))

    def reserve_then_conflict() -> None:
        with catalog.transaction():
            catalog.insert_attachment(attachment_of(v, "b"))
            catalog.update_volume(replace(v, state=VolumeState.RESERVED))
            catalog.insert_volume(volume(3, name="vol-2"))

    with pytest.raises(Conflict):
        reserve_then_conflict()
    assert catalog.get_volume(v.id) == v
    assert catalog.attachments_of(v.id) == []
    assert catalog.get_volume(volume(3).id) is None
    # and the catalog goes on: the next transaction and the next single write commit
    with catalog.transaction():
        catalog.insert_attachment(attachment_of(v, "c"))
    catalog.update_volume(replace(v, state=VolumeState.ATTACHING))
    assert seen_by_another_thread(catalog, v.id) == (replace(v, state=VolumeState.ATTACHING), 1)


def test_a_transaction_inside_another_joins_it(catalog: SqlCatalog) -> None:
    v = volume(1)
    catalog.insert_volume(v)

    def nested_then_fail() -> None:
        with catalog.transaction():
            with catalog.transaction():
                catalog.insert_attachment(attachment_of(v))
            assert seen_by_another_thread(catalog, v.id) == (v, 0)  # the inner end committed nothing
            raise RuntimeError("outer")

    with pytest.raises(RuntimeError, match="outer"):
        nested_then_fail()
    assert catalog.attachments_of(v.id) == []


def test_label_filters_match_keys_with_dots_and_quotes_exactly(catalog: SqlCatalog) -> None:
    """Label keys are [a-z0-9._/-] (validate.labels): dots and slashes are not paths; values are any text."""
    catalog.insert_volume(volume(1, labels={"k8s.io/pvc": "a", "q": 'it\'s "x"', "tier": "gold"}))
    catalog.insert_volume(volume(2, labels={"k8s": "a", "tier": "gold"}))
    catalog.insert_volume(volume(3, labels={"tier": "silver"}))

    def names(labels: dict[str, str]) -> list[str]:
        return [v.name for v in catalog.list_volumes(after=None, limit=10, labels=labels)]

    assert names({"k8s.io/pvc": "a"}) == ["vol-1"]
    assert names({"q": 'it\'s "x"', "tier": "gold"}) == ["vol-1"]
    assert names({"k8s.io": "a"}) == []
    assert names({"tier": "gold"}) == ["vol-1", "vol-2"]
    assert names({"tier": "gold", "k8s": "a"}) == ["vol-2"]
    assert names({"tier": "bronze"}) == []
    gold = catalog.list_volumes(after=None, limit=1, labels={"tier": "gold"})
    after = Cursor(time_key(gold[0].create_time), gold[0].id)
    assert [v.name for v in catalog.list_volumes(after=after, limit=5, labels={"tier": "gold"})] == ["vol-2"]


def test_clones_and_counts(catalog: SqlCatalog) -> None:
    assert catalog.backend_counts("file") == (0, 0, 0)
    src = volume(1)
    catalog.insert_volume(src)
    clone = volume(2, source=VolumeSource(volume_id=src.id))
    catalog.insert_volume(clone)
    s = Snapshot("s" * 32, "snap", src.id, src.size_bytes, SnapshotState.AVAILABLE, "file", T0)
    catalog.insert_snapshot(s)
    with pytest.raises(Conflict):
        catalog.insert_snapshot(Snapshot("t" * 32, "snap", src.id, 1, SnapshotState.AVAILABLE, "file", T0))
    from_snap = volume(3, source=VolumeSource(snapshot_id=s.id))
    catalog.insert_volume(from_snap)
    assert [v.id for v in catalog.volumes_from(volume_id=src.id)] == [clone.id]
    assert [v.id for v in catalog.volumes_from(snapshot_id=s.id)] == [from_snap.id]
    assert catalog.snapshot_by_name("snap") == s
    assert catalog.backend_counts("file") == (3, 1, src.size_bytes + clone.size_bytes + from_snap.size_bytes)
    catalog.delete_snapshot(s.id)
    assert catalog.get_snapshot(s.id) is None


def test_hold_is_a_context_for_one_process(catalog: SqlCatalog) -> None:
    """Every dialect's `hold` is re-usable and released: taking the same key twice in a row works."""
    for _ in range(2):
        with catalog.hold("volume x", 1.0):
            pass


def test_catalog_config(tmp_path: Path) -> None:
    from storagesvc.config import CatalogConfig, ConfigError, load, parse  # noqa: PLC0415

    example = Path(__file__).resolve().parents[3] / "deploy" / "storage.example.toml"
    assert load(example).catalog == CatalogConfig()  # the example documents every key, at its default

    base = {
        "backends": [{"name": "f", "kind": "file", "exporter": "tgt", "path": "/x"}],
        "exporters": {"tgt": {"portals": ["127.0.0.1:3260"]}},
        "service": {"catalog_path": "/var/lib/x/old.db"},
    }
    default = parse(base)
    assert default.catalog.kind == "sqlite"
    assert default.catalog_path == "/var/lib/x/old.db"  # [service] catalog_path keeps working
    assert parse({**base, "catalog": {"path": "/y/new.db"}}).catalog_path == "/y/new.db"
    pg = parse({**base, "catalog": {"kind": "postgresql", "dsn": "host=db port=5433 user=bw dbname=bw"}})
    assert (pg.catalog.kind, pg.catalog.pool_max_size, pg.catalog.connect_timeout) == ("postgresql", 8, 5.0)
    bad = [
        ({"kind": "mysql"}, "kind"),
        ({"kind": "postgresql"}, "needs dsn"),
        ({"kind": "postgresql", "dsn": "host=db password=hunter2"}, "password_file"),
        ({"kind": "postgresql", "dsn": "postgresql://bw:hunter2@db/bw"}, "password_file"),
        ({"kind": "postgresql", "dsn": "host=db", "pool_min_size": 9}, "pool_min_size"),
        ({"kind": "postgresql", "dsn": "host=db", "path": "/x.db"}, "path"),
        ({"dsn": "host=db"}, "postgresql"),
        ({"kind": "postgresql", "dsn": "host=db", "pasword_file": "/p"}, "unknown"),
    ]
    for table, match in bad:
        with pytest.raises(ConfigError, match=match) as info:
            parse({**base, "catalog": table})
        assert "hunter2" not in str(info.value)


def test_storage_nodes_and_their_backends(catalog: SqlCatalog) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def backend(name: str, node: str, shared: bool = False) -> NodeBackend:
        return NodeBackend(name, node, "file", shared, True, 100, 50, 10, 1, {"kind": "file"}, 2.0)

    catalog.put_node(
        StorageNode("b", "127.0.0.1:2", t0, t0, 10.0, (backend("fb", "b"), backend("r", "b", True)))
    )
    catalog.put_node(StorageNode("a", "127.0.0.1:1", t0, t0, 10.0, (backend("fa", "a"),)))
    later = t0 + timedelta(seconds=5)
    catalog.put_node(StorageNode("a", "127.0.0.1:3", later, t0, 10.0, (backend("fa", "a"),)))  # a heartbeat
    nodes = catalog.list_nodes()
    assert [(n.name, n.address, n.heartbeat, n.down_after) for n in nodes] == [
        ("a", "127.0.0.1:3", later, 10.0),
        ("b", "127.0.0.1:2", t0, 10.0),
    ]
    assert [b.name for b in nodes[1].backends] == ["fb", "r"]
    assert catalog.node_backend("r") == backend("r", "b", True)
    assert catalog.node_backend("nope") is None
    # a shared backend has a row per node that reaches it
    catalog.put_node(
        StorageNode("a", "127.0.0.1:3", later, t0, 10.0, (backend("fa", "a"), backend("r", "a", True)))
    )
    assert [[b.name for b in n.backends] for n in catalog.list_nodes()] == [["fa", "r"], ["fb", "r"]]
    assert catalog.node_backend("r") == backend("r", "a", True)
    catalog.drop_node_backend("r", "b")
    assert [[b.name for b in n.backends] for n in catalog.list_nodes()] == [["fa", "r"], ["fb"]]


def test_the_daemon_refuses_to_start_on_an_unreachable_postgresql_naming_it(tmp_path: Path) -> None:
    """[catalog] kind = "postgresql" with nothing listening: a ConfigError naming host:port, at once
    (connection refused), and never the password."""
    import socket  # noqa: PLC0415

    from storagesvc.config import ConfigError, parse  # noqa: PLC0415
    from storagesvc.rpc.server import open_catalog  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    (tmp_path / "pw").write_text("sekrit-pw-123\n")
    config = parse(
        {
            "backends": [{"name": "f", "kind": "file", "exporter": "tgt", "path": "/x"}],
            "exporters": {"tgt": {"portals": ["127.0.0.1:3260"]}},
            "catalog": {
                "kind": "postgresql",
                "dsn": f"host=127.0.0.1 port={port} user=bw dbname=bw",
                "password_file": str(tmp_path / "pw"),
                "connect_timeout": 2.0,
            },
        }
    )
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}") as info:
        open_catalog(config)
    assert "sekrit" not in str(info.value)


def test_reads_do_not_wait_for_a_writers_commit_and_writes_still_fsync(tmp_path: Path) -> None:
    """WAL: a read of another thread runs on a read connection while the writer holds its transaction
    (it waited for every fsync'd commit before); the writer is still the one connection with
    synchronous=FULL, and a read connection only reads."""
    c = SqliteCatalog(tmp_path / "c.db")
    v = volume(1)
    c.insert_volume(v)
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with c.transaction():
            c.update_volume(replace(v, state=VolumeState.RESERVED))
            inside.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        assert c.get_volume(v.id) == v  # the last commit, at once
        assert c.list_volumes(after=None, limit=5) == [v]
        assert time.monotonic() - started < 5
    finally:
        release.set()
        t.join(10)
    assert c.get_volume(v.id) == replace(v, state=VolumeState.RESERVED)
    assert c._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    reader = c._take_reader()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("DELETE FROM volumes")
    c._give_reader(reader)
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.get_volume(v.id)
