"""What every SCSI transport (kernel iSCSI, FC) shares: targeted scans, udev waits for the disks,
identity checks, multipath maps, and removal of everything that was made.

Disks are found by their SCSI address (host:channel:target:lun) in the udev event's sysfs path, never
by "the newest sdX", and their WWN (/sys/block/sdX/device/wwid) must be the announced one. The same
holds on the way out: an address says where a disk is, not whose it is, so removal (`remove`) takes
only disks whose WWN is the volume's (or that the failed connect itself brought), and refuses a device
someone holds open unless forced.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace

from blockwire.errors import FailedPrecondition
from blockwire.model import ConnectionInfo
from blockwire.runtime.clock import Deadline
from blockwire.runtime.executor import CommandFailed
from hostagent.connectors.base import wait_device
from hostagent.connectors.dm_multipath import (  # noqa: F401 - IN_USE_MARKERS & co. are imported from here too
    FLUSH_RETRY_FIRST,
    FLUSH_RETRY_MAX,
    IN_USE_MARKERS,
    USERS_GRACE,
    DmMap,
    MultipathMaps,
    map_in_use,
)
from hostagent.host.udev import UdevDevice
from hostagent.identity import normalize_wwn, same_wwn, verify_wwn
from hostagent.model import HostDevice

log = logging.getLogger(__name__)


def mpath_wwid(wwn: str) -> str:
    """multipath's WWID for an NAA WWN: the designator type "3" in front."""
    return "3" + normalize_wwn(wwn)


class ScsiDevices(MultipathMaps):
    """The SCSI side (scans, disks at addresses, WWNs, removal of disks) over the shared maps."""

    def scan(self, host: int, lun: int, channel: str = "-", target: str = "-") -> None:
        """A targeted scan of one LUN (never a wildcard LUN scan)."""
        self.sysfs.write(f"class/scsi_host/host{host}/scan", f"{channel} {target} {lun}")

    def wait_disk(self, host: int, lun: int, trigger: Callable[[], None], what: str) -> str:
        """The sdX at host:*:*:lun, after `trigger` (a login or a scan) made it appear."""
        pattern = re.compile(rf"/{host}:\d+:\d+:{lun}/block/(sd[a-z]+)$")

        def match(dev: UdevDevice) -> bool:
            return dev.properties.get("DEVTYPE", "disk") == "disk" and bool(pattern.search(dev.sys_path))

        dev = wait_device(
            self.udev, "block", match, Deadline(self.clock, self.device_timeout), trigger=trigger, what=what
        )
        return dev.sys_name

    def disks_at(self, host: int, lun: int | None = None) -> list[str]:
        """sdX names the kernel has at host:*:*:lun (any LUN when None)."""
        lun_glob = "*" if lun is None else str(lun)
        return sorted(
            p.rsplit("/", 1)[1] for p in self.sysfs.glob(f"bus/scsi/devices/{host}:*:*:{lun_glob}/block/*")
        )

    def wwn_of(self, dev: str) -> str:
        return normalize_wwn(self.sysfs.read(f"block/{dev}/device/wwid") or "")

    def assemble(self, info: ConnectionInfo, devs: list[str], paths: int) -> HostDevice:
        """Verifies every path's identity, then builds (or finds) the multipath map over them when a
        volume announced with `paths` paths gets one (`wants_map`), or returns the disk."""
        for dev in devs:
            verify_wwn(info.wwn, self.wwn_of(dev), f"/dev/{dev}")
        wwn = normalize_wwn(info.wwn) or self.wwn_of(devs[0])
        if not self.wants_map(paths):
            dev = devs[0]
            return HostDevice(
                path=f"/dev/{dev}",
                wwn=wwn,
                size_bytes=self.sysfs.block_size_bytes(dev) or 0,
                path_devices=(f"/dev/{dev}",),
            )
        wwid = mpath_wwid(wwn)

        dm = self.build_map(wwid, devs)
        return HostDevice(
            path=f"/dev/{dm.sys_name}",
            wwn=wwn,
            size_bytes=self.sysfs.block_size_bytes(dm.sys_name) or dm.size_bytes or 0,
            multipath_name=dm.properties.get("DM_NAME", ""),
            path_devices=tuple(f"/dev/{d}" for d in devs),
        )

    def map_name(self, wwn: str) -> str:
        if not wwn or not self.use_multipath:
            return ""
        wwid = mpath_wwid(wwn)
        found = self.map_in_sysfs(wwid)
        if found is None:
            return ""  # every dm map is in /sys/block: no map of this WWID, no need to ask multipathd
        if found[1]:
            return found[1]
        return next((m.name for m in self.multipath.show_maps() if m.wwid == wwid), "")

    def _maps_to_flush(self, wwn: str, gone: Collection[str]) -> dict[str, DmMap]:
        """The maps `remove` flushes: the volume's own (uuid mpath-3<wwn>, wherever its paths are), and a
        map over the removed disks only when it is the volume's or every one of its paths is removed
        here (multipathd mapped a disk this connect made). A map of another volume that took a disk
        made here as one more path is not flushed: that disk alone goes, its other paths stay."""
        own_uuid = f"mpath-{mpath_wwid(wwn)}" if wwn else ""
        maps = {
            dm: m
            for dm, m in self._holder_maps(sorted(gone)).items()
            if (own_uuid and m.uuid == own_uuid) or m.slaves <= set(gone)
        }
        if own_uuid and self.use_multipath:
            found = self.map_in_sysfs(mpath_wwid(wwn))
            name = self.map_name(wwn) if found is not None and found[0] not in maps else ""
            if found is not None and name:
                maps[found[0]] = replace(self.dm_map(found[0]), name=name)
        return maps

    def remove(self, wwn: str, devs: Sequence[str], *, force: bool, made: Collection[str] = ()) -> list[str]:
        """Removes the volume's devices among `devs` (the disks at its SCSI addresses) and waits for udev
        to see them go; returns the disks left in place.

        Only what is the volume's is removed (another volume may sit at the same address now: a reused
        LUN): a disk whose identity is `wwn`, and a disk in `made` (one this very connect's scan brought,
        whatever it shows), with the maps `_maps_to_flush` names. A disk with another identity, or none
        readable, is left alone entirely, with any map over it. With no `wwn` (connection info without
        one) no disk can be matched: none is removed but those in `made`. Guessing ("the disk at the
        LUN is probably the volume's") is exactly what destroys another volume's device after a LUN
        reuse, and a device left behind can still be removed later with a WWN, a destroyed one cannot
        be brought back.

        Without `force`, a device something holds open (`users`) is refused with FailedPrecondition
        naming the holder, before anything is touched; `force` removes the volume's devices anyway. It
        never widens what is the volume's."""
        wwn = normalize_wwn(wwn)
        gone = sorted({d for d in devs if d in made or (wwn and same_wwn(wwn, self.wwn_of(d)))})
        left = sorted(set(devs) - set(gone))
        if left:
            log.warning(
                "leaving %s in place: %s",
                " ".join(f"/dev/{d}" for d in left),
                f"not WWN {wwn}" if wwn else "no WWN given to tell whether it is the volume's",
            )
        maps = self._maps_to_flush(wwn, gone)
        held = self.users(maps, gone) if force else self.wait_unused(maps, gone)
        if held:
            said = "; ".join(f"{dev}: {', '.join(who)}" for dev, who in sorted(held.items()))
            if not force:
                raise FailedPrecondition(
                    f"the volume's device is in use ({said}); stop that user (detach the disk from its "
                    "domain, unmount it) and repeat, or force"
                )
            log.warning("removing the volume's devices although they are in use (force): %s", said)
        for m in sorted(maps.values(), key=lambda m: m.name):
            try:
                self.flush_map(m.name, m.uuid)
            except CommandFailed as exc:
                if not force:
                    who = [w for ws in self.users([m.dm], []).values() for w in ws]
                    holders = f"; {', '.join(who)}" if who else ""
                    raise FailedPrecondition(
                        f"map {m.name} is in use ({exc.message}{holders}); detach first or force"
                    ) from exc
                log.warning("flushing %s failed (%s); removing its paths anyway (force)", m.name, exc.message)
        present = [dev for dev in gone if self.sysfs.exists(f"block/{dev}/device/delete")]
        if present:
            # Every path deleted at once, then one wait for udev to see them all go.
            def delete() -> None:
                for dev in present:
                    self.sysfs.write(f"block/{dev}/device/delete", "1")

            self.udev.wait_gone(
                "block",
                lambda d: d.sys_name in present,
                Deadline(self.clock, self.device_timeout),
                trigger=delete,
                what=" ".join(f"/dev/{dev}" for dev in present),
            )
        return left

    def rescan(self, devs: list[str], wwn: str) -> int:
        for dev in devs:
            self.sysfs.write(f"block/{dev}/device/rescan", "1")
        name = self.map_name(wwn)
        if name:
            self.multipath.resize(name)
            dm = next((m.sysfs for m in self.multipath.show_maps() if m.name == name), "")
            if dm:
                return self.sysfs.block_size_bytes(dm) or 0
        return self.sysfs.block_size_bytes(devs[0]) or 0 if devs else 0
