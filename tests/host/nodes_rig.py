"""Storage nodes as real daemons for the host tier and bench/nodes_bench.py: each a `blockwire-storage`
with its own file backend and its own tgtd (own iSCSI and control ports), all on one PostgreSQL catalog,
registered as nodes ([node]) with mutual TLS between them (a test CA, a server and a storage-node
certificate each)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.fakes.certs import Certs
from tests.host.daemons import Tgtd, free_port, free_tgt_control_port
from tests.postgres import PostgresServer
from tests.rig import Daemon


def storage_config(
    work: Path,
    node: str,
    prefix: str,
    tgtd: Tgtd,
    certs: Certs,
    listen: str,
    pg: PostgresServer,
    dsn: str,
    heartbeat: float,
    down_after: float,
) -> Path:
    """Node `node`'s config: backend file-<node> in work/<node>/volumes on its own tgtd."""
    d = work / node
    d.mkdir(parents=True, exist_ok=True)
    server = certs.server(f"server-{node}")
    client = certs.client(f"node-{node}", f"blockwire://storage-node/{node}")
    portals = ", ".join(f'"{p}"' for p in tgtd.portals)
    config = d / "storage.toml"
    config.write_text(
        f"""
[server]
unix_socket = "{d}/storage.sock"
listen = ["{listen}"]
log_format = "kv"
log_level = "DEBUG"

[tls]
cert_file = "{server.cert}"
key_file = "{server.key}"
client_ca_file = "{certs.ca.cert}"

[service]
catalog_path = "{d}/unused.db"
iqn_prefix = "{prefix}"
lock_timeout = 5.0
export_check_interval = 0.0

[catalog]
kind = "postgresql"
dsn = "{dsn}"
password_file = "{pg.password_file}"
connect_timeout = 2.0

[node]
name = "{node}"
address = "{listen}"
cert_file = "{client.cert}"
key_file = "{client.key}"
ca_file = "{certs.ca.cert}"
heartbeat_interval = {heartbeat}
down_after = {down_after}

[[backends]]
name = "file-{node}"
kind = "file"
path = "{d}/volumes"
exporter = "tgt"

[exporters.tgt]
control_port = {tgtd.control_port}
portals = [{portals}]
"""
    )
    return config


@contextlib.contextmanager
def running_nodes(
    work: Path,
    names: Sequence[str],
    prefix: str,
    pg: PostgresServer,
    dsn: str,
    heartbeat: float = 0.5,
    down_after: float = 3.0,
) -> Iterator[tuple[dict[str, Tgtd], dict[str, Daemon]]]:
    """Starts a tgtd and a storage node per name (in order), yields them, and stops them all."""
    (work / "certs").mkdir(parents=True, exist_ok=True)
    certs = Certs(work / "certs")
    tgtds: dict[str, Tgtd] = {}
    daemons: dict[str, Daemon] = {}
    try:
        control = free_tgt_control_port()
        for node in names:
            tgtd = Tgtd(portals=(f"127.0.0.1:{free_port(('127.0.0.1',))}",), control_port=control)
            tgtd.start()
            tgtds[node] = tgtd
            control = free_tgt_control_port(control + 1)
        for node in names:
            listen = f"127.0.0.1:{free_port(('127.0.0.1',))}"
            config = storage_config(
                work, node, prefix, tgtds[node], certs, listen, pg, dsn, heartbeat, down_after
            )
            daemons[node] = Daemon.storage(
                config,
                work / node / "storage.sock",
                start_timeout=30,
                health_service="blockwire.v1.StorageService",
            ).start()
        yield tgtds, daemons
    finally:
        for d in daemons.values():
            d.stop()
        for tgtd in tgtds.values():
            tgtd.stop()
