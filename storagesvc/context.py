"""The one context the storage service's parts share (volumes, snapshots, exports, reconcile, stats).

`Context` holds what they all stand on: the catalog, the pools (a backend and its exporter), the clock,
the jobs executor, the per-volume locks, the volume events, the statistics, the id and secret factories
and the service's settings; and the few helpers every part uses: read a volume or fail NOT_FOUND, save
one (and tell its watchers), look up a pool, check a backend's space, the `TargetSpec` of an export.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from datetime import datetime

from blockwire import validate
from blockwire.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from blockwire.model import AccessMode
from blockwire.runtime.clock import Clock
from blockwire.runtime.failpoints import NO_FAILPOINTS, Failpoints
from blockwire.runtime.locks import KeyedLocks
from blockwire.secret import Secret
from storagesvc import identity
from storagesvc.backends.base import Backend
from storagesvc.catalog import Catalog, Cursor, time_key
from storagesvc.encryption import VolumeCrypt
from storagesvc.model import ExportRecord, Volume
from storagesvc.scheduler import SchedulerSettings
from storagesvc.stats import Stats
from storagesvc.targets.base import Exporter, NvmeExporter, TargetSpec

LOCK_WAIT_FOREVER = 365 * 86400.0  # a catalog lock's wait when the service has no lock timeout


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Pool:
    """A backend and the exporter in front of it (None: hosts open the volumes themselves, rbd)."""

    backend: Backend
    exporter: Exporter | None = None
    exporter_name: str = ""

    def target_exporter(self) -> Exporter:
        """The exporter of a pool that exports (a bug to ask a direct one)."""
        if self.exporter is None:
            raise AssertionError(f"backend {self.backend.name} has no exporter")
        return self.exporter


class VolumeEvents:
    """Tells watchers that a volume changed: a version per volume and one condition variable."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._versions: dict[str, int] = {}
        self._held = threading.local()  # this thread's changes held back until its commit

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """This thread's `changed` calls inside the block are told when it ends (after the catalog
        transaction inside it committed: a watcher woken earlier would read the state before it)."""
        if getattr(self._held, "ids", None) is not None:
            yield
            return
        ids: list[str] = []
        self._held.ids = ids
        try:
            yield
        finally:
            self._held.ids = None
            for volume_id in dict.fromkeys(ids):
                self.changed(volume_id)

    def changed(self, volume_id: str) -> None:
        held: list[str] | None = getattr(self._held, "ids", None)
        if held is not None:
            held.append(volume_id)
            return
        with self._cond:
            self._versions[volume_id] = self._versions.get(volume_id, 0) + 1
            self._cond.notify_all()

    def version(self, volume_id: str) -> int:
        with self._cond:
            return self._versions.get(volume_id, 0)

    def wait(self, volume_id: str, seen: int, timeout: float) -> int:
        """Waits until the volume's version differs from `seen`, or `timeout` seconds; returns it."""
        with self._cond:
            self._cond.wait_for(lambda: self._versions.get(volume_id, 0) != seen, timeout)
            return self._versions.get(volume_id, 0)


@dataclass(frozen=True)
class Context:
    catalog: Catalog
    pools: Mapping[str, Pool]
    clock: Clock
    jobs: Executor
    locks: KeyedLocks
    events: VolumeEvents
    stats: Stats
    new_id: Callable[[], str]
    new_secret: Callable[[], Secret]
    iqn_prefix: str
    naa_oui: str
    default_backend: str
    mutual_chap: bool
    failpoints: Failpoints = NO_FAILPOINTS
    crypt: VolumeCrypt | None = None  # encrypted volumes; None: refused (no key manager)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)

    def need_crypt(self) -> VolumeCrypt:
        if self.crypt is None:
            raise FailedPrecondition(
                "encrypted volumes need a key manager; configure [keys] on the storage service"
            )
        return self.crypt

    def key_in_use(self, key_ref: str, *, but_volume: str = "", but_snapshot: str = "") -> bool:
        """Whether a volume or snapshot other than the named ones holds this key (clones share keys)."""
        for v in self.all_volumes():
            if v.id != but_volume and v.encryption is not None and v.encryption.key_ref == key_ref:
                return True
        after = None
        while True:
            snaps = self.catalog.list_snapshots(after=after, limit=500)
            for s in snaps:
                if s.id != but_snapshot and s.encryption is not None and s.encryption.key_ref == key_ref:
                    return True
            if len(snaps) < 500:
                return False
            after = Cursor(time_key(snaps[-1].create_time), snaps[-1].id)

    def now(self) -> datetime:
        return self.clock.now()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The catalog writes inside in one transaction (one commit), the volumes' watchers told after
        it (see `Catalog.transaction`)."""
        with self.events.held(), self.catalog.transaction():
            yield

    @contextlib.contextmanager
    def hold_volume(self, volume_id: str) -> Iterator[None]:
        """The volume's lock: this process's first, then the catalog's across every storage process
        sharing it (a no-op on SQLite); ABORTED naming the volume when either is not had within the
        lock timeout."""
        with (
            self.locks.hold(volume_id, f"volume {volume_id}"),
            self.catalog.hold(f"volume {volume_id}", self.locks.timeout or LOCK_WAIT_FOREVER),
        ):
            yield

    def pool(self, backend: str, field: str = "backend") -> Pool:
        try:
            return self.pools[backend]
        except KeyError:
            raise InvalidArgument(
                field, f"unknown backend {backend!r} (have: {', '.join(self.pools)})"
            ) from None

    def volume(self, volume_id: str, field: str = "volume_id") -> Volume:
        validate.object_id(volume_id, field)
        v = self.catalog.get_volume(volume_id)
        if v is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return v

    def save(self, volume: Volume) -> Volume:
        volume = replace(volume, update_time=self.now(), attachment_ids=())
        self.catalog.update_volume(volume)
        self.events.changed(volume.id)
        return volume

    def with_attachments(self, volume: Volume) -> Volume:
        atts = self.catalog.attachments_of(volume.id)
        return replace(volume, attachment_ids=tuple(a.id for a in atts))

    def all_volumes(self) -> Iterator[Volume]:
        after: Cursor | None = None
        while True:
            page = self.catalog.list_volumes(after=after, limit=500)
            yield from page
            if len(page) < 500:
                return
            after = Cursor(time_key(page[-1].create_time), page[-1].id)

    def check_space(self, pool: Pool, size: int) -> None:
        _, _, provisioned = self.catalog.backend_counts(pool.backend.name)
        limit = pool.backend.max_volume_bytes(provisioned)
        if size > limit:
            raise ResourceExhausted(
                f"backend {pool.backend.name} can take at most {limit} more bytes now; {size} were asked for"
            )

    def target_prefix(self, exporter: Exporter) -> str:
        """What the name of every target of this service on `exporter` starts with: the IQN prefix
        and ":" for iSCSI exporters, the exporter's NQN prefix and ":" for NVMe ones."""
        return f"{exporter.nqn_prefix if isinstance(exporter, NvmeExporter) else self.iqn_prefix}:"

    def spec(self, volume: Volume, export: ExportRecord) -> TargetSpec:
        pool = self.pools[volume.backend]
        nvme = isinstance(pool.exporter, NvmeExporter)
        return TargetSpec(
            volume_id=volume.id,
            target_iqn=export.target_iqn,
            device_path=pool.backend.device_path(volume.id),
            wwn=volume.wwn,
            serial=volume.serial,
            readonly=export.access_mode is AccessMode.READ_ONLY,
            chap=export.chap,
            mutual_chap=export.mutual_chap,
            nguid=identity.namespace_nguid(volume.id, self.naa_oui) if nvme else "",
            uuid=identity.namespace_uuid(volume.id) if nvme else "",
        )
