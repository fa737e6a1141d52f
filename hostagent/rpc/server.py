"""The `blockwire-agent` daemon: HostAgentService over a unix socket and/or TCP, with health and reflection.

    blockwire-agent --config /etc/blockwire/agent.toml

Listeners, TLS, concurrency bounds ([limits]), logging and signals come from `blockwire.server.serving`; only
admins may call (the unix socket, or a TLS client certificate with SAN URI blockwire://admin/<name>).
Logging is configured here and only here. SIGTERM/SIGINT stop the server gracefully (running calls get
`grace_seconds` to finish). On start the agent reconciles its journal with the host; with the kernel
initiator it then checks the attached volumes' iSCSI sessions every `path_check_interval` seconds
(`hostagent.pathcheck`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import grpc

from blockwire.errors import BlockwireError
from blockwire.observability import NO_STEPS, SPANS_ONLY
from blockwire.server import serving
from blockwire.server import tracing as server_tracing
from blockwire.server.metrics import Metrics
from blockwire.v1 import hostagent_pb2, hostagent_pb2_grpc
from hostagent.api import HostAgent
from hostagent.config import AgentConfig, load_config
from hostagent.model import AttachmentState
from hostagent.pathcheck import PathSupervisor
from hostagent.rpc.peer_client import GrpcPeerAgent
from hostagent.rpc.servicer import HostAgentServicer
from hostagent.rpc.storage_client import GrpcStorageApi, channel_for, tls_options
from hostagent.wiring import build_agent, build_path_supervisor

log = logging.getLogger("hostagent")

SERVICE = hostagent_pb2.DESCRIPTOR.services_by_name["HostAgentService"].full_name
LONG_METHODS = frozenset(
    f"/{SERVICE}/{name}"
    for name in (
        "AttachVolume",
        "DetachVolume",
        "ExtendVolume",
        "ConnectVolume",
        "DisconnectVolume",
        "PrepareMigration",
        "FinishIncomingMigration",
        "FinishOutgoingMigration",
        "AbortMigration",
        "MigrateDomain",
    )
)
"""The agent's long calls ([limits] max_long_calls): logins, udev and DEVICE_REMOVED waits, rescans."""


PEER_METHODS = frozenset({"PrepareMigration", "FinishIncomingMigration", "AbortMigration"})
"""What another host's agent may call here (its MigrateDomain, with its agent identity)."""


def agent_policy(identity: serving.Identity, method: str, request: object) -> None:
    """Admins (TLS admin certificate, the unix socket) may call everything; another host's agent
    (blockwire://agent/<host>) only the destination's part of a live migration (PEER_METHODS)."""
    if identity.role == serving.AGENT and method in PEER_METHODS:
        return
    serving.admin_only(identity, method, request)


def serve(config: AgentConfig, stop: serving.ShutdownSignal) -> int:
    st = config.storage_tls
    tls = tls_options(st.ca_file, st.cert_file, st.key_file, st.server_name)
    channel = channel_for(config.storage_address, tls) if config.storage_address else None
    storage = GrpcStorageApi(channel, timeout=config.storage_timeout) if channel is not None else None
    metrics = Metrics() if config.metrics.listen else None
    try:
        stop_tracing = server_tracing.configure(config.tracing, "blockwire-agent")
    except ValueError as exc:
        raise BlockwireError(str(exc)) from None
    agent, hypervisor = build_agent(config, storage, metrics or (SPANS_ONLY if stop_tracing else NO_STEPS))
    if config.reconcile_on_start:
        agent.reconcile()
    supervisor = build_path_supervisor(config, agent)
    if metrics is not None:
        agent_gauges(metrics, agent, supervisor)

    def peer_for(address: str) -> GrpcPeerAgent:
        # this agent's own identity ([storage_tls]: its client certificate, blockwire://agent/<host>)
        return GrpcPeerAgent(address, tls_options(st.ca_file, st.cert_file, st.key_file, ""))

    def register(server: grpc.Server) -> None:
        hostagent_pb2_grpc.add_HostAgentServiceServicer_to_server(HostAgentServicer(agent, peer_for), server)

    t = config.tls
    listeners = serving.Listeners(
        unix_socket=config.listen_unix,
        tcp=(config.listen_tcp,) if config.listen_tcp else (),
        tls=serving.TlsServer(t.cert_file, t.key_file, t.client_ca_file, t.require_client_cert),
        allow_insecure_tcp=t.allow_insecure_tcp,
    )
    try:
        running = serving.start(
            services=(SERVICE,),
            register=register,
            listeners=listeners,
            limits=config.limits,
            long_methods=LONG_METHODS,
            daemon="blockwire-agent",
            interceptors=(serving.AuthInterceptor(f"/{SERVICE}/", agent_policy),),
            outer=(
                *((server_tracing.TracingInterceptor(),) if stop_tracing else ()),
                *((metrics.interceptor(),) if metrics is not None else ()),
            ),
        )
        stop_metrics = metrics.serve(config.metrics.listen) if metrics is not None else None
    except (serving.ServingError, OSError) as exc:
        hypervisor.close()
        raise BlockwireError(f"cannot serve: {exc}") from exc
    if supervisor is not None:
        supervisor.start()
    log.info("blockwire-agent serving on %s (host %s)", ", ".join(running.addresses), agent.connector.host)
    stop.wait()
    log.info("stopping (grace %.0fs)", config.grace_seconds)
    if supervisor is not None:
        supervisor.stop()
    running.stop(config.grace_seconds)
    if stop_metrics is not None:
        stop_metrics()
    if stop_tracing is not None:
        stop_tracing()
    hypervisor.close()
    if channel is not None:
        channel.close()
    return 0


def agent_gauges(metrics: Metrics, agent: HostAgent, supervisor: PathSupervisor | None) -> None:
    """The agent's gauges, read at each scrape."""

    def by_state() -> dict[tuple[str, ...], float]:
        counts: Counter[tuple[str, ...]] = Counter((r.state.value,) for r in agent.journal.all())
        return {**{(s.value,): 0.0 for s in AttachmentState}, **{k: float(v) for k, v in counts.items()}}

    metrics.gauge(
        "blockwire_agent_attachments", "Journal records of this host, by state (error: see the record)",
        ["state"], by_state,
    )  # fmt: skip
    if supervisor is not None:
        metrics.gauge(
            "blockwire_agent_paths", "Supervised kernel iSCSI paths, up and down", ["state"],
            lambda: {("up",): float(supervisor.paths()[0]), ("down",): float(supervisor.paths()[1])},
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the daemon."""
    parser = argparse.ArgumentParser(prog="blockwire-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="/etc/blockwire/agent.toml", help="TOML config file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if Path(args.config).exists() or args.config else AgentConfig()
    except (OSError, BlockwireError) as exc:
        print(f"blockwire-agent: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    serving.configure_logging("kv", config.log_level)
    stop = serving.stop_on_signals()
    try:
        return serve(config, stop)
    except BlockwireError as exc:
        log.error("cannot start: %s", exc.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
