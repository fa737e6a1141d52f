"""The real StorageService and HostAgentService servers as the daemons build them (blockwire.server.serving:
unix socket + TLS TCP listener, the role interceptors), in process, with test certificates."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from blockwire.client import TlsOptions, make_channel
from blockwire.server import serving
from blockwire.v1 import hostagent_pb2_grpc, storage_pb2_grpc
from hostagent.rpc.server import agent_policy
from hostagent.rpc.servicer import HostAgentServicer
from storagesvc.rpc import auth
from tests.fakes.agent import fake_agent
from tests.fakes.certs import Certs, Pair
from tests.fakes.storage_rig import StorageRig

STORAGE = "blockwire.v1.StorageService"
AGENT = "blockwire.v1.HostAgentService"


@dataclass
class Identities:
    certs: Certs
    server: Pair
    admin: Pair
    agent_a: Pair
    agent_b: Pair
    no_role: Pair
    stranger: Pair  # signed by another CA

    @classmethod
    def make(cls, root: Path) -> Identities:
        certs = Certs(root)
        other = Certs(root, "other-ca")
        return cls(
            certs=certs,
            server=certs.server(),
            admin=certs.client("admin", "blockwire://admin/ops"),
            agent_a=certs.client("agent-a", "blockwire://agent/host-a"),
            agent_b=certs.client("agent-b", "blockwire://agent/host-b"),
            no_role=certs.client("no-role", None),
            stranger=other.client("stranger", "blockwire://admin/stranger"),
        )

    def tls(self, who: Pair | None, server_name: str | None = None) -> TlsOptions:
        return TlsOptions(
            ca_file=str(self.certs.ca.cert),
            cert_file=str(who.cert) if who else None,
            key_file=str(who.key) if who else None,
            server_name=server_name,
        )


@dataclass
class Running:
    serving: serving.Serving
    unix: str
    tcp: str

    def channel(self, tls: TlsOptions | None) -> grpc.Channel:
        return make_channel(self.tcp, tls)


def _listeners(ids: Identities, sock: Path, require_client_cert: bool) -> serving.Listeners:
    return serving.Listeners(
        unix_socket=str(sock),
        tcp=("127.0.0.1:0",),
        tls=serving.TlsServer(
            str(ids.server.cert), str(ids.server.key), str(ids.certs.ca.cert), require_client_cert
        ),
    )


def _running(s: serving.Serving) -> Running:
    unix = next(a for a in s.addresses if a.startswith("unix://"))
    tcp = next(a for a in s.addresses if a.startswith("tls://")).removeprefix("tls://")
    return Running(s, unix, tcp)


@contextmanager
def storage_server(
    rig: StorageRig, ids: Identities, *, require_client_cert: bool = True
) -> Iterator[Running]:
    def host_of(attachment_id: str) -> str | None:
        a = rig.catalog.get_attachment(attachment_id)
        return a.connector.host if a is not None else None

    s = serving.start(
        services=(STORAGE,),
        register=lambda server: storage_pb2_grpc.add_StorageServiceServicer_to_server(rig.servicer, server),
        listeners=_listeners(ids, rig.root / "run" / "storage.sock", require_client_cert),
        interceptors=(auth.interceptor(host_of),),
    )
    try:
        yield _running(s)
    finally:
        s.stop(0)


@contextmanager
def agent_server(state: Path, ids: Identities) -> Iterator[Running]:
    servicer = HostAgentServicer(fake_agent(state))
    s = serving.start(
        services=(AGENT,),
        register=lambda server: hostagent_pb2_grpc.add_HostAgentServiceServicer_to_server(servicer, server),
        listeners=_listeners(ids, state / "run" / "agent.sock", True),
        interceptors=(serving.AuthInterceptor(f"/{AGENT}/", agent_policy),),
    )
    try:
        yield _running(s)
    finally:
        s.stop(0)
