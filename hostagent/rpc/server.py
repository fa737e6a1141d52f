"""The `blockwire-agent` daemon: HostAgentService over a unix socket and/or TCP, with health and reflection.

    blockwire-agent --config /etc/blockwire/agent.toml

Logging is configured here and only here. SIGTERM/SIGINT stop the server gracefully (running calls
get `grace_seconds` to finish). On start the agent reconciles its journal with the host.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blockwire.errors import BlockwireError
from blockwire.v1 import hostagent_pb2, hostagent_pb2_grpc
from hostagent.config import AgentConfig, load_config
from hostagent.rpc.servicer import HostAgentServicer
from hostagent.rpc.storage_client import GrpcStorageApi, channel_for
from hostagent.wiring import build_agent

log = logging.getLogger("hostagent")

SERVICE = hostagent_pb2.DESCRIPTOR.services_by_name["HostAgentService"].full_name


def _bind(server: grpc.Server, config: AgentConfig) -> list[str]:
    bound = []
    if config.listen_unix:
        sock = Path(config.listen_unix)
        sock.parent.mkdir(parents=True, exist_ok=True)
        if sock.exists() or sock.is_symlink():
            sock.unlink()  # a stale socket of a previous run
        server.add_insecure_port(f"unix://{sock}")
        bound.append(f"unix://{sock}")
    if config.listen_tcp:
        port = server.add_insecure_port(config.listen_tcp)
        if port == 0:
            raise BlockwireError(f"cannot listen on {config.listen_tcp}")
        bound.append(config.listen_tcp)
    return bound


def serve(config: AgentConfig, stop: threading.Event) -> int:
    channel = channel_for(config.storage_address) if config.storage_address else None
    storage = GrpcStorageApi(channel, timeout=config.storage_timeout) if channel is not None else None
    agent, hypervisor = build_agent(config, storage)
    if config.reconcile_on_start:
        agent.reconcile()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="rpc"))
    hostagent_pb2_grpc.add_HostAgentServiceServicer_to_server(HostAgentServicer(agent), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = _bind(server, config)
    server.start()
    if config.listen_unix:
        os.chmod(config.listen_unix, 0o660)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("blockwire-agent serving on %s (host %s)", ", ".join(bound), agent.connector.host)
    stop.wait()
    log.info("stopping (grace %.0fs)", config.grace_seconds)
    health_servicer.enter_graceful_shutdown()
    server.stop(config.grace_seconds).wait()
    hypervisor.close()
    if channel is not None:
        channel.close()
    return 0


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
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return serve(config, stop)
    except BlockwireError as exc:
        log.error("cannot start: %s", exc.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
