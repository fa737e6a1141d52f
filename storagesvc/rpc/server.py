"""The `blockwire-storage` daemon: config -> service -> gRPC server (unix socket and/or TCP).

    blockwire-storage --config /etc/blockwire/storage.toml

Serves blockwire.v1.StorageService, grpc.health.v1.Health (service "" and "blockwire.v1.StorageService")
and server reflection. On start it reconciles the target side with the catalog before it reports
SERVING. SIGTERM or SIGINT: NOT_SERVING, stop accepting, finish calls in flight within
`server.grace_seconds`, exit 0. Logging is configured here and only here (JSON or key=value lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blockwire.v1 import storage_pb2, storage_pb2_grpc
from hostagent.host.clock import SystemClock
from hostagent.host.executor import Executor, Runner
from storagesvc.backends.base import Backend
from storagesvc.backends.file import FileBackend
from storagesvc.backends.lvm_thin import LvmThinBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.config import BackendConfig, Config, ConfigError, ExporterConfig, load
from storagesvc.rpc.servicer import StorageServicer
from storagesvc.service import Pool, StorageService
from storagesvc.targets.base import Exporter
from storagesvc.targets.lio import LioExporter
from storagesvc.targets.tgt import TgtExporter

log = logging.getLogger(__name__)
SERVICE_NAME = storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class KvFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        level = record.levelname.lower()
        line = f"ts={ts} level={level} logger={record.name} msg={json.dumps(record.getMessage())}"
        if record.exc_info:
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


def configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KvFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def make_exporter(cfg: ExporterConfig, runner: Runner, naa_oui: str) -> Exporter:
    if cfg.kind == "tgt":
        return TgtExporter(
            runner, cfg.portals, control_port=cfg.control_port, tgtadm=cfg.tgtadm, timeout=cfg.command_timeout
        )
    return LioExporter(cfg.portals, naa_oui=naa_oui)


def make_backend(cfg: BackendConfig, runner: Runner) -> Backend:
    if cfg.kind == "file":
        return FileBackend(cfg.name, cfg.path, runner, oversubscription_ratio=cfg.oversubscription_ratio)
    return LvmThinBackend(
        cfg.name, cfg.vg, cfg.pool, runner, oversubscription_ratio=cfg.oversubscription_ratio
    )


@dataclass
class Daemon:
    service: StorageService
    server: grpc.Server
    health: health.HealthServicer
    jobs: futures.ThreadPoolExecutor
    addresses: tuple[str, ...]

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.service.catalog.close()


def build(config: Config, runner: Runner | None = None) -> Daemon:
    """Wires the daemon from its config, reconciles, and starts serving."""
    runner = runner or Executor()
    clock = SystemClock()
    exporters = {
        name: make_exporter(cfg, runner, config.service.naa_oui) for name, cfg in config.exporters.items()
    }
    pools = {
        b.name: Pool(
            backend=make_backend(b, runner), exporter=exporters[b.exporter], exporter_name=b.exporter
        )
        for b in config.backends
    }
    svc = config.service
    jobs = futures.ThreadPoolExecutor(max_workers=svc.copy_workers, thread_name_prefix="copy")
    service = StorageService(
        SqliteCatalog(svc.catalog_path),
        pools,
        clock,
        jobs,
        iqn_prefix=svc.iqn_prefix,
        naa_oui=svc.naa_oui,
        default_backend=svc.default_backend,
        mutual_chap=svc.mutual_chap,
        lock_timeout=svc.lock_timeout,
    )
    service.reconcile()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.server.workers, thread_name_prefix="rpc")
    )
    storage_pb2_grpc.add_StorageServiceServicer_to_server(StorageServicer(service), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    addresses = []
    if config.server.unix_socket:
        path = Path(config.server.unix_socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # a stale socket of a previous run
        server.add_insecure_port(f"unix:{path}")
        addresses.append(f"unix:{path}")
    for address in config.server.listen:
        port = server.add_insecure_port(address)
        addresses.append(f"{address.rpartition(':')[0]}:{port}")
    if not addresses:
        raise ConfigError("[server]: set unix_socket or listen")
    server.start()
    if config.server.unix_socket:
        os.chmod(config.server.unix_socket, 0o660)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Daemon(service, server, health_servicer, jobs, tuple(addresses))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the daemon."""
    parser = argparse.ArgumentParser(prog="blockwire-storage", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TOML file (see deploy/storage.example.toml)")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"blockwire-storage: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.server.log_format, config.server.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon = build(config)
    except ConfigError as exc:
        log.error("configuration: %s", exc)
        return 2
    except Exception:
        log.exception("start failed")
        return 1
    log.info("serving on %s", ", ".join(daemon.addresses))
    stop.wait()
    daemon.stop(config.server.grace_seconds)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
