"""Snapshots: create (under the name's lock, then the volume's), get, list, delete."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace

from blockwire import validate
from blockwire.errors import AlreadyExists, FailedPrecondition, NotFound
from storagesvc import paging
from storagesvc.catalog import Conflict
from storagesvc.context import Context
from storagesvc.model import ATTACHABLE, Page, Snapshot, SnapshotState, VolumeState

log = logging.getLogger(__name__)


def _repeat(existing: Snapshot, volume_id: str, labels: Mapping[str, str]) -> Snapshot:
    """A create of a name that exists: the same snapshot for a repeat, ALREADY_EXISTS for another."""
    if existing.volume_id != volume_id or dict(existing.labels) != dict(labels):
        raise AlreadyExists(
            f"snapshot name {existing.name} is used by snapshot {existing.id} "
            "(of another volume, or with other labels)"
        )
    return existing


class Snapshots:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def create(self, volume_id: str, name: str, labels: Mapping[str, str]) -> Snapshot:
        ctx = self.ctx
        with ctx.stats.measure("create_snapshot"):
            validate.object_id(volume_id, "volume_id")
            validate.name(name)
            validate.labels(labels)
            with ctx.locks.hold(f"name:{name}", f"snapshot name {name}"):
                existing = ctx.catalog.snapshot_by_name(name)
                if existing is not None:
                    return _repeat(existing, volume_id, labels)
                with ctx.hold_volume(volume_id):
                    v = ctx.volume(volume_id)
                    if v.state not in ATTACHABLE:
                        raise FailedPrecondition(f"volume {volume_id} is {v.state.value}")
                    pool = ctx.pools[v.backend]
                    ctx.check_space(pool, v.size_bytes)
                    snap = Snapshot(
                        id=ctx.new_id(),
                        name=name,
                        volume_id=volume_id,
                        size_bytes=v.size_bytes,
                        state=SnapshotState.CREATING,
                        backend=v.backend,
                        create_time=ctx.now(),
                        labels=dict(labels),
                        encryption=v.encryption,
                    )
                    with contextlib.ExitStack() as undo:
                        try:
                            ctx.catalog.insert_snapshot(snap)
                        except Conflict:
                            # another storage process sharing the catalog took the name meanwhile
                            existing = ctx.catalog.snapshot_by_name(name)
                            if existing is None:
                                raise AlreadyExists(f"snapshot name {name} is taken") from None
                            return _repeat(existing, volume_id, labels)
                        undo.callback(ctx.catalog.delete_snapshot, snap.id)
                        pool.backend.snapshot(volume_id, snap.id)
                        undo.pop_all()
                    snap = replace(snap, state=SnapshotState.AVAILABLE)
                    ctx.catalog.update_snapshot(snap)
                    log.info("snapshot %s (%s) of volume %s taken", snap.id, name, volume_id)
                    return snap

    def get(self, snapshot_id: str) -> Snapshot:
        validate.object_id(snapshot_id, "snapshot_id")
        s = self.ctx.catalog.get_snapshot(snapshot_id)
        if s is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return s

    def page(self, volume_id: str, page_size: int, page_token: str) -> Page[Snapshot]:
        return paging.listing(
            page_size,
            page_token,
            lambda after, n: self.ctx.catalog.list_snapshots(volume_id=volume_id, after=after, limit=n),
        )

    def delete(self, snapshot_id: str) -> None:
        ctx = self.ctx
        with ctx.stats.measure("delete_snapshot"):
            validate.object_id(snapshot_id, "snapshot_id")
            s = ctx.catalog.get_snapshot(snapshot_id)
            if s is None:
                return
            with ctx.locks.hold(f"name:{s.name}", f"snapshot {snapshot_id}"):
                if any(
                    v.state is VolumeState.CREATING for v in ctx.catalog.volumes_from(snapshot_id=snapshot_id)
                ):
                    raise FailedPrecondition(
                        f"a volume is being copied from snapshot {snapshot_id}; wait for it"
                    )
                if s.encryption is not None and not ctx.key_in_use(s.encryption.key_ref, but_snapshot=s.id):
                    ctx.need_crypt().keys.delete_key(s.encryption.key_ref)  # shared with its volume until now
                ctx.catalog.update_snapshot(replace(s, state=SnapshotState.DELETING))
                pool = ctx.pools.get(s.backend)
                if pool is not None:
                    pool.backend.delete_snapshot(snapshot_id)
                ctx.catalog.delete_snapshot(snapshot_id)
                log.info("snapshot %s (%s) deleted", snapshot_id, s.name)
