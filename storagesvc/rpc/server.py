"""The `blockwire-storage` daemon: config -> service -> gRPC server (unix socket and/or TCP).

    blockwire-storage --config /etc/blockwire/storage.toml

Serves blockwire.v1.StorageService, grpc.health.v1.Health (service "" and "blockwire.v1.StorageService")
and server reflection, through `blockwire.server.serving` (listeners, TLS, logging, signals). Callers are
authorized by `storagesvc.rpc.auth` (admin, agent and storage-node roles); concurrent calls are
bounded per class by [limits] (`blockwire.limits`). On start it reconciles the target side with the
catalog before it reports SERVING, then checks every `service.export_check_interval` seconds that
the target side still has the catalog's exports (`storagesvc.supervisor`). SIGTERM or SIGINT:
NOT_SERVING, stop accepting, finish calls in flight within `server.grace_seconds`, exit 0. Logging is
configured here and only here.

With a [node] table the process is one of several storage nodes sharing the catalog: it registers and
heartbeats (`storagesvc.nodes`) and sends calls on other nodes' backends to them
(`storagesvc.rpc.forward`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from blockwire.errors import BlockwireError, Unavailable
from blockwire.observability import NO_STEPS, SPANS_ONLY, StepObserver, TimedRunner
from blockwire.runtime.clock import Clock, SystemClock
from blockwire.runtime.executor import Executor, Runner
from blockwire.runtime.failpoints import NO_FAILPOINTS, Failpoints
from blockwire.server import serving
from blockwire.server import tracing as server_tracing
from blockwire.server.metrics import Metrics
from blockwire.v1 import storage_pb2, storage_pb2_grpc
from storagesvc import placement
from storagesvc.backends.base import Backend
from storagesvc.backends.file import FileBackend
from storagesvc.backends.lvm_thin import LvmThinBackend
from storagesvc.backends.rbd import (
    Librbd,
    RbdBackend,
    RbdCluster,
    RbdSettings,
    TimedRbdCluster,
    monitors_from_conf,
    read_key,
)
from storagesvc.catalog import Catalog
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.config import BackendConfig, Config, ConfigError, ExporterConfig, load
from storagesvc.encryption import VolumeCrypt
from storagesvc.keys import open_keys
from storagesvc.nodes import Cluster, Heartbeat, NodeSettings
from storagesvc.rpc import auth
from storagesvc.rpc.forward import ForwardInterceptor, Peers, PeerTls, Router
from storagesvc.rpc.servicer import StorageServicer
from storagesvc.scheduler import SchedulerSettings
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


def rbd_settings(cfg: BackendConfig) -> RbdSettings:
    """The rbd backend's settings from its config: monitors (or those its conf names) and keys."""
    try:
        monitors = cfg.monitors or monitors_from_conf(cfg.conf)
        key = read_key(cfg.keyring or cfg.key_file, cfg.user)
        host_key = read_key(cfg.host_key_file, cfg.host_user) if cfg.host_user else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[[backends]] {cfg.name}: {exc}") from exc
    if not monitors:
        raise ConfigError(f"[[backends]] {cfg.name}: {cfg.conf} names no mon_host; set monitors")
    return RbdSettings(
        pool=cfg.pool,
        monitors=monitors,
        user=cfg.user,
        key=key,
        conf=cfg.conf,
        data_pool=cfg.data_pool,
        connect_timeout=cfg.connect_timeout,
        op_timeout=cfg.op_timeout,
        host_users=cfg.host_users,
        host_user_prefix=cfg.host_user_prefix,
        host_user=cfg.host_user,
        host_key=host_key,
        capacity_bytes=cfg.capacity_bytes,
        oversubscription_ratio=cfg.oversubscription_ratio,
        scratch_dir=cfg.scratch_dir,
    )


def make_backend(
    cfg: BackendConfig, runner: Runner, steps: StepObserver = NO_STEPS, clock: Clock | None = None
) -> Backend:
    """The backend of `cfg`; with `steps`, an rbd backend's cluster sessions are timed (step `rbd`)."""
    if cfg.kind == "rbd":
        settings = rbd_settings(cfg)
        cluster: RbdCluster = Librbd(settings)
        if steps is not NO_STEPS:
            cluster = TimedRbdCluster(cluster, steps, clock or SystemClock())
        return RbdBackend(cfg.name, settings, cluster, runner)
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
    stop_metrics: Callable[[], None] | None = None
    stop_tracing: Callable[[], None] | None = None
    heartbeat: Heartbeat | None = None
    peers: Peers | None = None

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.serving.addresses

    def stop(self, grace: float) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.supervisor.stop()
        self.serving.stop(grace)
        if self.peers is not None:
            self.peers.close()
        if self.stop_metrics is not None:
            self.stop_metrics()
        if self.stop_tracing is not None:
            self.stop_tracing()
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.service.catalog.close()


def open_catalog(config: Config) -> Catalog:
    """The catalog [catalog] names: the SQLite file, or the PostgreSQL database (migrated on open)."""
    c = config.catalog
    if c.kind == "sqlite":
        return SqliteCatalog(config.catalog_path, synchronous=config.service.catalog_synchronous)
    from storagesvc.catalog.postgres import PostgresCatalog  # noqa: PLC0415 - optional dependency

    try:
        return PostgresCatalog(
            c.dsn,
            password_file=c.password_file,
            min_size=c.pool_min_size,
            max_size=c.pool_max_size,
            lock_connections=c.lock_connections,
            connect_timeout=c.connect_timeout,
        )
    except (ValueError, OSError, RuntimeError, Unavailable) as exc:
        raise ConfigError(f"[catalog] cannot open the PostgreSQL catalog: {exc}") from None


def build(config: Config, runner: Runner | None = None) -> Daemon:
    """Wires the daemon from its config, reconciles, and starts serving."""
    clock = SystemClock()
    metrics = Metrics(clock) if config.metrics.listen else None
    try:
        stop_tracing = server_tracing.configure(config.tracing, "blockwire-storage")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    runner = runner or Executor()
    steps: StepObserver = NO_STEPS
    if metrics is not None or stop_tracing is not None:
        steps = metrics or SPANS_ONLY
        runner = TimedRunner(runner, steps, clock)
    failpoints = Failpoints.from_environment(os.environ)
    exporters = {
        name: make_exporter(cfg, runner, config.service.naa_oui, failpoints)
        for name, cfg in config.exporters.items()
    }
    pools = {
        b.name: Pool(
            backend=make_backend(b, runner, steps, clock),
            exporter=exporters.get(b.exporter),
            exporter_name=b.exporter,
        )
        for b in config.backends
    }
    svc = config.service
    jobs = futures.ThreadPoolExecutor(max_workers=svc.copy_workers, thread_name_prefix="copy")
    service = StorageService(
        open_catalog(config),
        pools,
        clock,
        jobs,
        iqn_prefix=svc.iqn_prefix,
        naa_oui=svc.naa_oui,
        default_backend=svc.default_backend,
        mutual_chap=svc.mutual_chap,
        lock_timeout=svc.lock_timeout,
        failpoints=failpoints,
        scheduler=SchedulerSettings(
            max_attempts=config.scheduler.max_attempts,
            weigher=config.scheduler.weigher,
            default_volume_type=config.scheduler.default_volume_type,
            zones={b.name: b.availability_zone for b in config.backends},
            capabilities={b.name: dict(b.capabilities) for b in config.backends},
            ratios={b.name: b.oversubscription_ratio for b in config.backends},
        ),
        crypt=VolumeCrypt(
            open_keys(config.keys, str(Path(config.catalog_path).parent)),
            runner,
            cryptsetup=shutil.which("cryptsetup") is not None,
        ),
    )
    service.reconcile()
    if config.server.workers:
        log.warning(
            "[server] workers = %d is ignored: the server's threads follow [limits] (max_streams, "
            "max_long_calls, max_quick_calls); remove the key",
            config.server.workers,
        )

    try:
        joined = join_cluster(config, service, clock)
    except ConfigError:
        jobs.shutdown(wait=False)
        service.catalog.close()
        raise

    def register(server: grpc.Server) -> None:
        storage_pb2_grpc.add_StorageServiceServicer_to_server(
            StorageServicer(service, cluster=joined.cluster), server
        )

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
            interceptors=(auth.interceptor(host_of), *joined.forwarding),
            outer=(
                *((server_tracing.TracingInterceptor(),) if stop_tracing else ()),
                *((metrics.interceptor(),) if metrics is not None else ()),
            ),
        )
        stop_metrics = metrics.serve(config.metrics.listen) if metrics is not None else None
    except (serving.ServingError, OSError) as exc:
        if joined.heartbeat is not None:
            joined.heartbeat.stop()
        jobs.shutdown(wait=False)
        service.catalog.close()
        raise ConfigError(f"cannot serve: {exc}") from exc
    supervisor = ExportSupervisor(service, svc.export_check_interval)
    if metrics is not None:
        storage_gauges(metrics, service, supervisor)
    supervisor.start()
    return Daemon(
        service, running, jobs, supervisor, stop_metrics, stop_tracing, joined.heartbeat, joined.peers
    )


@dataclass
class Joined:
    cluster: Cluster
    heartbeat: Heartbeat | None
    peers: Peers | None
    forwarding: tuple[grpc.ServerInterceptor[Any, Any], ...]


def join_cluster(config: Config, service: StorageService, clock: SystemClock) -> Joined:
    """The cluster view; with [node]: registered and heartbeating, with the forwarding interceptor."""
    node = config.node
    cluster = Cluster(
        service.catalog,
        service.pools,
        clock,
        NodeSettings(node.name, node.address, node.heartbeat_interval, node.down_after) if node else None,
        state=lambda name: placement.backend_state(service.ctx, name),
        weigher=service.ctx.scheduler.weigher,
    )
    if node is None:
        return Joined(cluster, None, None, ())
    try:
        peers = Peers(PeerTls(node.cert_file, node.key_file, node.ca_file))
        heartbeat = Heartbeat(cluster)
        heartbeat.start()  # registers first: refuses a backend name another node serves
    except (OSError, BlockwireError) as exc:
        raise ConfigError(f"[node] {node.name}: {exc}") from exc
    forward = ForwardInterceptor(
        Router.of(cluster, service),
        peers,
        default_timeout=node.forward_timeout,
        max_attempts=service.ctx.scheduler.max_attempts,
    )
    return Joined(cluster, heartbeat, peers, (forward,))


def storage_gauges(metrics: Metrics, service: StorageService, supervisor: ExportSupervisor) -> None:
    """The storage daemon's gauges, read at each scrape."""

    def catalog() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for backend in service.pools:
            volumes, snapshots, provisioned = service.catalog.backend_counts(backend)
            out[(backend, "volumes")] = volumes
            out[(backend, "snapshots")] = snapshots
            out[(backend, "provisioned_bytes")] = provisioned
        return out

    metrics.gauge(
        "blockwire_storage_catalog", "Catalog rows and bytes per backend", ["backend", "what"], catalog
    )
    metrics.gauge(
        "blockwire_storage_exports_repaired",
        "Exports the export supervisor rebuilt since start (e.g. after a tgtd restart)",
        [],
        lambda: {(): float(supervisor.repaired_total)},
    )


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
