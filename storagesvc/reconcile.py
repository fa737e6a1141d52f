"""Restart safety: `Reconciler.run` makes the target side match the catalog at start."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

from storagesvc.context import Context
from storagesvc.exports import Exports, in_use_or_attaching
from storagesvc.model import Attachment, AttachmentState, Volume, VolumeState
from storagesvc.targets.base import AccountPruner, Exporter

log = logging.getLogger(__name__)

_CHAP_USER = re.compile(r"(in|out)-[0-9a-f]{1,24}")


class Reconciler:
    def __init__(self, ctx: Context, exports: Exports) -> None:
        self.ctx = ctx
        self.exports = exports

    def run(self) -> None:
        """Makes the target side match the catalog: after a restart of tgtd or of this service.

        * attachments caught half-way (RESERVED: export never confirmed) are undone, DETACHING ones
          finished; volumes caught CREATING lose their partial copy and become ERROR;
        * every volume with live attachments gets its target, LUN, CHAP and ACL back;
        * targets under our IQN prefix that the catalog does not know are removed, and CHAP accounts of
          ours (``in-<id>``, ``out-<id>``) that no target uses (exporters with global accounts: tgt).

        Killed in the middle of an export (the failpoints in `storagesvc.exports`), a restart therefore
        rolls back every attachment the catalog still has RESERVED: after the catalog write, after the
        target (and its LUN, CHAP account) was made, after the ACL entry: the row, the target and the
        accounts go, the volume is available again, and the host, whose CreateAttachment failed, retries
        or undoes. Once the catalog says ATTACHING (the answer may have been lost), the export is rebuilt
        (roll forward): a repeated CreateAttachment from the host returns that same attachment. An
        attachment caught DETACHING is finished (roll forward of the delete).
        """
        ctx = self.ctx
        with ctx.stats.measure("reconcile"):
            exporters: dict[int, Exporter] = {}
            for pool in ctx.pools.values():
                if pool.exporter is not None:
                    exporters.setdefault(id(pool.exporter), pool.exporter)
            for exporter in exporters.values():
                exporter.start()
            known: set[str] = set()
            for v in list(ctx.all_volumes()):
                if v.backend not in ctx.pools and ctx.catalog.node_backend(v.backend) is not None:
                    # another storage node's volume (README "Several storage nodes"): that node
                    # reconciles it; its lock is not taken here
                    if v.export is not None:
                        known.add(v.export.target_iqn)
                    continue
                with ctx.hold_volume(v.id):
                    target = self._volume(v)
                if target:
                    known.add(target)
            for exporter in exporters.values():
                for t in exporter.list_targets(ctx.target_prefix(exporter)):
                    if t.target_iqn not in known:
                        log.warning("removing target %s: the catalog does not know it", t.target_iqn)
                        exporter.remove_target(t.target_iqn)
                if isinstance(exporter, AccountPruner):
                    for user in exporter.prune_accounts(lambda u: _CHAP_USER.fullmatch(u) is not None):
                        log.warning("removed CHAP account %s: no target uses it", user)

    def _direct(self, v: Volume, live: list[Attachment]) -> None:
        """A volume hosts open themselves: only its state follows its live attachments."""
        want = in_use_or_attaching(live) if live else VolumeState.AVAILABLE
        if v.state is not VolumeState.ERROR and v.state is not want:
            self.ctx.save(replace(v, state=want, export=None))

    def _volume(self, v: Volume) -> str:  # noqa: PLR0911 - one return per case of the crash table
        ctx = self.ctx
        pool = ctx.pools.get(v.backend)
        if pool is None:
            log.error(
                "volume %s is on backend %s, which is not configured; leaving it alone", v.id, v.backend
            )
            return v.export.target_iqn if v.export else ""
        if v.state is VolumeState.CREATING:
            pool.backend.delete(v.id)
            ctx.save(
                replace(v, state=VolumeState.ERROR, error_message="the copy was interrupted by a restart")
            )
            return ""
        if v.state is VolumeState.DELETING:
            pool.backend.delete(v.id)
            ctx.catalog.delete_volume(v.id)
            return ""
        atts = ctx.catalog.attachments_of(v.id)
        for a in atts:
            if a.state in (AttachmentState.RESERVED, AttachmentState.DETACHING, AttachmentState.ERROR):
                log.info("attachment %s was %s at restart: removing it", a.id, a.state.value)
                self.exports.remove(a.id)
        v = ctx.catalog.get_volume(v.id) or v
        live = ctx.catalog.attachments_of(v.id)
        if pool.exporter is None:  # hosts open the volume themselves (rbd): no target to restore
            self._direct(v, live)
            return ""
        if not live:
            if v.export is not None:
                pool.exporter.remove_target(v.export.target_iqn)
            if v.export is not None or v.state is not VolumeState.AVAILABLE:
                state: VolumeState = VolumeState.AVAILABLE if v.state is not VolumeState.ERROR else v.state
                ctx.save(replace(v, state=state, export=None))
            return ""
        if v.export is None:
            log.error("volume %s has attachments but no export record; not exporting it", v.id)
            return ""
        self.exports.restore(v, pool, live)
        state = in_use_or_attaching(live)
        if v.state is not state:
            ctx.save(replace(v, state=state))
        log.info("volume %s: export %s restored for %d attachment(s)", v.id, v.export.target_iqn, len(live))
        return v.export.target_iqn
