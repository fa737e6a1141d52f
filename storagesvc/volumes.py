"""Volumes: create (empty, or a copy of a snapshot, a volume or an image, filled by a job), get, list,
watch, delete, extend. Record first, act second, undo on failure; repeats return what exists."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace

from blockwire import validate
from blockwire.errors import (
    AlreadyExists,
    BlockwireError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from blockwire.model import Encryption
from blockwire.secret import Secret
from storagesvc import identity, paging, placement, scheduler, voltypes
from storagesvc.backends.base import DirectBackend, ImageInfo
from storagesvc.catalog import Conflict
from storagesvc.context import Context, Pool
from storagesvc.encryption import HEADER_BYTES, key_size
from storagesvc.model import (
    ATTACHABLE,
    MIB,
    SETTLED_VOLUME_STATES,
    CreateVolumeSpec,
    Page,
    Progress,
    Snapshot,
    SnapshotState,
    Volume,
    VolumeSource,
    VolumeState,
)

log = logging.getLogger(__name__)


class Volumes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def create(self, spec: CreateVolumeSpec) -> Volume:
        ctx = self.ctx
        with ctx.stats.measure("create_volume"):
            validate.name(spec.name)
            validate.size(spec.size_bytes, allow_zero=not spec.source.is_empty())
            validate.labels(spec.labels)
            if spec.backend:
                ctx.pool(spec.backend)
            spec = self._typed(spec)
            with ctx.locks.hold(f"name:{spec.name}", f"volume name {spec.name}"):
                existing = ctx.catalog.volume_by_name(spec.name)
                if existing is not None:
                    return self._same_volume(existing, spec)
                attempts: list[tuple[str, Exception]] = []
                pools = self._placements(spec)
                for pool in pools[: max(1, ctx.scheduler.max_attempts)]:
                    try:
                        return self._create(spec, pool)
                    except RESCHEDULED as exc:
                        if len(pools) == 1:
                            raise
                        attempts.append((pool.backend.name, exc))
                        log.warning(
                            "volume %s: create on backend %s failed (%s); trying the next backend",
                            spec.name,
                            pool.backend.name,
                            exc.message if isinstance(exc, BlockwireError) else type(exc).__name__,
                        )
                raise _attempts_failed(spec.name, attempts)

    def _typed(self, spec: CreateVolumeSpec) -> CreateVolumeSpec:
        """The request with its volume type applied (the named one or the default): the type's extra
        specs place it, and a type that says multiattach or encryption makes the volume so (encryption:
        a new empty volume; a copy is encrypted exactly when its source is)."""
        vtype = voltypes.VolumeTypes(self.ctx).for_create(spec.volume_type)
        if vtype is None:
            return replace(spec, extra_specs={})
        return replace(
            spec,
            volume_type=vtype.name,
            extra_specs=dict(vtype.extra_specs),
            multiattach=spec.multiattach or voltypes.type_says(vtype, "multiattach"),
            encrypted=spec.encrypted or (voltypes.type_says(vtype, "encryption") and spec.source.is_empty()),
        )

    def _placements(self, spec: CreateVolumeSpec) -> list[Pool]:
        """The pools to try, best first: the named backend, the source's backend for a copy, the
        configured default backend, the only one; else the scheduler's ranking (storagesvc.scheduler)."""
        ctx = self.ctx
        specs = spec.extra_specs
        src = spec.source
        backend = spec.backend
        if not backend and (src.snapshot_id or src.volume_id):
            backend = self._source_backend(src)
        if not backend and not specs:
            if ctx.scheduler.default_backend:
                backend = ctx.scheduler.default_backend
            elif len(ctx.pools) == 1:
                backend = next(iter(ctx.pools))
        if backend and not specs:
            return [ctx.pool(backend)]
        request = scheduler.PlacementRequest(
            size_bytes=self._placement_size(spec), extra_specs=specs, backend=backend
        )
        ranked = scheduler.rank(placement.local_backends(ctx), request, weigher=ctx.scheduler.weigher)
        return [ctx.pools[b.backend] for b in ranked]

    def _source_backend(self, src: VolumeSource) -> str:
        """A copy is made where its source is ("" when the source is not found: _source says so)."""
        found: Snapshot | Volume | None = (
            self.ctx.catalog.get_snapshot(src.snapshot_id)
            if src.snapshot_id
            else self.ctx.catalog.get_volume(src.volume_id)
        )
        return found.backend if found is not None else ""

    def _placement_size(self, spec: CreateVolumeSpec) -> int:
        return spec.size_bytes + (HEADER_BYTES if spec.encrypted else 0)

    def _same_volume(self, v: Volume, spec: CreateVolumeSpec) -> Volume:
        src_empty = spec.source.is_empty()
        key_bits = spec.key_size_bits or 512
        same = (
            (not spec.backend or v.backend == spec.backend)
            and v.volume_type == spec.volume_type
            and v.multiattach == spec.multiattach
            and dict(v.labels) == dict(spec.labels)
            and v.source == spec.source
            and ((v.encryption is not None) if spec.encrypted else (v.encryption is None or not src_empty))
            and (not (spec.encrypted and src_empty) or getattr(v.encryption, "key_size_bits", 0) == key_bits)
            and spec.size_bytes in ((v.size_bytes,) if spec.source.is_empty() else (0, v.size_bytes))
        )
        if not same:
            raise AlreadyExists(f"volume name {spec.name} is used by volume {v.id} with other parameters")
        return self.ctx.with_attachments(v)

    def _create(self, spec: CreateVolumeSpec, pool: Pool) -> Volume:
        ctx = self.ctx
        src = spec.source
        size, image, encryption = self._source(spec, pool)
        ctx.check_space(pool, size + (HEADER_BYTES if encryption or spec.encrypted else 0))
        encryption, passphrase = self._new_key(spec, encryption)

        now = ctx.now()
        vid = ctx.new_id()
        volume = Volume(
            id=vid,
            name=spec.name,
            size_bytes=size,
            state=VolumeState.CREATING,
            backend=pool.backend.name,
            wwn=identity.wwn_for(vid, ctx.naa_oui),
            serial=identity.serial_for(vid),
            create_time=now,
            update_time=now,
            multiattach=spec.multiattach,
            labels=dict(spec.labels),
            source=src,
            progress=Progress(0, size if not src.is_empty() else 0),
            encryption=encryption,
            volume_type=spec.volume_type,
        )
        with contextlib.ExitStack() as undo:
            if passphrase is not None and encryption is not None:
                undo.callback(ctx.need_crypt().keys.delete_key, encryption.key_ref)
            try:
                ctx.catalog.insert_volume(volume)
            except Conflict:
                # another storage process sharing the catalog took the name meanwhile: a repeat of its
                # call (same parameters) gets that volume, anything else ALREADY_EXISTS (undo runs)
                existing = ctx.catalog.volume_by_name(spec.name)
                if existing is None:
                    raise AlreadyExists(f"volume name {spec.name} is taken") from None
                return self._same_volume(existing, spec)
            undo.callback(ctx.catalog.delete_volume, vid)
            if spec.volume_type and ctx.catalog.volume_type_by_name(spec.volume_type) is None:
                # DeleteVolumeType ran meanwhile (maybe on another node): it counts the volumes of the
                # type after removing it, we look for the type after recording the volume, so one of
                # the two always sees the other and no volume is left with a type that is gone
                raise FailedPrecondition(
                    f"volume type {spec.volume_type} was deleted; create it or name another"
                )
            if src.is_empty():
                if encryption is not None and passphrase is not None:
                    pool.backend.create(vid, size + encryption.header_bytes)
                    undo.callback(pool.backend.delete, vid)
                    if isinstance(pool.backend, DirectBackend):  # rbd: written through librbd
                        header = ctx.need_crypt().header(encryption, passphrase)
                        pool.backend.write_header(vid, header)
                    else:
                        ctx.need_crypt().format(pool.backend.device_path(vid), encryption, passphrase)
                else:
                    pool.backend.create(vid, size)
                undo.pop_all()
                volume = ctx.save(replace(volume, state=VolumeState.AVAILABLE))
                log.info("volume %s (%s) created: %d bytes on %s", vid, spec.name, size, pool.backend.name)
                return volume
            ctx.events.changed(vid)
            ctx.jobs.submit(self._fill, volume, pool, image)
            undo.pop_all()
        log.info("volume %s (%s) creating from %s", vid, spec.name, src)
        return volume

    def _source(self, spec: CreateVolumeSpec, pool: Pool) -> tuple[int, ImageInfo | None, Encryption | None]:
        """The size of the new volume, the image to copy, and the encryption a copy inherits: a copy of an
        encrypted source is encrypted with its key (the LUKS header is copied with the bytes)."""
        ctx = self.ctx
        size = spec.size_bytes
        src = spec.source
        if src.snapshot_id:
            snap = ctx.catalog.get_snapshot(src.snapshot_id)
            if snap is None:
                raise NotFound(f"source snapshot {src.snapshot_id} does not exist")
            if snap.state is not SnapshotState.AVAILABLE:
                raise FailedPrecondition(f"source snapshot {snap.id} is {snap.state.value}, not available")
            if snap.backend != pool.backend.name:
                raise InvalidArgument(
                    "backend", f"the snapshot is on backend {snap.backend}; create the volume there"
                )
            return _source_size(size, snap.size_bytes), None, snap.encryption
        if src.volume_id:
            source = ctx.catalog.get_volume(src.volume_id)
            if source is None:
                raise NotFound(f"source volume {src.volume_id} does not exist")
            if source.state in (VolumeState.CREATING, VolumeState.ERROR, VolumeState.DELETING):
                raise FailedPrecondition(f"source volume {source.id} is {source.state.value}")
            if source.backend != pool.backend.name:
                raise InvalidArgument(
                    "backend", f"the source volume is on backend {source.backend}; clone it there"
                )
            return _source_size(size, source.size_bytes), None, source.encryption
        if src.image is not None:
            if spec.encrypted:
                raise InvalidArgument("encrypted", "an image cannot be copied into an encrypted volume yet")
            image = pool.backend.inspect_image(src.image)
            return _source_size(size, -(-image.virtual_size // MIB) * MIB), image, None
        return size, None, None

    def _new_key(
        self, spec: CreateVolumeSpec, copied: Encryption | None
    ) -> tuple[Encryption | None, Secret | None]:
        """The encryption of a new volume: its source's (a copy), or a fresh key when asked for."""
        if copied is not None or not spec.encrypted:
            return copied, None
        if not spec.source.is_empty():
            raise InvalidArgument(
                "encrypted", "a copy of an unencrypted snapshot or volume cannot be encrypted"
            )
        return self.ctx.need_crypt().new_key(key_size(spec.key_size_bits))

    def _fill(self, volume: Volume, pool: Pool, image: ImageInfo | None) -> None:
        """Copies the source into a CREATING volume (a job); ends AVAILABLE, or ERROR with no file."""
        ctx = self.ctx
        src = volume.source
        with ctx.stats.measure("copy_volume"):
            backing = volume.size_bytes + (volume.encryption.header_bytes if volume.encryption else 0)
            try:
                if src.snapshot_id:
                    pool.backend.create_from_snapshot(src.snapshot_id, volume.id, backing)
                elif src.volume_id:
                    pool.backend.clone(src.volume_id, volume.id, backing)
                else:
                    assert src.image is not None
                    assert image is not None
                    image_source = src.image

                    def progress(done: int, total: int) -> None:
                        current = ctx.catalog.get_volume(volume.id)
                        if current is not None and current.state is VolumeState.CREATING:
                            ctx.save(replace(current, progress=Progress(done, total)))

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
                current = ctx.catalog.get_volume(volume.id) or volume
                ctx.save(replace(current, state=VolumeState.ERROR, error_message=reason))
                log.warning("volume %s: copy failed: %s", volume.id, reason)
                raise
            current = ctx.catalog.get_volume(volume.id) or volume
            total = current.progress.total_bytes or volume.size_bytes
            ctx.save(replace(current, state=VolumeState.AVAILABLE, progress=Progress(total, total)))
            log.info("volume %s filled from %s", volume.id, src)

    def get(self, volume_id: str) -> Volume:
        with self.ctx.stats.measure("get_volume"):
            return self.ctx.with_attachments(self.ctx.volume(volume_id))

    def page(self, page_size: int, page_token: str, labels: Mapping[str, str]) -> Page[Volume]:
        ctx = self.ctx
        return paging.listing(
            page_size,
            page_token,
            lambda after, n: [
                ctx.with_attachments(v) for v in ctx.catalog.list_volumes(after=after, limit=n, labels=labels)
            ],
        )

    def watch(
        self, volume_id: str, *, active: Callable[[], bool] = lambda: True, interval: float = 1.0
    ) -> Iterator[Volume]:
        """Yields the volume now and after each change, until it is settled (or gone, or the caller is
        no longer `active`; checked every `interval` seconds)."""
        ctx = self.ctx
        seen = ctx.events.version(volume_id)
        volume = self.get(volume_id)
        yield volume
        while volume.state not in SETTLED_VOLUME_STATES and active():
            now = ctx.events.wait(volume_id, seen, interval)
            if now == seen:
                continue
            seen = now
            current = ctx.catalog.get_volume(volume_id)
            if current is None:
                return
            volume = ctx.with_attachments(current)
            yield volume

    def delete(self, volume_id: str) -> None:
        ctx = self.ctx
        with ctx.stats.measure("delete_volume"):
            validate.object_id(volume_id, "volume_id")
            with ctx.hold_volume(volume_id):
                v = ctx.catalog.get_volume(volume_id)
                if v is None:
                    return
                atts = ctx.catalog.list_attachments(volume_id=volume_id, after=None, limit=1)
                if atts:
                    where = f"domain {atts[0].domain!r} on " if atts[0].domain else ""
                    raise FailedPrecondition(
                        f"volume {volume_id} is attached ({where}host {atts[0].connector.host}); detach it "
                        "first (blockwire detach), or delete its attachments if no host uses them"
                    )
                if v.state is VolumeState.CREATING:
                    raise FailedPrecondition(f"volume {volume_id} is still being created; wait (WatchVolume)")
                pool = ctx.pools.get(v.backend)
                if (
                    pool is not None
                    and pool.backend.snapshots_depend_on_volume
                    and ctx.catalog.list_snapshots(volume_id=volume_id, after=None, limit=1)
                ):
                    raise FailedPrecondition(
                        f"volume {volume_id} has snapshots, which depend on it on backend {v.backend}"
                    )
                if any(
                    c.state is VolumeState.CREATING for c in ctx.catalog.volumes_from(volume_id=volume_id)
                ):
                    raise FailedPrecondition(f"a clone of volume {volume_id} is being copied; wait for it")
                if v.encryption is not None and not ctx.key_in_use(v.encryption.key_ref, but_volume=v.id):
                    # first: a key manager that is down refuses the delete before anything changed
                    ctx.need_crypt().keys.delete_key(v.encryption.key_ref)
                v = ctx.save(replace(v, state=VolumeState.DELETING))
                if pool is not None:
                    pool.backend.delete(volume_id)
                ctx.catalog.delete_volume(volume_id)
                ctx.events.changed(volume_id)
                log.info("volume %s (%s) deleted", volume_id, v.name)

    def extend(self, volume_id: str, new_size: int) -> Volume:
        ctx = self.ctx
        with ctx.stats.measure("extend_volume"):
            validate.size(new_size, "new_size_bytes")
            with ctx.hold_volume(volume_id):
                v = ctx.volume(volume_id)
                if new_size == v.size_bytes:
                    return ctx.with_attachments(v)
                if new_size < v.size_bytes:
                    raise FailedPrecondition(f"volume {volume_id} is {v.size_bytes} bytes; volumes only grow")
                if v.state not in ATTACHABLE:
                    raise FailedPrecondition(f"volume {volume_id} is {v.state.value}")
                pool = ctx.pools[v.backend]
                ctx.check_space(pool, new_size - v.size_bytes)
                before = v.state
                v = ctx.save(replace(v, state=VolumeState.EXTENDING))
                try:
                    header = v.encryption.header_bytes if v.encryption is not None else 0
                    pool.backend.extend(volume_id, new_size + header)
                    grown = replace(v, size_bytes=new_size)
                    if v.export is not None:
                        pool.target_exporter().resize(ctx.spec(grown, v.export))
                except BaseException:
                    ctx.save(replace(v, state=before))
                    raise
                log.info("volume %s extended to %d bytes", volume_id, new_size)
                return ctx.with_attachments(ctx.save(replace(grown, state=before)))


#: Failures of a backend (rather than of the request) after which a create tries the next ranked one.
RESCHEDULED = (ResourceExhausted, Unavailable, DeadlineExceeded, Internal, OSError)


def _attempts_failed(name: str, attempts: list[tuple[str, Exception]]) -> BlockwireError:
    """The error of a create that failed on every backend tried, naming each attempt; of the kind of
    the last failure."""
    said = "; ".join(
        f"attempt {i} on backend {b}: {exc.message if isinstance(exc, BlockwireError) else 'internal error'}"
        for i, (b, exc) in enumerate(attempts, start=1)
    )
    message = f"volume {name} could not be created on {len(attempts)} backend(s): {said}"
    last = attempts[-1][1]
    if isinstance(last, Unavailable):
        return Unavailable(message)
    if isinstance(last, DeadlineExceeded):
        return DeadlineExceeded(message)
    if isinstance(last, ResourceExhausted):
        return ResourceExhausted(message)
    return Internal(message)


def _source_size(asked: int, source_size: int) -> int:
    if asked == 0:
        return source_size
    if asked < source_size:
        raise InvalidArgument(
            "size_bytes", f"{asked} is smaller than the source ({source_size}); use 0 or more"
        )
    return asked
