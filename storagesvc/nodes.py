"""Several storage nodes behind one API: the node registry, heartbeats, and where a call must run.

Each `blockwire-storage` process with a ``[node]`` table is a node. It registers itself (name, the
address other nodes reach it on) and its backends (kind, capacity, capabilities, health, whether the
backend is shared) in the catalog every node shares, and heartbeats every `heartbeat_interval` seconds
from a thread of its own (`Heartbeat`). A node whose last heartbeat is older than its `down_after` is
down. There is no message bus: the catalog is the registry.

`Cluster` answers the questions the gRPC layer asks before it serves a call (`storagesvc.rpc.forward`):
which node must run a call on this backend (a file or LVM pool and its target are reachable only from
their own node; a shared backend, rbd, from any node), and where a new volume goes (`scheduler.rank`
over every registered backend, `up` from the heartbeats). It is grpc-free.

Without ``[node]`` there is one node, unnamed and unregistered: `Cluster.local` answers for it, and
nothing is forwarded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from blockwire.errors import BlockwireError, FailedPrecondition, NotFound, Unavailable
from blockwire.runtime.clock import Clock
from blockwire.runtime.periodic import Periodic, Waiter, event_wait
from storagesvc.catalog import Catalog
from storagesvc.context import Pool
from storagesvc.model import Capacity, NodeBackend, StorageNode
from storagesvc.scheduler import BackendState, PlacementRequest, rank
from storagesvc.targets.base import transport_of

log = logging.getLogger(__name__)

SHARED_KINDS = frozenset({"rbd"})
"""Backend kinds every node reaches (the storage is on the network, not on the node)."""


@dataclass(frozen=True)
class NodeSettings:
    """What the registry needs of ``[node]`` (grpc-free; the TLS files stay with the rpc layer)."""

    name: str
    address: str
    heartbeat_interval: float = 2.0
    down_after: float = 10.0


def describe(
    pool: Pool, node: str, catalog: Catalog, state: Callable[[str], BackendState] | None = None
) -> NodeBackend:
    """One local backend as it is registered: its space, counts, capabilities and health now; with
    `state` (`storagesvc.placement.backend_state`), its capabilities, zone and over-subscription ratio
    as the local scheduler sees them ([[backends]] capabilities, availability_zone)."""
    b = pool.backend
    volumes, _, provisioned = catalog.backend_counts(b.name)
    try:
        space = b.space()
        total, free = space.total_bytes, space.free_bytes
        healthy = pool.exporter.healthy() if pool.exporter is not None else True
    except BlockwireError as exc:
        log.warning("backend %s: cannot read its space: %s", b.name, exc.message)
        total = free = 0
        healthy = False
    transport = transport_of(pool.exporter).value if pool.exporter is not None else b.kind
    seen = state(b.name) if state is not None else None
    return NodeBackend(
        name=b.name,
        node=node,
        kind=b.kind,
        shared=b.kind in SHARED_KINDS,
        healthy=healthy,
        total_bytes=total,
        free_bytes=free,
        provisioned_bytes=provisioned,
        volume_count=volumes,
        capabilities=dict(seen.capabilities)
        if seen is not None
        else {
            "kind": b.kind,
            "transport": transport,
            "thin_provisioning": "true",
            "multiattach": "true",
            "encryption": "false" if pool.exporter is None else "true",
        },
        max_over_subscription_ratio=seen.max_over_subscription_ratio
        if seen is not None
        else float(getattr(b, "ratio", 1.0)),
        availability_zone=seen.availability_zone if seen is not None else "",
    )


class Cluster:
    """This node's view of the cluster. `settings` None: a single-node service."""

    def __init__(
        self,
        catalog: Catalog,
        pools: Mapping[str, Pool],
        clock: Clock,
        settings: NodeSettings | None = None,
        *,
        cache_seconds: float = 0.5,
        state: Callable[[str], BackendState] | None = None,
        weigher: str = "free_capacity",
    ) -> None:
        self.state = state
        self.weigher = weigher
        self.catalog = catalog
        self.pools = pools
        self.clock = clock
        self.settings = settings
        self.started = clock.now()
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[StorageNode]] | None = None

    @property
    def multi(self) -> bool:
        return self.settings is not None

    @property
    def name(self) -> str:
        return self.settings.name if self.settings is not None else ""

    # -- registration and heartbeats

    def local(self) -> StorageNode:
        """This node as it registers itself, its backends' figures read now."""
        now = self.clock.now()
        s = self.settings
        return StorageNode(
            name=self.name,
            address=s.address if s is not None else "",
            heartbeat=now,
            start_time=self.started,
            down_after=s.down_after if s is not None else 0.0,
            backends=tuple(describe(p, self.name, self.catalog, self.state) for p in self.pools.values()),
        )

    def register(self) -> None:
        """The first heartbeat, after checking that no other node that is up serves one of this node's
        local backends under the same name (two nodes with a "file" backend each: rename one)."""
        assert self.settings is not None
        now = self.clock.now()
        for n in self.catalog.list_nodes():
            if n.name == self.name or not n.up(now):
                continue
            for b in n.backends:
                ours = self.pools.get(b.name)
                if ours is not None and not (b.shared and ours.backend.kind in SHARED_KINDS):
                    raise FailedPrecondition(
                        f"backend {b.name} is already served by storage node {n.name} ({n.address}); "
                        "backend names are unique across the cluster: rename this node's backend"
                    )
        for n in self.catalog.list_nodes():
            for b in n.backends:
                if n.name == self.name and b.name not in self.pools:
                    log.info("backend %s is no longer in this node's config: unregistering it", b.name)
                    self.catalog.drop_node_backend(b.name, n.name)
                elif n.name != self.name and b.name in self.pools and not b.shared:
                    log.warning(
                        "backend %s was served by storage node %s, which is down: this node takes it over",
                        b.name,
                        n.name,
                    )
                    self.catalog.drop_node_backend(b.name, n.name)
        self.heartbeat()
        log.info(
            "storage node %s registered at %s with backends %s",
            self.name,
            self.settings.address,
            ", ".join(self.pools),
        )

    def heartbeat(self) -> None:
        self.catalog.put_node(self.local())

    # -- the cluster as registered

    def nodes(self, *, fresh: bool = False) -> list[StorageNode]:
        """Every node (read at most every `cache_seconds`); a single node: itself."""
        if not self.multi:
            return [self.local()]
        with self._lock:
            now = self.clock.monotonic()
            if fresh or self._cached is None or now - self._cached[0] >= self.cache_seconds:
                self._cached = (now, list(self.catalog.list_nodes()))
            return self._cached[1]

    def now(self) -> datetime:
        return self.clock.now()

    def node(self, name: str) -> StorageNode:
        for n in self.nodes():
            if n.name == name:
                return n
        raise NotFound(f"storage node {name} is not registered")

    def up(self, node: StorageNode) -> bool:
        return node.name == self.name or node.up(self.now())

    def backend_node(self, backend: str) -> StorageNode | None:
        """The node that serves `backend` (for a shared backend: this node when it has it, else the
        first node up that does); None when it is not registered."""
        if backend in self.pools or not self.multi:
            return next((n for n in self.nodes() if n.name == self.name), None) or self.local()
        holders = [n for n in self.nodes() if any(b.name == backend for b in n.backends)]
        if not holders:
            return None
        # a shared backend: any node up that reaches it; a local one has one holder (register makes it so)
        return next((n for n in holders if self.up(n)), holders[0])

    def route(self, backend: str) -> StorageNode | None:
        """Where a call on a volume of `backend` runs: None here, or the node to forward to. UNAVAILABLE
        naming the node when it is down."""
        if not self.multi or backend in self.pools:
            return None
        node = self.backend_node(backend)
        if node is None:
            return None  # an unknown backend: served here, where it gets its own error
        if not self.up(node):
            raise Unavailable(self.down_message(node, backend))
        return node

    def down_message(self, node: StorageNode, backend: str) -> str:
        return (
            f"storage node {node.name} ({node.address}), which serves backend {backend}, is down: no "
            f"heartbeat for {node.silent_for(self.now()):.0f}s (down after {node.down_after:g}s); "
            "retry when it is back"
        )

    def volume_node(self, backend: str) -> tuple[str, bool]:
        """(node name, down) of a volume's backend, for Volume.node / node_down: ("", False) on a
        single-node service or a shared backend."""
        if not self.multi:
            return "", False
        node = self.backend_node(backend)
        if node is None or any(b.shared for b in node.backends if b.name == backend):
            return "", False
        return node.name, not self.up(node)

    # -- placement and capacity

    def candidates(self) -> list[BackendState]:
        """Every registered backend as the scheduler sees it: space from its node's last heartbeat,
        volumes and provisioned bytes from the catalog now (so creates between heartbeats spread)."""
        out = []
        for n in self.nodes():
            up = self.up(n)
            for b in n.backends:
                volumes, _, provisioned = self.catalog.backend_counts(b.name)
                out.append(
                    BackendState(
                        node=n.name,
                        backend=b.name,
                        total_bytes=b.total_bytes,
                        free_bytes=b.free_bytes,
                        provisioned_bytes=provisioned,
                        volume_count=volumes,
                        capabilities=b.capabilities,
                        availability_zone=b.availability_zone,
                        up=up and b.healthy,
                        max_over_subscription_ratio=b.max_over_subscription_ratio,
                    )
                )
        return out

    def place(self, request: PlacementRequest) -> list[BackendState]:
        """The backends a new volume may go to, best first (`scheduler.rank`)."""
        return rank(self.candidates(), request, weigher=self.weigher)

    def capacity(self, backend: str = "", node: str = "") -> list[tuple[Capacity, str, bool, bool]]:
        """(capacity, node, node down, shared) of every registered backend, or of one backend or node."""
        nodes = self.nodes(fresh=True)
        if node and all(n.name != node for n in nodes):
            have = ", ".join(n.name for n in nodes)
            raise NotFound(f"storage node {node} is not registered (have: {have})")
        out = []
        for n in nodes:
            if node and n.name != node:
                continue
            for b in n.backends:
                if backend and b.name != backend:
                    continue
                _, _, provisioned = self.catalog.backend_counts(b.name)
                room = max(0, int(b.total_bytes * max(b.max_over_subscription_ratio, 1.0)) - provisioned)
                cap = Capacity(b.name, b.total_bytes, b.free_bytes, provisioned, min(room, b.free_bytes))
                out.append((cap, n.name, not self.up(n), b.shared))
        if backend and not out:
            raise NotFound(f"backend {backend} does not exist")
        return out

    def with_fresh_local(self, nodes: list[StorageNode]) -> list[StorageNode]:
        """`nodes` with this node's own entry read now (a listing on this node sees itself up)."""
        return [replace(self.local(), start_time=self.started) if n.name == self.name else n for n in nodes]


class Heartbeat:
    """Registers the node, then heartbeats from a thread of its own every `heartbeat_interval`."""

    def __init__(self, cluster: Cluster, *, waiter: Waiter = event_wait) -> None:
        assert cluster.settings is not None
        self.cluster = cluster
        self.periodic = Periodic(
            "node-heartbeat", cluster.settings.heartbeat_interval, self.beat, waiter=waiter
        )
        self.failures = 0

    def beat(self) -> None:
        try:
            self.cluster.heartbeat()
        except Exception:
            self.failures += 1
            raise

    def start(self) -> None:
        self.cluster.register()
        self.periodic.start()

    def stop(self, timeout: float = 10.0) -> bool:
        return self.periodic.stop(timeout)


NodeOf = Callable[[str], tuple[str, bool]]
"""A backend name -> (node, down) of its volumes (`Cluster.volume_node`)."""
