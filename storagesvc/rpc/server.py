"""The `blockwire-storage` daemon: config -> service -> gRPC server (unix socket and/or TCP).

    blockwire-storage --config /etc/blockwire/storage.toml

Serves blockwire.v1.StorageService, grpc.health.v1.Health (service "" and "blockwire.v1.StorageService")
and server reflection, through `blockwire.server.serving` (listeners, TLS, logging, signals). Callers are
authorized by `storagesvc.rpc.auth` (admin and agent roles); concurrent calls are bounded per class by
[limits] (`blockwire.limits`). On start it reconciles the target side with the catalog before it reports
SERVING, then checks every `service.export_check_interval` seconds that the target side still has the
catalog's exports (`storagesvc.supervisor`). SIGTERM or SIGINT: NOT_SERVING, stop accepting, finish
calls in flight within `server.grace_seconds`, exit 0. Logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc

from blockwire.runtime.clock import SystemClock
from blockwire.runtime.executor import Executor, Runner
from blockwire.runtime.failpoints import NO_FAILPOINTS, Failpoints
from blockwire.server import serving
from blockwire.v1 import storage_pb2, storage_pb2_grpc
from storagesvc.backends.base import Backend
from storagesvc.backends.file import FileBackend
from storagesvc.backends.lvm_thin import LvmThinBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.config import BackendConfig, Config, ConfigError, ExporterConfig, load
from storagesvc.rpc import auth
from storagesvc.rpc.servicer import StorageServicer
from storagesvc.service import Pool, StorageService
from storagesvc.supervisor import ExportSupervisor
from storagesvc.targets.base import Exporter
from storagesvc.targets.lio import LioExporter
from storagesvc.targets.nvmet import NvmetExporter
from storagesvc.targets.tgt import TgtExporter

log = logging.getLogger(__name__)
SERVICE_NAME = storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name
LONG_METHODS = frozenset(
    f"/{SERVICE_NAME}/{name}"
    for name in (
        "CreateVolume",
        "DeleteVolume",
        "ExtendVolume",
        "CreateSnapshot",
        "DeleteSnapshot",
        "CreateAttachment",
        "DeleteAttachment",
    )
)
"""Storage's long calls ([limits] max_long_calls): backend and target commands, each up to its timeout."""


def make_exporter(
    cfg: ExporterConfig, runner: Runner, naa_oui: str, failpoints: Failpoints = NO_FAILPOINTS
) -> Exporter:
    if cfg.kind == "tgt":
        return TgtExporter(
            runner,
            cfg.portals,
            control_port=cfg.control_port,
            tgtadm=cfg.tgtadm,
            timeout=cfg.command_timeout,
            failpoints=failpoints,
        )
    if cfg.kind == "nvmet":
        return NvmetExporter(
            cfg.portals,
            nqn_prefix=cfg.nqn_prefix,
            dhchap=cfg.dhchap,
            dhchap_bidirectional=cfg.dhchap_bidirectional,
            dhchap_key_file=cfg.dhchap_key_file,
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
    serving: serving.Serving
    jobs: futures.ThreadPoolExecutor
    supervisor: ExportSupervisor

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.serving.addresses

    def stop(self, grace: float) -> None:
        self.supervisor.stop()
        self.serving.stop(grace)
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.service.catalog.close()


def build(config: Config, runner: Runner | None = None) -> Daemon:
    """Wires the daemon from its config, reconciles, and starts serving."""
    runner = runner or Executor()
    clock = SystemClock()
    failpoints = Failpoints.from_environment(os.environ)
    exporters = {
        name: make_exporter(cfg, runner, config.service.naa_oui, failpoints)
        for name, cfg in config.exporters.items()
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
        SqliteCatalog(svc.catalog_path, synchronous=svc.catalog_synchronous),
        pools,
        clock,
        jobs,
        iqn_prefix=svc.iqn_prefix,
        naa_oui=svc.naa_oui,
        default_backend=svc.default_backend,
        mutual_chap=svc.mutual_chap,
        lock_timeout=svc.lock_timeout,
        failpoints=failpoints,
    )
    service.reconcile()
    if config.server.workers:
        log.warning(
            "[server] workers = %d is ignored: the server's threads follow [limits] (max_streams, "
            "max_long_calls, max_quick_calls); remove the key",
            config.server.workers,
        )

    def register(server: grpc.Server) -> None:
        storage_pb2_grpc.add_StorageServiceServicer_to_server(StorageServicer(service), server)

    def host_of(attachment_id: str) -> str | None:
        a = service.catalog.get_attachment(attachment_id)
        return a.connector.host if a is not None else None

    tls = config.tls
    listeners = serving.Listeners(
        unix_socket=config.server.unix_socket,
        unix_mode=config.server.unix_socket_mode,
        tcp=config.server.listen,
        tls=serving.TlsServer(tls.cert_file, tls.key_file, tls.client_ca_file, tls.require_client_cert),
        allow_insecure_tcp=tls.allow_insecure_tcp,
    )
    try:
        running = serving.start(
            services=(SERVICE_NAME,),
            register=register,
            listeners=listeners,
            limits=config.limits,
            long_methods=LONG_METHODS,
            daemon="blockwire-storage",
            interceptors=(auth.interceptor(host_of),),
        )
    except serving.ServingError as exc:
        jobs.shutdown(wait=False)
        service.catalog.close()
        raise ConfigError(str(exc)) from exc
    supervisor = ExportSupervisor(service, svc.export_check_interval)
    supervisor.start()
    return Daemon(service, running, jobs, supervisor)


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
    serving.configure_logging(config.server.log_format, config.server.log_level)
    stop = serving.stop_on_signals()
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
