"""StorageService: the domain logic behind the v1 StorageService, usable without gRPC.

Rules it keeps (STYLE.md 5, 6, 8):
* record first, act second, undo on failure: every mutation writes the catalog before the side
  effect and registers a compensation on an ExitStack, so a failed call leaves nothing half-made;
* idempotent by contract: repeats return what exists, deletes of what is gone succeed;
* calls on one volume are serialized by a per-volume lock (ABORTED when it cannot be had within
  `lock_timeout`); calls on different volumes run in parallel;
* on start, `reconcile()` makes the target side match the catalog (tgtd forgets everything when it
  restarts) and removes exports under our IQN prefix that the catalog does not know.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import secrets
import string
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar

from blockwire import failpoints, validate
from blockwire.errors import (
    Aborted,
    AlreadyExists,
    BlockwireError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from blockwire.model import AccessMode, Chap, ConnectionInfo, Connector, IscsiConnection, IscsiPath, Transport
from blockwire.secret import Secret
from hostagent.host.clock import Clock
from storagesvc import identity, paging
from storagesvc.backends.base import Backend, ImageInfo
from storagesvc.catalog import Catalog, Conflict, Cursor, time_key
from storagesvc.model import (
    MIB,
    SETTLED_VOLUME_STATES,
    Attachment,
    AttachmentState,
    BackendStats,
    Capacity,
    CreateVolumeSpec,
    ExportRecord,
    OperationStats,
    Page,
    Progress,
    Snapshot,
    SnapshotState,
    Volume,
    VolumeState,
)
from storagesvc.targets.base import AccountPruner, Exporter, TargetSpec, TargetState

log = logging.getLogger(__name__)

CHAP_ALPHABET = string.ascii_letters + string.digits
CHAP_LENGTH = 16
ATTACHABLE = frozenset(
    {VolumeState.AVAILABLE, VolumeState.RESERVED, VolumeState.ATTACHING, VolumeState.IN_USE}
)
L = TypeVar("L", bound=paging.Listed)

# Failpoints (blockwire.failpoints, armed only by BLOCKWIRE_FAILPOINTS): where the recovery tests kill
# the service in the middle of an export (more in storagesvc/targets/tgt.py). See `reconcile`.
FP_EXPORT_AFTER_CATALOG = "storage.export.after_catalog"  # attachment RESERVED, nothing exported
FP_EXPORT_AFTER_TARGET = "storage.export.after_target"  # target, LUN and CHAP made, no ACL entry
FP_EXPORT_AFTER_ACL = "storage.export.after_acl"  # the host is admitted; still RESERVED in the catalog
FP_EXPORT_AFTER_ATTACHING = "storage.export.after_attaching"  # ATTACHING recorded, the answer not sent
FP_UNEXPORT_AFTER_DETACHING = "storage.unexport.after_detaching"  # DETACHING recorded, target still there
FP_UNEXPORT_AFTER_TARGET_REMOVED = "storage.unexport.after_target_removed"  # target gone, row still there
_CHAP_USER = re.compile(r"(in|out)-[0-9a-f]{1,24}")
_EXPORTED = frozenset({VolumeState.ATTACHING, VolumeState.IN_USE})  # states whose export must be live


def new_chap_secret() -> Secret:
    return Secret("".join(secrets.choice(CHAP_ALPHABET) for _ in range(CHAP_LENGTH)))


def _consumer(host: str, domain: str) -> str:
    return f"domain {domain!r} on host {host}" if domain else f"host {host}"


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Pool:
    """A backend and the exporter in front of it."""

    backend: Backend
    exporter: Exporter
    exporter_name: str


class KeyedLocks:
    """One lock per key (volume id, or a name being created), made on first use and dropped when
    nobody holds or waits for it, so ids that callers make up (random, or of volumes that do not exist)
    leave nothing behind. A caller waits up to `timeout` seconds, then gets ABORTED."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, holders + waiters)

    def __len__(self) -> int:
        """Keys held or waited for now."""
        with self._guard:
            return len(self._locks)

    def _ref(self, key: str) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
            return lock

    def _unref(self, key: str) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    @contextlib.contextmanager
    def hold(self, key: str, what: str) -> Iterator[None]:
        lock = self._ref(key)
        try:
            if not lock.acquire(timeout=self.timeout):
                raise Aborted(f"another call on {what} is in flight; retry with backoff")
            try:
                yield
            finally:
                lock.release()
        finally:
            self._unref(key)


class Stats:
    """Per-operation counts and latencies (the last `window` samples) since the service started."""

    def __init__(self, clock: Clock, window: int = 2048) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._samples: dict[str, collections.deque[float]] = {}
        self._counts: dict[str, list[int]] = {}
        self.window = window

    @contextlib.contextmanager
    def measure(self, operation: str) -> Iterator[None]:
        start = self.clock.monotonic()
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            elapsed = self.clock.monotonic() - start
            with self._lock:
                counts = self._counts.setdefault(operation, [0, 0])
                counts[0] += 1
                counts[1] += failed
                self._samples.setdefault(operation, collections.deque(maxlen=self.window)).append(elapsed)

    def snapshot(self) -> list[OperationStats]:
        with self._lock:
            out = []
            for op in sorted(self._counts):
                samples = sorted(self._samples[op])
                out.append(
                    OperationStats(
                        operation=op,
                        count=self._counts[op][0],
                        errors=self._counts[op][1],
                        p50_micros=int(percentile(samples, 50) * 1e6),
                        p95_micros=int(percentile(samples, 95) * 1e6),
                    )
                )
            return out


def percentile(sorted_samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted samples; 0 for none."""
    if not sorted_samples:
        return 0.0
    rank = max(1, -(-len(sorted_samples) * p // 100))
    return sorted_samples[int(rank) - 1]


class VolumeEvents:
    """Tells watchers that a volume changed: a version per volume and one condition variable."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._versions: dict[str, int] = {}

    def changed(self, volume_id: str) -> None:
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
    ) -> None:
        if not pools:
            raise ValueError("at least one backend")
        self.catalog = catalog
        self.pools = dict(pools)
        self.clock = clock
        self.jobs = jobs
        self.iqn_prefix = iqn_prefix
        self.naa_oui = naa_oui
        self.default_backend = default_backend or next(iter(self.pools))
        self.mutual_chap = mutual_chap
        self.new_id = id_factory
        self.new_secret = secret_factory
        self.locks = KeyedLocks(lock_timeout)
        self.stats = Stats(clock)
        self.events = VolumeEvents()

    # -- helpers

    def _now(self) -> datetime:
        return self.clock.now()

    def _pool(self, backend: str, field: str = "backend") -> Pool:
        try:
            return self.pools[backend]
        except KeyError:
            raise InvalidArgument(
                field, f"unknown backend {backend!r} (have: {', '.join(self.pools)})"
            ) from None

    def _save(self, volume: Volume) -> Volume:
        volume = replace(volume, update_time=self._now(), attachment_ids=())
        self.catalog.update_volume(volume)
        self.events.changed(volume.id)
        return volume

    def _with_attachments(self, volume: Volume) -> Volume:
        atts = self.catalog.list_attachments(volume_id=volume.id, after=None, limit=10_000)
        return replace(volume, attachment_ids=tuple(a.id for a in atts))

    def _volume(self, volume_id: str, field: str = "volume_id") -> Volume:
        validate.object_id(volume_id, field)
        v = self.catalog.get_volume(volume_id)
        if v is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return v

    def _check_space(self, pool: Pool, size: int) -> None:
        _, _, provisioned = self.catalog.backend_counts(pool.backend.name)
        limit = pool.backend.max_volume_bytes(provisioned)
        if size > limit:
            raise ResourceExhausted(
                f"backend {pool.backend.name} can take at most {limit} more bytes now; {size} were asked for"
            )

    def _spec(self, volume: Volume, export: ExportRecord) -> TargetSpec:
        pool = self.pools[volume.backend]
        return TargetSpec(
            volume_id=volume.id,
            target_iqn=export.target_iqn,
            device_path=pool.backend.device_path(volume.id),
            wwn=volume.wwn,
            serial=volume.serial,
            readonly=export.access_mode is AccessMode.READ_ONLY,
            chap=export.chap,
            mutual_chap=export.mutual_chap,
        )

    # -- volumes

    def create_volume(self, spec: CreateVolumeSpec) -> Volume:
        with self.stats.measure("create_volume"):
            validate.name(spec.name)
            validate.size(spec.size_bytes, allow_zero=not spec.source.is_empty())
            validate.labels(spec.labels)
            pool = self._pool(spec.backend or self.default_backend)
            with self.locks.hold(f"name:{spec.name}", f"volume name {spec.name}"):
                existing = self.catalog.volume_by_name(spec.name)
                if existing is not None:
                    return self._same_volume(existing, spec, pool)
                return self._create_volume(spec, pool)

    def _same_volume(self, v: Volume, spec: CreateVolumeSpec, pool: Pool) -> Volume:
        same = (
            v.backend == pool.backend.name
            and v.multiattach == spec.multiattach
            and dict(v.labels) == dict(spec.labels)
            and v.source == spec.source
            and spec.size_bytes in ((v.size_bytes,) if spec.source.is_empty() else (0, v.size_bytes))
        )
        if not same:
            raise AlreadyExists(f"volume name {spec.name} is used by volume {v.id} with other parameters")
        return self._with_attachments(v)

    def _create_volume(self, spec: CreateVolumeSpec, pool: Pool) -> Volume:
        size = spec.size_bytes
        image: ImageInfo | None = None
        src = spec.source
        if src.snapshot_id:
            snap = self.catalog.get_snapshot(src.snapshot_id)
            if snap is None:
                raise NotFound(f"source snapshot {src.snapshot_id} does not exist")
            if snap.state is not SnapshotState.AVAILABLE:
                raise FailedPrecondition(f"source snapshot {snap.id} is {snap.state.value}, not available")
            if snap.backend != pool.backend.name:
                raise InvalidArgument(
                    "backend", f"the snapshot is on backend {snap.backend}; create the volume there"
                )
            size = self._source_size(size, snap.size_bytes)
        elif src.volume_id:
            source = self.catalog.get_volume(src.volume_id)
            if source is None:
                raise NotFound(f"source volume {src.volume_id} does not exist")
            if source.state in (VolumeState.CREATING, VolumeState.ERROR, VolumeState.DELETING):
                raise FailedPrecondition(f"source volume {source.id} is {source.state.value}")
            if source.backend != pool.backend.name:
                raise InvalidArgument(
                    "backend", f"the source volume is on backend {source.backend}; clone it there"
                )
            size = self._source_size(size, source.size_bytes)
        elif src.image is not None:
            image = pool.backend.inspect_image(src.image)
            size = self._source_size(size, -(-image.virtual_size // MIB) * MIB)
        self._check_space(pool, size)

        now = self._now()
        vid = self.new_id()
        volume = Volume(
            id=vid,
            name=spec.name,
            size_bytes=size,
            state=VolumeState.CREATING,
            backend=pool.backend.name,
            wwn=identity.wwn_for(vid, self.naa_oui),
            serial=identity.serial_for(vid),
            create_time=now,
            update_time=now,
            multiattach=spec.multiattach,
            labels=dict(spec.labels),
            source=src,
            progress=Progress(0, size if not src.is_empty() else 0),
        )
        with contextlib.ExitStack() as undo:
            try:
                self.catalog.insert_volume(volume)
            except Conflict:
                raise AlreadyExists(f"volume name {spec.name} is taken") from None
            undo.callback(self.catalog.delete_volume, vid)
            if src.is_empty():
                pool.backend.create(vid, size)
                undo.pop_all()
                volume = self._save(replace(volume, state=VolumeState.AVAILABLE))
                log.info("volume %s (%s) created: %d bytes on %s", vid, spec.name, size, pool.backend.name)
                return volume
            self.events.changed(vid)
            self.jobs.submit(self._fill, volume, pool, image)
            undo.pop_all()
        log.info("volume %s (%s) creating from %s", vid, spec.name, src)
        return volume

    @staticmethod
    def _source_size(asked: int, source_size: int) -> int:
        if asked == 0:
            return source_size
        if asked < source_size:
            raise InvalidArgument(
                "size_bytes", f"{asked} is smaller than the source ({source_size}); use 0 or more"
            )
        return asked

    def _fill(self, volume: Volume, pool: Pool, image: ImageInfo | None) -> None:
        """Copies the source into a CREATING volume (a job); ends AVAILABLE, or ERROR with no file."""
        src = volume.source
        with self.stats.measure("copy_volume"):
            try:
                if src.snapshot_id:
                    pool.backend.create_from_snapshot(src.snapshot_id, volume.id, volume.size_bytes)
                elif src.volume_id:
                    pool.backend.clone(src.volume_id, volume.id, volume.size_bytes)
                else:
                    assert src.image is not None
                    assert image is not None
                    image_source = src.image

                    def progress(done: int, total: int) -> None:
                        current = self.catalog.get_volume(volume.id)
                        if current is not None and current.state is VolumeState.CREATING:
                            self._save(replace(current, progress=Progress(done, total)))

                    pool.backend.create_from_image(
                        image_source, image, volume.id, volume.size_bytes, progress
                    )
            except BaseException as exc:
                reason = (
                    exc.message if isinstance(exc, BlockwireError) else "internal error; see the server log"
                )
                if not isinstance(exc, BlockwireError):
                    log.error("copy into volume %s failed", volume.id, exc_info=exc)
                with contextlib.suppress(Exception):
                    pool.backend.delete(volume.id)
                current = self.catalog.get_volume(volume.id) or volume
                self._save(replace(current, state=VolumeState.ERROR, error_message=reason))
                log.warning("volume %s: copy failed: %s", volume.id, reason)
                raise
            current = self.catalog.get_volume(volume.id) or volume
            total = current.progress.total_bytes or volume.size_bytes
            self._save(replace(current, state=VolumeState.AVAILABLE, progress=Progress(total, total)))
            log.info("volume %s filled from %s", volume.id, src)

    def get_volume(self, volume_id: str) -> Volume:
        with self.stats.measure("get_volume"):
            return self._with_attachments(self._volume(volume_id))

    def list_volumes(self, page_size: int, page_token: str, labels: Mapping[str, str]) -> Page[Volume]:
        limit = validate.page_size(page_size)
        after = paging.decode(page_token)
        items = self.catalog.list_volumes(after=after, limit=limit + 1, labels=labels)
        return self._page([self._with_attachments(v) for v in items], limit)

    def _page(self, items: Sequence[L], limit: int) -> Page[L]:
        """`limit` items and the token after the last one, if there are more. The RPC layer may cut a
        page shorter still, by encoded size (`storagesvc.rpc.servicer.bounded`)."""
        if len(items) <= limit:
            return Page(tuple(items))
        return Page(tuple(items[:limit]), paging.after(items[limit - 1]))

    def watch_volume(
        self, volume_id: str, *, active: Callable[[], bool] = lambda: True, interval: float = 1.0
    ) -> Iterator[Volume]:
        """Yields the volume now and after each change, until it is settled (or gone, or the caller is
        no longer `active`; checked every `interval` seconds)."""
        seen = self.events.version(volume_id)
        volume = self.get_volume(volume_id)
        yield volume
        while volume.state not in SETTLED_VOLUME_STATES and active():
            now = self.events.wait(volume_id, seen, interval)
            if now == seen:
                continue
            seen = now
            current = self.catalog.get_volume(volume_id)
            if current is None:
                return
            volume = self._with_attachments(current)
            yield volume

    def delete_volume(self, volume_id: str) -> None:
        with self.stats.measure("delete_volume"):
            validate.object_id(volume_id, "volume_id")
            with self.locks.hold(volume_id, f"volume {volume_id}"):
                v = self.catalog.get_volume(volume_id)
                if v is None:
                    return
                atts = self.catalog.list_attachments(volume_id=volume_id, after=None, limit=1)
                if atts:
                    raise FailedPrecondition(f"volume {volume_id} has attachments; delete them first")
                if v.state is VolumeState.CREATING:
                    raise FailedPrecondition(f"volume {volume_id} is still being created; wait (WatchVolume)")
                pool = self.pools.get(v.backend)
                if (
                    pool is not None
                    and pool.backend.snapshots_depend_on_volume
                    and self.catalog.list_snapshots(volume_id=volume_id, after=None, limit=1)
                ):
                    raise FailedPrecondition(
                        f"volume {volume_id} has snapshots, which depend on it on backend {v.backend}"
                    )
                if any(
                    c.state is VolumeState.CREATING for c in self.catalog.volumes_from(volume_id=volume_id)
                ):
                    raise FailedPrecondition(f"a clone of volume {volume_id} is being copied; wait for it")
                v = self._save(replace(v, state=VolumeState.DELETING))
                if pool is not None:
                    pool.backend.delete(volume_id)
                self.catalog.delete_volume(volume_id)
                self.events.changed(volume_id)
                log.info("volume %s (%s) deleted", volume_id, v.name)

    def extend_volume(self, volume_id: str, new_size: int) -> Volume:
        with self.stats.measure("extend_volume"):
            validate.size(new_size, "new_size_bytes")
            with self.locks.hold(volume_id, f"volume {volume_id}"):
                v = self._volume(volume_id)
                if new_size == v.size_bytes:
                    return self._with_attachments(v)
                if new_size < v.size_bytes:
                    raise FailedPrecondition(f"volume {volume_id} is {v.size_bytes} bytes; volumes only grow")
                if v.state not in ATTACHABLE:
                    raise FailedPrecondition(f"volume {volume_id} is {v.state.value}")
                pool = self.pools[v.backend]
                self._check_space(pool, new_size - v.size_bytes)
                before = v.state
                v = self._save(replace(v, state=VolumeState.EXTENDING))
                try:
                    pool.backend.extend(volume_id, new_size)
                    grown = replace(v, size_bytes=new_size)
                    if v.export is not None:
                        pool.exporter.resize(self._spec(grown, v.export))
                except BaseException:
                    self._save(replace(v, state=before))
                    raise
                log.info("volume %s extended to %d bytes", volume_id, new_size)
                return self._with_attachments(self._save(replace(grown, state=before)))

    # -- snapshots

    def create_snapshot(self, volume_id: str, name: str, labels: Mapping[str, str]) -> Snapshot:
        with self.stats.measure("create_snapshot"):
            validate.object_id(volume_id, "volume_id")
            validate.name(name)
            validate.labels(labels)
            with self.locks.hold(f"name:{name}", f"snapshot name {name}"):
                existing = self.catalog.snapshot_by_name(name)
                if existing is not None:
                    if existing.volume_id != volume_id or dict(existing.labels) != dict(labels):
                        raise AlreadyExists(
                            f"snapshot name {name} is used by snapshot {existing.id} "
                            "(of another volume, or with other labels)"
                        )
                    return existing
                with self.locks.hold(volume_id, f"volume {volume_id}"):
                    v = self._volume(volume_id)
                    if v.state not in ATTACHABLE:
                        raise FailedPrecondition(f"volume {volume_id} is {v.state.value}")
                    pool = self.pools[v.backend]
                    self._check_space(pool, v.size_bytes)
                    snap = Snapshot(
                        id=self.new_id(),
                        name=name,
                        volume_id=volume_id,
                        size_bytes=v.size_bytes,
                        state=SnapshotState.CREATING,
                        backend=v.backend,
                        create_time=self._now(),
                        labels=dict(labels),
                    )
                    with contextlib.ExitStack() as undo:
                        try:
                            self.catalog.insert_snapshot(snap)
                        except Conflict:
                            raise AlreadyExists(f"snapshot name {name} is taken") from None
                        undo.callback(self.catalog.delete_snapshot, snap.id)
                        pool.backend.snapshot(volume_id, snap.id)
                        undo.pop_all()
                    snap = replace(snap, state=SnapshotState.AVAILABLE)
                    self.catalog.update_snapshot(snap)
                    log.info("snapshot %s (%s) of volume %s taken", snap.id, name, volume_id)
                    return snap

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        validate.object_id(snapshot_id, "snapshot_id")
        s = self.catalog.get_snapshot(snapshot_id)
        if s is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return s

    def list_snapshots(self, volume_id: str, page_size: int, page_token: str) -> Page[Snapshot]:
        limit = validate.page_size(page_size)
        after = paging.decode(page_token)
        return self._page(
            self.catalog.list_snapshots(volume_id=volume_id, after=after, limit=limit + 1), limit
        )

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self.stats.measure("delete_snapshot"):
            validate.object_id(snapshot_id, "snapshot_id")
            s = self.catalog.get_snapshot(snapshot_id)
            if s is None:
                return
            with self.locks.hold(f"name:{s.name}", f"snapshot {snapshot_id}"):
                if any(
                    v.state is VolumeState.CREATING
                    for v in self.catalog.volumes_from(snapshot_id=snapshot_id)
                ):
                    raise FailedPrecondition(
                        f"a volume is being copied from snapshot {snapshot_id}; wait for it"
                    )
                self.catalog.update_snapshot(replace(s, state=SnapshotState.DELETING))
                pool = self.pools.get(s.backend)
                if pool is not None:
                    pool.backend.delete_snapshot(snapshot_id)
                self.catalog.delete_snapshot(snapshot_id)
                log.info("snapshot %s (%s) deleted", snapshot_id, s.name)

    # -- attachments

    def create_attachment(
        self, volume_id: str, connector: Connector, mode: AccessMode, domain: str = ""
    ) -> Attachment:
        with self.stats.measure("create_attachment"):
            validate.object_id(volume_id, "volume_id")
            validate.connector(connector, transport=Transport.ISCSI)
            with self.locks.hold(volume_id, f"volume {volume_id}"):
                return self._create_attachment(self._volume(volume_id), connector, mode, domain)

    def _create_attachment(
        self, v: Volume, connector: Connector, mode: AccessMode, domain: str
    ) -> Attachment:
        if v.state not in ATTACHABLE:
            raise FailedPrecondition(f"volume {v.id} is {v.state.value}; it can be attached when available")
        atts = self.catalog.list_attachments(volume_id=v.id, after=None, limit=10_000)
        # An attachment is one consumer: (host, domain). A repeat of it returns it; another consumer,
        # on this host or another, is a second attachment, which only a multiattach volume may have
        # (a repeat from the same host must never stand in for another domain's attachment: its
        # deletion would unexport the volume under the first domain).
        for a in atts:
            if a.connector.host != connector.host or a.domain != domain:
                continue
            if (
                a.connector.initiator_iqn == connector.initiator_iqn
                and a.access_mode is mode
                and a.state in (AttachmentState.ATTACHING, AttachmentState.ATTACHED)
            ):
                return a
            raise FailedPrecondition(
                f"volume {v.id} is already attached to {_consumer(a.connector.host, a.domain)} ({a.id}, "
                f"{a.state.value}, {a.access_mode.value}, {a.connector.initiator_iqn}); delete that "
                "attachment first"
            )
        if atts and not v.multiattach:
            raise FailedPrecondition(
                f"volume {v.id} is attached to {_consumer(atts[0].connector.host, atts[0].domain)} and was "
                "not created multiattach; detach it there first"
            )
        if atts and v.export is not None and v.export.access_mode is not mode:
            raise FailedPrecondition(
                f"volume {v.id} is exported {v.export.access_mode.value}; every attachment must use that mode"
            )
        pool = self.pools[v.backend]
        exporter = pool.exporter
        first = not atts or v.export is None
        export = v.export if not first else self._new_export(v, mode, exporter.lun)
        assert export is not None
        now = self._now()
        att = Attachment(
            id=self.new_id(),
            volume_id=v.id,
            connector=connector,
            access_mode=mode,
            state=AttachmentState.RESERVED,
            create_time=now,
            update_time=now,
            domain=domain,
        )
        before = v
        with contextlib.ExitStack() as undo:
            # record first ...
            self.catalog.insert_attachment(att)
            undo.callback(self.catalog.delete_attachment, att.id)
            reserved = self._save(replace(v, state=VolumeState.RESERVED if first else v.state, export=export))
            undo.callback(self._save, before)
            failpoints.hit(FP_EXPORT_AFTER_CATALOG)
            # ... then act, with compensations
            if first:
                undo.callback(exporter.remove_target, export.target_iqn)
                exporter.ensure_target(self._spec(reserved, export))
                failpoints.hit(FP_EXPORT_AFTER_TARGET)
            undo.callback(
                self._deny_unless_shared, v.id, att.id, export.target_iqn, connector.initiator_iqn, exporter
            )
            exporter.allow(self._spec(reserved, export), connector.initiator_iqn)
            failpoints.hit(FP_EXPORT_AFTER_ACL)
            info = ConnectionInfo(
                transport=IscsiConnection(
                    paths=tuple(IscsiPath(p, export.target_iqn, export.lun) for p in exporter.portals),
                    chap=export.chap,
                    mutual_chap=export.mutual_chap,
                    initiator_iqn=connector.initiator_iqn,
                ),
                volume_id=v.id,
                attachment_id=att.id,
                wwn=v.wwn,
                serial=v.serial,
                size_bytes=v.size_bytes,
                access_mode=mode,
                discard=False,
                logical_block_size=512,
                physical_block_size=512,
                multiattach=v.multiattach,
            )
            try:  # what storage announces passes the checks every agent runs on it (a bug if not)
                validate.validate_connection_info(info)
            except InvalidArgument as exc:
                raise Internal(
                    f"the connection info of volume {v.id} fails its own checks ({exc.message}); "
                    "nothing was exported"
                ) from exc
            att = replace(att, state=AttachmentState.ATTACHING, connection_info=info, update_time=self._now())
            self.catalog.update_attachment(att)
            state = VolumeState.ATTACHING if reserved.state is VolumeState.RESERVED else reserved.state
            self._save(replace(reserved, state=state))
            undo.pop_all()
        failpoints.hit(FP_EXPORT_AFTER_ATTACHING)
        log.info(
            "volume %s exported to host %s (%s) as attachment %s",
            v.id,
            connector.host,
            connector.initiator_iqn,
            att.id,
        )
        return att

    def _new_export(self, v: Volume, mode: AccessMode, lun: int) -> ExportRecord:
        chap = Chap(f"in-{v.id[:24]}", self.new_secret())
        mutual = Chap(f"out-{v.id[:24]}", self.new_secret()) if self.mutual_chap else None
        return ExportRecord(
            target_iqn=identity.target_iqn(self.iqn_prefix, v.id),
            lun=lun,
            chap=chap,
            mutual_chap=mutual,
            access_mode=mode,
        )

    def _deny_unless_shared(
        self, volume_id: str, attachment_id: str, target_iqn: str, initiator_iqn: str, exporter: Exporter
    ) -> None:
        """Removes an initiator from the ACL unless another attachment of the volume uses it too."""
        others = [
            a
            for a in self.catalog.list_attachments(volume_id=volume_id, after=None, limit=10_000)
            if a.id != attachment_id and a.connector.initiator_iqn == initiator_iqn
        ]
        if not others:
            exporter.deny(target_iqn, initiator_iqn)

    def complete_attachment(
        self, attachment_id: str, target_dev: str = "", host_device: str = ""
    ) -> Attachment:
        with self.stats.measure("complete_attachment"):
            a = self.get_attachment(attachment_id)
            with self.locks.hold(a.volume_id, f"volume {a.volume_id}"):
                a = self.get_attachment(attachment_id)
                if a.state is AttachmentState.ATTACHED:
                    return a
                if a.state is not AttachmentState.ATTACHING:
                    raise FailedPrecondition(
                        f"attachment {attachment_id} is {a.state.value}; it cannot complete"
                    )
                a = replace(
                    a,
                    state=AttachmentState.ATTACHED,
                    target_dev=target_dev,
                    host_device=host_device,
                    update_time=self._now(),
                )
                self.catalog.update_attachment(a)
                v = self.catalog.get_volume(a.volume_id)
                if v is not None:
                    self._save(replace(v, state=VolumeState.IN_USE))
                return a

    def delete_attachment(self, attachment_id: str) -> None:
        with self.stats.measure("delete_attachment"):
            validate.object_id(attachment_id, "attachment_id")
            a = self.catalog.get_attachment(attachment_id)
            if a is None:
                return
            with self.locks.hold(a.volume_id, f"volume {a.volume_id}"):
                self._delete_attachment(attachment_id)

    def _delete_attachment(self, attachment_id: str) -> None:
        a = self.catalog.get_attachment(attachment_id)
        if a is None:
            return
        v = self.catalog.get_volume(a.volume_id)
        others = [
            x
            for x in self.catalog.list_attachments(volume_id=a.volume_id, after=None, limit=10_000)
            if x.id != a.id
        ]
        a = replace(a, state=AttachmentState.DETACHING, update_time=self._now())
        self.catalog.update_attachment(a)
        if v is not None and not others:
            v = self._save(replace(v, state=VolumeState.DETACHING))
        failpoints.hit(FP_UNEXPORT_AFTER_DETACHING)
        if v is not None and v.export is not None:
            exporter = self.pools[v.backend].exporter
            if others:
                self._deny_unless_shared(v.id, a.id, v.export.target_iqn, a.connector.initiator_iqn, exporter)
            else:
                exporter.remove_target(v.export.target_iqn)
        failpoints.hit(FP_UNEXPORT_AFTER_TARGET_REMOVED)
        self.catalog.delete_attachment(a.id)
        if v is not None:
            if others:
                state = (
                    VolumeState.IN_USE
                    if any(x.state is AttachmentState.ATTACHED for x in others)
                    else VolumeState.ATTACHING
                )
                self._save(replace(v, state=state))
            else:
                self._save(replace(v, state=VolumeState.AVAILABLE, export=None))
        log.info("attachment %s of volume %s deleted", a.id, a.volume_id)

    def get_attachment(self, attachment_id: str) -> Attachment:
        validate.object_id(attachment_id, "attachment_id")
        a = self.catalog.get_attachment(attachment_id)
        if a is None:
            raise NotFound(f"attachment {attachment_id} does not exist")
        return a

    def list_attachments(
        self, volume_id: str, host: str, page_size: int, page_token: str
    ) -> Page[Attachment]:
        limit = validate.page_size(page_size)
        after = paging.decode(page_token)
        items = self.catalog.list_attachments(volume_id=volume_id, host=host, after=after, limit=limit + 1)
        return self._page(items, limit)

    # -- capacity and statistics

    def capacity(self, backend: str = "") -> list[Capacity]:
        if backend and backend not in self.pools:
            raise NotFound(f"backend {backend} does not exist (have: {', '.join(self.pools)})")
        out = []
        for name in [backend] if backend else list(self.pools):
            b = self.pools[name].backend
            space = b.space()
            _, _, provisioned = self.catalog.backend_counts(name)
            out.append(
                Capacity(
                    name, space.total_bytes, space.free_bytes, provisioned, b.max_volume_bytes(provisioned)
                )
            )
        return out

    def backend_stats(self) -> tuple[list[BackendStats], list[OperationStats]]:
        out = []
        exports = collections.Counter(v.backend for v in self._all_volumes() if v.export is not None)
        health: dict[int, bool] = {}
        for name, pool in self.pools.items():
            vols, snaps, _ = self.catalog.backend_counts(name)
            key = id(pool.exporter)
            if key not in health:
                health[key] = pool.exporter.healthy()
            out.append(
                BackendStats(
                    backend=name,
                    kind=pool.backend.kind,
                    exporter=pool.exporter.kind,
                    volume_count=vols,
                    snapshot_count=snaps,
                    export_count=exports[name],
                    portals=pool.exporter.portals,
                    healthy=health[key],
                )
            )
        return out, self.stats.snapshot()

    def _all_volumes(self) -> Iterator[Volume]:
        after: Cursor | None = None
        while True:
            page = self.catalog.list_volumes(after=after, limit=500)
            yield from page
            if len(page) < 500:
                return
            after = Cursor(time_key(page[-1].create_time), page[-1].id)

    # -- restart safety

    def reconcile(self) -> None:
        """Makes the target side match the catalog: after a restart of tgtd or of this service.

        * attachments caught half-way (RESERVED: export never confirmed) are undone, DETACHING ones
          finished; volumes caught CREATING lose their partial copy and become ERROR;
        * every volume with live attachments gets its target, LUN, CHAP and ACL back;
        * targets under our IQN prefix that the catalog does not know are removed, and CHAP accounts of
          ours (``in-<id>``, ``out-<id>``) that no target uses (exporters with global accounts: tgt).

        Killed in the middle of an export (failpoints above), a restart therefore rolls back every
        attachment the catalog still has RESERVED: after the catalog write, after the target (and
        its LUN, CHAP account) was made, after the ACL entry: the row, the target and the accounts go,
        the volume is available again, and the host, whose CreateAttachment failed, retries or undoes.
        Once the catalog says ATTACHING (the answer may have been lost), the export is rebuilt
        (roll forward): a repeated CreateAttachment from the host returns that same attachment. An
        attachment caught DETACHING is finished (roll forward of the delete).
        """
        with self.stats.measure("reconcile"):
            exporters: dict[int, Exporter] = {}
            for pool in self.pools.values():
                exporters.setdefault(id(pool.exporter), pool.exporter)
            for exporter in exporters.values():
                exporter.start()
            known: set[str] = set()
            for v in list(self._all_volumes()):
                with self.locks.hold(v.id, f"volume {v.id}"):
                    target = self._reconcile_volume(v)
                if target:
                    known.add(target)
            for exporter in exporters.values():
                for t in exporter.list_targets(self.iqn_prefix + ":"):
                    if t.target_iqn not in known:
                        log.warning("removing target %s: the catalog does not know it", t.target_iqn)
                        exporter.remove_target(t.target_iqn)
                if isinstance(exporter, AccountPruner):
                    for user in exporter.prune_accounts(lambda u: _CHAP_USER.fullmatch(u) is not None):
                        log.warning("removed CHAP account %s: no target uses it", user)

    def _reconcile_volume(self, v: Volume) -> str:
        pool = self.pools.get(v.backend)
        if pool is None:
            log.error(
                "volume %s is on backend %s, which is not configured; leaving it alone", v.id, v.backend
            )
            return v.export.target_iqn if v.export else ""
        if v.state is VolumeState.CREATING:
            pool.backend.delete(v.id)
            self._save(
                replace(v, state=VolumeState.ERROR, error_message="the copy was interrupted by a restart")
            )
            return ""
        if v.state is VolumeState.DELETING:
            pool.backend.delete(v.id)
            self.catalog.delete_volume(v.id)
            return ""
        atts = self.catalog.list_attachments(volume_id=v.id, after=None, limit=10_000)
        for a in atts:
            if a.state in (AttachmentState.RESERVED, AttachmentState.DETACHING, AttachmentState.ERROR):
                log.info("attachment %s was %s at restart: removing it", a.id, a.state.value)
                self._delete_attachment(a.id)
        v = self.catalog.get_volume(v.id) or v
        live = self.catalog.list_attachments(volume_id=v.id, after=None, limit=10_000)
        if not live:
            if v.export is not None:
                pool.exporter.remove_target(v.export.target_iqn)
            if v.export is not None or v.state is not VolumeState.AVAILABLE:
                state: VolumeState = VolumeState.AVAILABLE if v.state is not VolumeState.ERROR else v.state
                self._save(replace(v, state=state, export=None))
            return ""
        if v.export is None:
            log.error("volume %s has attachments but no export record; not exporting it", v.id)
            return ""
        self._restore_export(v, pool, live)
        state = (
            VolumeState.IN_USE
            if any(a.state is AttachmentState.ATTACHED for a in live)
            else VolumeState.ATTACHING
        )
        if v.state is not state:
            self._save(replace(v, state=state))
        log.info("volume %s: export %s restored for %d attachment(s)", v.id, v.export.target_iqn, len(live))
        return v.export.target_iqn

    def _restore_export(self, v: Volume, pool: Pool, live: Sequence[Attachment]) -> None:
        """Target, LUN (with the volume's identity), CHAP accounts and one ACL entry per live attachment:
        what `reconcile` and `repair_exports` rebuild. Idempotent."""
        assert v.export is not None
        spec = self._spec(v, v.export)
        pool.exporter.ensure_target(spec)
        for a in live:
            pool.exporter.allow(spec, a.connector.initiator_iqn)

    # -- export supervision

    def repair_exports(self) -> list[str]:
        """Compares each exporter's live targets with the catalog and rebuilds the exports it lost;
        returns the ids of the volumes repaired. Run by `storagesvc.supervisor.ExportSupervisor`.

        One listing per exporter (tgt: one `tgtadm --op show --mode target`); an export is lost when its
        target is gone (tgtd restarted and forgot it), an attached initiator is missing from its ACL, or
        its LUN is gone, offline, on another backing or announces another identity (wwn, serial) than
        the volume's. Only volumes the catalog has ATTACHING or IN_USE are looked at; each repair takes
        the volume's lock, reads the volume again and rebuilds it with the same code as `reconcile`
        (`_restore_export`), so a call in flight on that volume is never raced. Counted as the
        "export_repair" operation in GetBackendStats.
        """
        wanted: dict[int, list[Volume]] = {}
        exporters: dict[int, Exporter] = {}
        for v in self._all_volumes():
            pool = self.pools.get(v.backend)
            if pool is None or v.export is None or v.state not in _EXPORTED:
                continue
            exporters[id(pool.exporter)] = pool.exporter
            wanted.setdefault(id(pool.exporter), []).append(v)
        repaired: list[str] = []
        for key, volumes in wanted.items():
            exporter = exporters[key]
            try:
                live = {t.target_iqn: t for t in exporter.list_targets(self.iqn_prefix + ":")}
                lost = [(v, why) for v in volumes if (why := self._export_lost(v, live))]
                if not lost:
                    continue
                exporter.start()  # a restarted tgtd forgot its portals too
            except (BlockwireError, OSError) as exc:
                log.warning("exporter %s: checking its exports failed: %s", exporter.kind, exc)
                continue
            for v, why in lost:
                try:
                    with self.stats.measure("export_repair"), self.locks.hold(v.id, f"volume {v.id}"):
                        if self._repair_export(v.id, why):
                            repaired.append(v.id)
                except BlockwireError as exc:
                    log.error("volume %s: repairing its export failed: %s", v.id, exc.message)
        return repaired

    def _live_attachments(self, volume_id: str) -> list[Attachment]:
        return [
            a
            for a in self.catalog.list_attachments(volume_id=volume_id, after=None, limit=10_000)
            if a.state in (AttachmentState.ATTACHING, AttachmentState.ATTACHED)
        ]

    def _export_lost(self, v: Volume, live: Mapping[str, TargetState]) -> str:
        """What the target side lost of the volume's export, in words; "" when it is intact."""
        assert v.export is not None
        state = live.get(v.export.target_iqn)
        if state is None:
            return f"target {v.export.target_iqn} is gone"
        if state.lun is None:
            return f"target {v.export.target_iqn} has no LUN {v.export.lun}"
        wrong = state.lun.differs(self._spec(v, v.export))
        if wrong:
            return f"target {v.export.target_iqn}: {wrong}"
        missing = [
            a.connector.initiator_iqn
            for a in self._live_attachments(v.id)
            if a.connector.initiator_iqn not in state.initiators
        ]
        if missing:
            return f"target {v.export.target_iqn} does not admit {', '.join(missing)}"
        return ""

    def _repair_export(self, volume_id: str, why: str) -> bool:
        """Under the volume's lock: rebuilds the export if the catalog still wants it."""
        v = self.catalog.get_volume(volume_id)
        if v is None or v.export is None or v.state not in _EXPORTED:
            return False
        atts = self._live_attachments(v.id)
        if not atts:
            return False
        self._restore_export(v, self.pools[v.backend], atts)
        log.warning(
            "volume %s: export %s was lost on the target side (%s); rebuilt for %d attachment(s)",
            v.id,
            v.export.target_iqn,
            why,
            len(atts),
        )
        return True
