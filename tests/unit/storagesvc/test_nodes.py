"""The node registry (catalog rows, registration, down after silence), routes and placement across
nodes, and the [node] config table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blockwire.errors import FailedPrecondition, Unavailable
from blockwire.runtime.executor import Executor
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.config import ConfigError, parse
from storagesvc.context import Pool
from storagesvc.model import NodeBackend, StorageNode
from storagesvc.nodes import Cluster, NodeSettings
from storagesvc.scheduler import PlacementRequest
from tests.fakes.clock import FakeClock
from tests.fakes.exporter import FakeExporter

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _backend(name: str, node: str, shared: bool = False) -> NodeBackend:
    return NodeBackend(
        name, node, "rbd" if shared else "file", shared, True, 100, 50, 10, 1, {"kind": "file"}
    )


def test_a_second_connection_sees_the_registry(tmp_path: Path) -> None:
    catalog = SqliteCatalog(tmp_path / "c.db")
    catalog.put_node(StorageNode("a", "127.0.0.1:1", T0, T0, 10.0, (_backend("fa", "a"),)))
    other = SqliteCatalog(tmp_path / "c.db")  # another process on the same file
    assert [(n.name, [b.name for b in n.backends]) for n in other.list_nodes()] == [("a", ["fa"])]
    assert other.schema_version == catalog.schema_version


def test_a_node_is_down_after_its_down_after() -> None:
    n = StorageNode("a", "x", T0, T0, 10.0)
    assert n.up(T0 + timedelta(seconds=9.9))
    assert not n.up(T0 + timedelta(seconds=10))


def _cluster(tmp_path: Path, catalog: SqliteCatalog, clock: FakeClock, node: str, backend: str) -> Cluster:
    pools = {backend: Pool(FileBackend(backend, tmp_path / node, Executor()), FakeExporter(), "fake")}
    return Cluster(
        catalog, pools, clock, NodeSettings(node, f"127.0.0.1:{ord(node)}", 1.0, 10.0), cache_seconds=0
    )


def test_routes_follow_the_backend_and_a_silent_node_is_named(tmp_path: Path) -> None:
    catalog = SqliteCatalog(tmp_path / "c.db")
    clock = FakeClock()
    a = _cluster(tmp_path, catalog, clock, "a", "file-a")
    b = _cluster(tmp_path, catalog, clock, "b", "file-b")
    a.register()
    b.register()
    assert a.route("file-a") is None  # its own
    routed = a.route("file-b")
    assert routed is not None
    assert routed.name == "b"
    assert a.route("unknown") is None  # served here, where it gets its own error
    assert a.volume_node("file-b") == ("b", False)
    clock.advance(11)
    a.heartbeat()
    with pytest.raises(Unavailable) as err:
        a.route("file-b")
    assert "storage node b (127.0.0.1:98)" in err.value.message
    assert "no heartbeat for 11s" in err.value.message
    assert a.volume_node("file-b") == ("b", True)
    assert [s.backend for s in a.place(PlacementRequest(size_bytes=1, extra_specs={}))] == ["file-a"]


def test_a_shared_backend_is_served_by_any_node_that_is_up(tmp_path: Path) -> None:
    catalog = SqliteCatalog(tmp_path / "c.db")
    clock = FakeClock()
    a = _cluster(tmp_path, catalog, clock, "a", "file-a")
    a.register()
    for name in ("b", "c"):
        catalog.put_node(
            StorageNode(
                name, f"127.0.0.1:{ord(name)}", clock.now(), clock.now(), 10.0, (_backend("rbd", name, True),)
            )
        )
    routed = a.route("rbd")
    assert routed is not None
    assert routed.name in ("b", "c")
    assert a.volume_node("rbd") == ("", False)  # a shared backend's volumes belong to no node
    clock.advance(11)
    a.heartbeat()
    catalog.put_node(
        StorageNode("c", "127.0.0.1:99", clock.now(), clock.now(), 10.0, (_backend("rbd", "c", True),))
    )
    routed = a.route("rbd")
    assert routed is not None
    assert routed.name == "c"  # b is down


def test_a_backend_name_served_by_another_node_that_is_up_is_refused(tmp_path: Path) -> None:
    catalog = SqliteCatalog(tmp_path / "c.db")
    clock = FakeClock()
    _cluster(tmp_path, catalog, clock, "a", "file").register()
    with pytest.raises(FailedPrecondition, match="already served by storage node a"):
        _cluster(tmp_path, catalog, clock, "b", "file").register()
    clock.advance(11)  # a is down: b may take the name over (a node replaced under another name)
    b = _cluster(tmp_path, catalog, clock, "b", "file")
    b.register()
    routed = _cluster(tmp_path, catalog, clock, "c", "file-c").route("file")
    assert routed is not None
    assert routed.name == "b"  # a's stale row went with the take-over
    assert [n.name for n in catalog.list_nodes() if n.backends and n.backends[0].name == "file"] == ["b"]


def test_single_node_cluster_is_itself(tmp_path: Path) -> None:
    catalog = SqliteCatalog(tmp_path / "c.db")
    pools = {"file": Pool(FileBackend("file", tmp_path / "f", Executor()), FakeExporter(), "fake")}
    c = Cluster(catalog, pools, FakeClock())
    (n,) = c.nodes()
    assert (n.name, [b.name for b in n.backends]) == ("", ["file"])
    assert c.route("file") is None
    assert c.route("other") is None
    assert c.volume_node("file") == ("", False)
    assert catalog.list_nodes() == []  # nothing registered


# -- config


BASE = {
    "server": {"listen": ["127.0.0.1:7000"]},
    "tls": {"cert_file": "s.pem", "key_file": "s.key", "client_ca_file": "ca.pem"},
    "exporters": {"tgt": {"portals": ["127.0.0.1:3260"]}},
    "backends": [{"name": "file-a", "kind": "file", "exporter": "tgt", "path": "/v"}],
}
NODE = {
    "name": "a",
    "address": "127.0.0.1:7000",
    "cert_file": "n.pem",
    "key_file": "n.key",
    "ca_file": "ca.pem",
}


def test_node_table() -> None:
    assert parse(BASE).node is None
    node = parse({**BASE, "node": NODE}).node
    assert node is not None
    assert (node.name, node.heartbeat_interval, node.down_after) == ("a", 2.0, 10.0)
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        parse({**BASE, "node": {**NODE, "heartbeat_interval": 10.0}})
    with pytest.raises(ConfigError, match="ca_file: required"):
        parse({**BASE, "node": {**NODE, "ca_file": ""}})
    with pytest.raises(ConfigError, match="mutual TLS"):
        parse({**BASE, "tls": {"allow_insecure_tcp": True}, "node": NODE})
