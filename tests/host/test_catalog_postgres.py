"""PostgresCatalog on a real PostgreSQL server (tests/postgres.py): the dialect-neutral catalog tests of
tests/unit/storagesvc/test_catalog.py again, then what only a shared server has: migrations by two
processes at once, a newer schema refused, one name inserted by two catalogs at once, the cross-process
lock (timeout, release when the holder's connection dies), an unreachable server, a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.errors import Aborted, ResourceExhausted, Unavailable
from storagesvc.catalog import Conflict
from storagesvc.catalog.postgres import PostgresCatalog, lock_key
from storagesvc.catalog.sql import MIGRATIONS
from tests.postgres import PostgresServer, free_port
from tests.unit.storagesvc.test_catalog import (  # the same assertions, on PostgreSQL
    test_a_transaction_commits_its_writes_together,
    test_a_transaction_inside_another_joins_it,
    test_a_transaction_that_raises_leaves_nothing,
    test_attachments_of_a_volume_are_all_of_them_in_listing_order,
    test_clones_and_counts,
    test_hold_is_a_context_for_one_process,
    test_label_filters_match_keys_with_dots_and_quotes_exactly,
    test_listing_is_ordered_by_creation_and_pages_after_a_cursor,
    test_names_are_unique,
    test_snapshots_and_attachments,
    test_storage_nodes_and_their_backends,
    test_update_and_delete,
    test_volume_round_trip_keeps_export_secrets,
    volume,
)

__all__ = [
    "test_a_transaction_commits_its_writes_together",
    "test_a_transaction_inside_another_joins_it",
    "test_a_transaction_that_raises_leaves_nothing",
    "test_attachments_of_a_volume_are_all_of_them_in_listing_order",
    "test_clones_and_counts",
    "test_hold_is_a_context_for_one_process",
    "test_label_filters_match_keys_with_dots_and_quotes_exactly",
    "test_listing_is_ordered_by_creation_and_pages_after_a_cursor",
    "test_names_are_unique",
    "test_snapshots_and_attachments",
    "test_storage_nodes_and_their_backends",
    "test_update_and_delete",
    "test_volume_round_trip_keeps_export_secrets",
]


def open_catalog(server: PostgresServer, dsn: str, **kw: object) -> PostgresCatalog:
    return PostgresCatalog(dsn, password_file=server.password_file, **kw)  # type: ignore[arg-type]


@pytest.fixture
def catalog(postgres_server: PostgresServer, postgres_dsn: str) -> Iterator[PostgresCatalog]:
    c = open_catalog(postgres_server, postgres_dsn)
    yield c
    c.close()


def test_a_new_database_is_migrated_once(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    c = open_catalog(postgres_server, postgres_dsn)
    assert c.schema_version == len(MIGRATIONS)
    c.close()
    again = open_catalog(postgres_server, postgres_dsn)  # reopening applies nothing twice
    assert again.schema_version == len(MIGRATIONS)
    again.close()
    with postgres_server.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]


def test_nodes_starting_together_apply_each_migration_once(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    barrier = threading.Barrier(4)
    opened: list[PostgresCatalog] = []
    failed: list[BaseException] = []

    def start() -> None:
        barrier.wait(10)
        try:
            opened.append(open_catalog(postgres_server, postgres_dsn))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failed, failed
    assert len(opened) == 4
    assert {c.schema_version for c in opened} == {len(MIGRATIONS)}
    for c in opened:
        c.close()


def test_a_newer_schema_is_refused(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    open_catalog(postgres_server, postgres_dsn).close()
    with postgres_server.connect(postgres_dsn) as conn:
        conn.execute("UPDATE schema_version SET version = %s", [len(MIGRATIONS) + 1])
    with pytest.raises(RuntimeError, match="newer"):
        open_catalog(postgres_server, postgres_dsn)


def test_one_name_inserted_by_two_catalogs_at_once_exactly_one_wins(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    a, b = open_catalog(postgres_server, postgres_dsn), open_catalog(postgres_server, postgres_dsn)
    try:
        for round_ in range(10):
            barrier = threading.Barrier(2)
            results: dict[str, str] = {}

            def insert(
                c: PostgresCatalog,
                i: int,
                who: str,
                name: str,
                barrier: threading.Barrier = barrier,
                results: dict[str, str] = results,
            ) -> None:
                barrier.wait(10)
                try:
                    c.insert_volume(volume(i, name=name))
                    results[who] = "won"
                except Conflict:
                    results[who] = "conflict"

            name = f"race-{round_}"
            threads = [
                threading.Thread(target=insert, args=(a, 2 * round_, "a", name)),
                threading.Thread(target=insert, args=(b, 2 * round_ + 1, "b", name)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(results.values()) == ["conflict", "won"], results
            winner = a.volume_by_name(name)
            assert winner is not None
            assert winner.id == f"{2 * round_ if results['a'] == 'won' else 2 * round_ + 1:032x}"
    finally:
        a.close()
        b.close()


def test_the_lock_is_shared_waits_and_times_out_naming_the_key(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    a, b = open_catalog(postgres_server, postgres_dsn), open_catalog(postgres_server, postgres_dsn)
    try:
        with a.hold("volume v1", 1):
            t0 = time.monotonic()
            with pytest.raises(Aborted, match="volume v1 is busy"), b.hold("volume v1", 0.3):
                pass
            assert 0.25 < time.monotonic() - t0 < 5
            with b.hold("volume v2", 0.3):  # another key is free
                pass
        # released: b waits for a's holder to finish, then has it
        entered = threading.Event()
        leave = threading.Event()

        def hold_a() -> None:
            with a.hold("volume v1", 1):
                entered.set()
                leave.wait(10)

        holder = threading.Thread(target=hold_a)
        holder.start()
        assert entered.wait(10)
        threading.Timer(0.3, leave.set).start()
        t0 = time.monotonic()
        with b.hold("volume v1", 10):
            assert leave.is_set()
        assert time.monotonic() - t0 >= 0.25
        holder.join(10)
    finally:
        a.close()
        b.close()


def test_the_lock_is_released_when_the_holders_connection_dies(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    a, b = open_catalog(postgres_server, postgres_dsn), open_catalog(postgres_server, postgres_dsn)
    try:
        with a.hold("volume v1", 1):
            with pytest.raises(Aborted), b.hold("volume v1", 0.2):
                pass
            with postgres_server.connect(postgres_dsn) as admin:
                (pid,) = admin.execute(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND ((classid::bigint << 32) | objid::bigint) = %s",
                    [lock_key("volume v1") & 0xFFFFFFFFFFFFFFFF],
                ).fetchone() or (None,)
                assert pid is not None, "the holder's advisory lock is not in pg_locks"
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            with b.hold("volume v1", 5):  # the server let go of it with the connection
                pass
        # a's holder left without an error (the lock was already gone), and a still works
        with a.hold("volume v1", 5):
            pass
    finally:
        a.close()
        b.close()


def test_an_unreachable_server_is_unavailable_naming_it_without_the_password(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    port = free_port()
    secret = Path(postgres_server.password_file).read_text().strip()
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}") as info:
        PostgresCatalog(
            f"host=127.0.0.1 port={port} user=bw dbname=bw",
            password_file=postgres_server.password_file,
            connect_timeout=2,
        )
    assert time.monotonic() - t0 < 10
    assert secret not in str(info.value)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-" + secret)
    with pytest.raises(Unavailable, match="password authentication failed") as denied:
        PostgresCatalog(postgres_server.dsn(), password_file=str(wrong), connect_timeout=2)
    assert secret not in str(denied.value)
    assert f"127.0.0.1:{postgres_server.port}" in str(denied.value)
    with pytest.raises(ValueError, match="password_file") as refused:
        PostgresCatalog(f"host=127.0.0.1 port={port} user=bw password={secret}")
    assert secret not in str(refused.value)


def test_the_server_restarted_calls_fail_clearly_then_succeed_nothing_lost(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    c = open_catalog(postgres_server, postgres_dsn, connect_timeout=2)
    try:
        for i in range(5):
            c.insert_volume(volume(i))
        postgres_server.stop_server()
        try:
            with pytest.raises(Unavailable, match=f"127.0.0.1:{postgres_server.port}"):
                c.get_volume(volume(0).id)
            with pytest.raises(Unavailable):
                c.insert_volume(volume(9))
        finally:
            postgres_server.start_server()
        deadline = time.monotonic() + 30
        while True:  # the pool reconnects (with backoff): bounded
            try:
                got = c.list_volumes(after=None, limit=10)
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the catalog did not reconnect within 30 s"
        assert [v.name for v in got] == [f"vol-{i}" for i in range(5)]
        c.insert_volume(volume(5))
        assert c.get_volume(volume(5).id) is not None
    finally:
        c.close()


def test_connections_the_server_ended_are_replaced_before_use(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """A pooled connection whose backend was terminated (the server closed it) is checked and replaced
    before a statement runs on it: no call fails for it."""
    c = open_catalog(postgres_server, postgres_dsn, min_size=2, max_size=2)
    try:
        c.insert_volume(volume(1))
        for i in range(3):
            with postgres_server.connect(postgres_dsn) as admin:
                pids = [
                    r[0]
                    for r in admin.execute(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    ).fetchall()
                ]
                assert pids
                admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])
                deadline = time.monotonic() + 10
                while admin.execute(  # the backends are gone: their goodbyes are on the sockets
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s::int[])", [pids]
                ).fetchone() != (0,):
                    assert time.monotonic() < deadline, "terminated backends still there after 10 s"
            assert c.get_volume(volume(1).id) is not None
            c.insert_volume(volume(2 + i))
    finally:
        c.close()


def test_all_lock_connections_held_is_resource_exhausted_naming_the_bound(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    c = open_catalog(postgres_server, postgres_dsn, lock_connections=1, connect_timeout=1)
    try:
        with c.hold("volume a", 1):
            t0 = time.monotonic()
            with pytest.raises(ResourceExhausted, match="lock_connections"), c.hold("volume b", 1):
                pass
            assert time.monotonic() - t0 < 10
        with c.hold("volume b", 1):  # given back
            pass
    finally:
        c.close()
