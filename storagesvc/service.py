"""StorageService: the domain logic behind the v1 StorageService, usable without gRPC.

A thin facade over the parts, which share one `storagesvc.context.Context`: `volumes`, `snapshots`,
`exports` (attachments, and the restore and repair of exports), `reconcile`, `stats`.

Rules they keep (STYLE.md 5, 6, 8):
* record first, act second, undo on failure: every mutation writes the catalog before the side
  effect and registers a compensation on an ExitStack, so a failed call leaves nothing half-made;
* idempotent by contract: repeats return what exists, deletes of what is gone succeed;
* calls on one volume are serialized by a per-volume lock (ABORTED when it cannot be had within
  `lock_timeout`); calls on different volumes run in parallel;
* on start, `reconcile()` makes the target side match the catalog (tgtd forgets everything when it
  restarts) and removes exports under our IQN prefix that the catalog does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import replace

from blockwire.model import AccessMode, Connector, Transport
from blockwire.runtime.clock import Clock
from blockwire.runtime.failpoints import NO_FAILPOINTS, Failpoints
from blockwire.runtime.locks import KeyedLocks
from blockwire.secret import Secret
from storagesvc import stats
from storagesvc.catalog import Catalog
from storagesvc.context import Context, Pool, VolumeEvents, new_id
from storagesvc.encryption import VolumeCrypt
from storagesvc.exports import (
    FP_EXPORT_AFTER_ACL,
    FP_EXPORT_AFTER_ATTACHING,
    FP_EXPORT_AFTER_CATALOG,
    FP_EXPORT_AFTER_TARGET,
    FP_UNEXPORT_AFTER_DETACHING,
    FP_UNEXPORT_AFTER_TARGET_REMOVED,
    Exports,
    new_chap_secret,
)
from storagesvc.migrations import Migrations
from storagesvc.model import (
    Attachment,
    BackendStats,
    Capacity,
    CreateVolumeSpec,
    ExportRecord,
    OperationStats,
    Page,
    QosSpecs,
    Snapshot,
    Volume,
    VolumeType,
)
from storagesvc.reconcile import Reconciler
from storagesvc.scheduler import SchedulerSettings
from storagesvc.snapshots import Snapshots
from storagesvc.targets.base import TargetSpec
from storagesvc.voltypes import VolumeTypes
from storagesvc.volumes import Volumes

# What callers import from here: the facade, the Pool it takes, and the export failpoints (whose home is
# storagesvc.exports; the recovery tests name them through this module).
__all__ = [
    "FP_EXPORT_AFTER_ACL",
    "FP_EXPORT_AFTER_ATTACHING",
    "FP_EXPORT_AFTER_CATALOG",
    "FP_EXPORT_AFTER_TARGET",
    "FP_UNEXPORT_AFTER_DETACHING",
    "FP_UNEXPORT_AFTER_TARGET_REMOVED",
    "Pool",
    "StorageService",
]


class StorageService:
    def __init__(
        self,
        catalog: Catalog,
        pools: Mapping[str, Pool],
        clock: Clock,
        jobs: Executor,
        *,
        iqn_prefix: str,
        naa_oui: str = "001405",
        default_backend: str = "",
        mutual_chap: bool = False,
        lock_timeout: float = 30.0,
        id_factory: Callable[[], str] = new_id,
        secret_factory: Callable[[], Secret] = new_chap_secret,
        failpoints: Failpoints = NO_FAILPOINTS,
        crypt: VolumeCrypt | None = None,
        scheduler: SchedulerSettings | None = None,
    ) -> None:
        if not pools:
            raise ValueError("at least one backend")
        settings = replace(scheduler or SchedulerSettings(), default_backend=default_backend)
        self._bind(
            Context(
                catalog=catalog,
                pools=dict(pools),
                clock=clock,
                jobs=jobs,
                locks=KeyedLocks(lock_timeout),
                events=VolumeEvents(),
                stats=stats.Stats(clock),
                new_id=id_factory,
                new_secret=secret_factory,
                iqn_prefix=iqn_prefix,
                naa_oui=naa_oui,
                default_backend=default_backend or next(iter(pools)),
                mutual_chap=mutual_chap,
                failpoints=failpoints,
                crypt=crypt,
                scheduler=settings,
            )
        )

    def _bind(self, ctx: Context) -> None:
        self.ctx = ctx
        self.volumes = Volumes(ctx)
        self.snapshots = Snapshots(ctx)
        self.exports = Exports(ctx)
        self.migrations = Migrations(ctx, self.exports)
        self.reconciler = Reconciler(ctx, self.exports)
        self.types = VolumeTypes(ctx)

    # -- what callers (the daemon, tests) reach directly

    @property
    def catalog(self) -> Catalog:
        return self.ctx.catalog

    @property
    def pools(self) -> Mapping[str, Pool]:
        return self.ctx.pools

    @property
    def locks(self) -> KeyedLocks:
        return self.ctx.locks

    @property
    def jobs(self) -> Executor:
        return self.ctx.jobs

    @jobs.setter
    def jobs(self, jobs: Executor) -> None:
        self._bind(replace(self.ctx, jobs=jobs))

    def _spec(self, volume: Volume, export: ExportRecord) -> TargetSpec:
        return self.ctx.spec(volume, export)

    # -- volumes

    def create_volume(self, spec: CreateVolumeSpec) -> Volume:
        return self.volumes.create(spec)

    def get_volume(self, volume_id: str) -> Volume:
        return self.volumes.get(volume_id)

    def list_volumes(self, page_size: int, page_token: str, labels: Mapping[str, str]) -> Page[Volume]:
        return self.volumes.page(page_size, page_token, labels)

    def watch_volume(
        self, volume_id: str, *, active: Callable[[], bool] = lambda: True, interval: float = 1.0
    ) -> Iterator[Volume]:
        return self.volumes.watch(volume_id, active=active, interval=interval)

    def delete_volume(self, volume_id: str) -> None:
        self.volumes.delete(volume_id)

    def extend_volume(self, volume_id: str, new_size: int) -> Volume:
        return self.volumes.extend(volume_id, new_size)

    # -- snapshots

    def create_snapshot(self, volume_id: str, name: str, labels: Mapping[str, str]) -> Snapshot:
        return self.snapshots.create(volume_id, name, labels)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        return self.snapshots.get(snapshot_id)

    def list_snapshots(self, volume_id: str, page_size: int, page_token: str) -> Page[Snapshot]:
        return self.snapshots.page(volume_id, page_size, page_token)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.snapshots.delete(snapshot_id)

    # -- attachments

    def create_attachment(
        self,
        volume_id: str,
        connector: Connector,
        mode: AccessMode,
        domain: str = "",
        *,
        transport: Transport | None = None,
    ) -> Attachment:
        return self.exports.create(volume_id, connector, mode, domain, transport=transport)

    def complete_attachment(
        self, attachment_id: str, target_dev: str = "", host_device: str = ""
    ) -> Attachment:
        return self.exports.complete(attachment_id, target_dev, host_device)

    def delete_attachment(self, attachment_id: str) -> None:
        self.exports.delete(attachment_id)

    def get_attachment(self, attachment_id: str) -> Attachment:
        return self.exports.get(attachment_id)

    def list_attachments(
        self, volume_id: str, host: str, page_size: int, page_token: str
    ) -> Page[Attachment]:
        return self.exports.page(volume_id, host, page_size, page_token)

    # -- live migration (storagesvc.migrations)

    def create_migration_attachment(
        self, source_attachment_id: str, connector: Connector, domain: str = ""
    ) -> Attachment:
        return self.migrations.create(source_attachment_id, connector, domain)

    def complete_migration(
        self, attachment_id: str, target_dev: str = "", host_device: str = ""
    ) -> Attachment:
        return self.migrations.complete(attachment_id, target_dev, host_device)

    def rollback_migration(self, attachment_id: str) -> None:
        self.migrations.rollback(attachment_id)

    # -- volume types and QoS specs (storagesvc.voltypes)

    def create_volume_type(
        self, name: str, description: str, extra_specs: Mapping[str, str], qos_specs: str = ""
    ) -> VolumeType:
        return self.types.create_type(name, description, extra_specs, qos_specs)

    def get_volume_type(self, ref: str) -> VolumeType:
        return self.types.vtype(ref)

    def list_volume_types(self, page_size: int, page_token: str) -> Page[VolumeType]:
        return self.types.page_types(page_size, page_token)

    def update_volume_type(
        self, ref: str, description: str | None, extra_specs: Mapping[str, str] | None
    ) -> VolumeType:
        return self.types.update_type(ref, description, extra_specs)

    def delete_volume_type(self, ref: str) -> None:
        self.types.delete_type(ref)

    def set_volume_type_qos(self, ref: str, qos_specs: str) -> VolumeType:
        return self.types.set_qos(ref, qos_specs)

    def create_qos_specs(self, name: str, consumer: str, specs: Mapping[str, str]) -> QosSpecs:
        return self.types.create_qos(name, consumer, specs)

    def get_qos_specs(self, ref: str) -> QosSpecs:
        return self.types.qos(ref)

    def list_qos_specs(self, page_size: int, page_token: str) -> Page[QosSpecs]:
        return self.types.page_qos(page_size, page_token)

    def update_qos_specs(self, ref: str, consumer: str, specs: Mapping[str, str] | None) -> QosSpecs:
        return self.types.update_qos(ref, consumer, specs)

    def delete_qos_specs(self, ref: str) -> None:
        self.types.delete_qos(ref)

    # -- capacity and statistics

    def capacity(self, backend: str = "") -> list[Capacity]:
        return stats.capacity(self.ctx, backend)

    def backend_stats(self) -> tuple[list[BackendStats], list[OperationStats]]:
        return stats.backend_stats(self.ctx)

    # -- restart safety and export supervision

    def reconcile(self) -> None:
        """Makes the target side match the catalog at start: `storagesvc.reconcile.Reconciler.run`."""
        self.reconciler.run()

    def repair_exports(self) -> list[str]:
        """Rebuilds the exports the target side lost; the ids of the volumes repaired
        (`storagesvc.exports.Exports.repair`, run by `storagesvc.supervisor.ExportSupervisor`)."""
        return self.exports.repair()
