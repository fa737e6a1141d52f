"""Several storage nodes in one process, as the daemon wires them (`storagesvc.rpc.server.join_cluster`
does the same from config): each a real StorageService on its own file backend and FakeExporter,
sharing ONE SQLite catalog file (a connection each, as separate processes would), served by
blockwire.server.serving on a mutual-TLS TCP listener with the auth and forwarding interceptors, and
forwarding to each other with ``blockwire://storage-node/<name>`` certificates. The registry's clock is
a FakeClock shared by the nodes, so a test makes a node "down" by advancing it and heartbeating the
others."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from blockwire.client import TlsOptions, make_channel
from blockwire.runtime.clock import SystemClock
from blockwire.runtime.executor import Executor as CommandExecutor
from blockwire.server import serving
from blockwire.v1 import storage_pb2_grpc
from storagesvc import placement
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.nodes import Cluster, NodeSettings
from storagesvc.rpc import auth
from storagesvc.rpc.forward import ForwardInterceptor, Peers, PeerTls, Router
from storagesvc.rpc.servicer import StorageServicer
from storagesvc.service import Pool, StorageService
from tests.fakes.certs import Certs, Pair
from tests.fakes.clock import FakeClock
from tests.fakes.exporter import FakeExporter

STORAGE = "blockwire.v1.StorageService"
IQN_PREFIX = "iqn.2026-01.io.blockwire.nodes"
DOWN_AFTER = 10.0


@dataclass
class Node:
    name: str
    backend: FileBackend
    exporter: FakeExporter
    catalog: SqliteCatalog
    service: StorageService
    cluster: Cluster
    peers: Peers
    running: serving.Serving
    address: str

    def stop(self) -> None:
        self.running.stop(0)
        self.peers.close()
        self.service.jobs.shutdown(wait=True)
        self.catalog.close()


@dataclass
class NodeRig:
    root: Path
    certs: Certs
    server: Pair
    admin: Pair
    clock: FakeClock = field(default_factory=FakeClock)
    nodes: dict[str, Node] = field(default_factory=dict)

    @classmethod
    def make(cls, root: Path) -> NodeRig:
        certs = Certs(root)
        return cls(root, certs, certs.server(), certs.client("admin", "blockwire://admin/ops"))

    def tls(self, who: Pair) -> TlsOptions:
        return TlsOptions(ca_file=str(self.certs.ca.cert), cert_file=str(who.cert), key_file=str(who.key))

    def start(self, name: str) -> Node:
        """Starts node `name` with backend "file-<name>" (registered: its first heartbeat)."""
        client = self.certs.client(f"node-{name}", f"blockwire://storage-node/{name}")
        backend = FileBackend(f"file-{name}", self.root / name, CommandExecutor(), poll_interval=0.05)
        exporter = FakeExporter()
        catalog = SqliteCatalog(self.root / "catalog.db")
        service = StorageService(
            catalog,
            {backend.name: Pool(backend, exporter, "fake")},
            SystemClock(),
            ThreadPoolExecutor(max_workers=2),
            iqn_prefix=IQN_PREFIX,
            lock_timeout=5.0,
        )
        cluster = Cluster(
            catalog,
            service.pools,
            self.clock,
            NodeSettings(name, "", 1.0, DOWN_AFTER),
            cache_seconds=0,
            state=lambda backend: placement.backend_state(service.ctx, backend),
        )
        peers = Peers(PeerTls(str(client.cert), str(client.key), str(self.certs.ca.cert)))

        def host_of(attachment_id: str) -> str | None:
            a = catalog.get_attachment(attachment_id)
            return a.connector.host if a is not None else None

        running = serving.start(
            services=(STORAGE,),
            register=lambda server: storage_pb2_grpc.add_StorageServiceServicer_to_server(
                StorageServicer(service, cluster=cluster), server
            ),
            listeners=serving.Listeners(
                tcp=("127.0.0.1:0",),
                tls=serving.TlsServer(
                    str(self.server.cert), str(self.server.key), str(self.certs.ca.cert), True
                ),
            ),
            interceptors=(
                auth.interceptor(host_of),
                ForwardInterceptor(Router.of(cluster, service), peers, default_timeout=30),
            ),
        )
        address = running.addresses[0].removeprefix("tls://")
        cluster.settings = NodeSettings(name, address, 1.0, DOWN_AFTER)
        cluster.register()
        node = Node(name, backend, exporter, catalog, service, cluster, peers, running, address)
        self.nodes[name] = node
        return node

    def heartbeat(self, *names: str) -> None:
        for name in names:
            self.nodes[name].cluster.heartbeat()

    def stub(self, name: str, who: Pair | None = None) -> storage_pb2_grpc.StorageServiceStub:
        channel = make_channel(self.nodes[name].address, self.tls(who or self.admin))
        return storage_pb2_grpc.StorageServiceStub(channel)

    def channel(self, name: str, who: Pair) -> grpc.Channel:
        return make_channel(self.nodes[name].address, self.tls(who))

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.nodes.clear()


@contextmanager
def node_rig(root: Path, *names: str) -> Iterator[NodeRig]:
    rig = NodeRig.make(root)
    try:
        for name in names:
            rig.start(name)
        yield rig
    finally:
        rig.stop()
