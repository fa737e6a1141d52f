"""dm-multipath maps over a volume's path devices, whatever the transport: SCSI disks (kernel iSCSI, FC:
`hostagent.connectors.scsi.ScsiDevices`) and NVMe namespace devices when native NVMe multipath is off
(`hostagent.connectors.nvme`).

A map is known by its WWID (multipathd's uid: "3<NAA WWN>" for a SCSI disk, the namespace's udev
ID_WWN = sysfs `wwid`, "uuid.<UUID>" / "eui.<NGUID>", for an NVMe one) and its dm uuid "mpath-<WWID>".
`build_map` makes multipathd map the given paths (or add the ones an existing map lacks) and waits for
udev to report the map; `flush_map` removes it, retrying while something (udev's blkid after a writer
closed it) briefly holds it. `users` says who holds a map or a path device about to go: a removal
refuses those without force (the same rules for every transport).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from blockwire.runtime.clock import Clock, Deadline
from blockwire.runtime.executor import CommandFailed
from hostagent.connectors.base import wait_device
from hostagent.host.openers import Openers
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevDevice, UdevWaiter
from hostagent.tools.multipath import Multipath

log = logging.getLogger(__name__)

FLUSH_RETRY_FIRST = 0.1  # seconds; backoff of `multipath -f` while the map is in use, doubling ...
FLUSH_RETRY_MAX = 1.0  # ... up to this
# seconds a holder of a device about to be removed gets to let go before the removal is refused: QEMU
# finishing its blockdev-del after an unplug, a program a udev rule ran that `Openers` cannot tell as
# udev's. A real user (a running domain, a mount) is refused after this, not after `device_timeout`.
USERS_GRACE = 3.0

IN_USE_MARKERS = (
    "in use",  # multipath saw the map's open count above zero: "<name>: map in use"
    # The open count was zero when multipath looked, but an opener (udev's blkid after a path event or a
    # writer's close) got in before the remove ioctl: "device-mapper: remove ioctl on <name> failed:
    # Device or resource busy".
    "Device or resource busy",
)


def map_in_use(exc: CommandFailed) -> bool:
    """`multipath -f` refused because the map is open (exit 1), whichever of the two checks saw it."""
    text = exc.stderr + exc.message
    return any(marker in text for marker in IN_USE_MARKERS)


@dataclass(frozen=True)
class DmMap:
    """A multipath map as sysfs shows it."""

    dm: str  # "dm-0"
    name: str  # "mpatha"
    uuid: str  # "mpath-3600140..."
    slaves: frozenset[str]  # its path devices ("sda", "nvme1n1", ...)


class MultipathMaps:
    """Multipath maps over path devices, read from sysfs, made and flushed through multipathd."""

    def __init__(
        self,
        sysfs: Sysfs,
        udev: UdevWaiter,
        multipath: Multipath,
        clock: Clock,
        *,
        openers: Openers,
        device_timeout: float,
        use_multipath: bool,
        map_single_path: bool = False,
    ) -> None:
        """`use_multipath`: multipathd runs here and maps are wanted. `map_single_path`: a map even over a
        volume announced with one path (the agent's `multipath = "always"`); otherwise such a volume is
        its plain device, as with os-brick's and Nova's multipath off, and only volumes announced with
        two or more paths get a map. `openers`: who holds a device open (a removal refuses an open
        device without force)."""
        self.sysfs = sysfs
        self.openers = openers
        self.udev = udev
        self.multipath = multipath
        self.clock = clock
        self.device_timeout = device_timeout
        self.use_multipath = use_multipath
        self.map_single_path = map_single_path

    def wants_map(self, paths: int) -> bool:
        """Whether a volume announced with `paths` paths gets a multipath map."""
        return self.use_multipath and (paths > 1 or self.map_single_path)

    def build_map(self, wwid: str, devs: Sequence[str]) -> UdevDevice:
        """The multipath map of `wwid` over `devs`, once udev reports it: multipathd may have built it
        from udev's events already (find_multipaths no, or a known WWID): then only the paths it lacks
        are added, and the WWID is known to it."""

        def trigger() -> None:
            found = self.map_in_sysfs(wwid)
            held = set(self.sysfs.listdir(f"block/{found[0]}/slaves")) if found else set()
            if found is None:
                self.multipath.allow_wwid(wwid)
            for d in devs:
                if d not in held:
                    self.multipath.add_path(d)

        return wait_device(
            self.udev,
            "block",
            lambda d: d.properties.get("DM_UUID") == f"mpath-{wwid}",
            Deadline(self.clock, self.device_timeout),
            trigger=trigger,
            what=f"multipath map of {wwid}",
        )

    def map_in_sysfs(self, wwid: str) -> tuple[str, str] | None:
        """(dm-N, name) of the multipath map of `wwid`, read from sysfs: no round trip to multipathd."""
        for rel in self.sysfs.glob("block/dm-*/dm/uuid"):
            if self.sysfs.read(rel) == f"mpath-{wwid}":
                dm = rel.split("/")[1]
                return dm, self.sysfs.read(f"block/{dm}/dm/name") or ""
        return None

    def holder_maps(self, devs: Sequence[str]) -> dict[str, str]:
        """Multipath maps (name -> dm uuid) that hold any of `devs`, found in sysfs (holders/), whatever
        their WWID: multipathd may have built a map over a device whose identity was then refused."""
        return {m.name: m.uuid for m in self._holder_maps(devs).values()}

    def dm_map(self, dm: str) -> DmMap:
        return DmMap(
            dm=dm,
            name=(self.sysfs.read(f"block/{dm}/dm/name") or "").strip(),
            uuid=(self.sysfs.read(f"block/{dm}/dm/uuid") or "").strip(),
            slaves=frozenset(self.sysfs.listdir(f"block/{dm}/slaves")),
        )

    def _holder_maps(self, devs: Sequence[str]) -> dict[str, DmMap]:
        """dm-N -> the multipath map, of every multipath map that holds any of `devs`."""
        found: dict[str, DmMap] = {}
        for dev in devs:
            for holder in self.sysfs.listdir(f"block/{dev}/holders"):
                m = found.get(holder) or self.dm_map(holder)
                if m.name and m.uuid.startswith("mpath-"):
                    found[holder] = m
        return found

    def maps_over_only(self, devs: Collection[str]) -> dict[str, DmMap]:
        """The multipath maps every one of whose paths is among `devs` (multipathd mapped devices that
        are all about to go): a map that has other paths too is another volume's, not touched."""
        return {dm: m for dm, m in self._holder_maps(sorted(devs)).items() if m.slaves <= set(devs)}

    def _label(self, dev: str) -> str:
        name = (self.sysfs.read(f"block/{dev}/dm/name") or "").strip()
        return f"/dev/{dev} ({name})" if name else f"/dev/{dev}"

    def users(self, maps: Collection[str], disks: Collection[str]) -> dict[str, list[str]]:
        """Who holds the maps (dm-N) and path devices (sdX, nvmeNnM) about to be removed: processes and
        mounts (`Openers`), and dm devices built on them that are not removed with them (LVM, dm-crypt;
        a partition map kpartx made is removed by `multipath -f`, so only its own users count).
        Label ("/dev/dm-0 (mpatha)") -> phrases; empty when nothing holds any of them."""
        removed = set(maps) | set(disks)
        looked = list(removed)
        said: dict[str, list[str]] = {}
        for dev in sorted(removed):
            for holder in self.sysfs.listdir(f"block/{dev}/holders"):
                if holder in removed:
                    continue
                uuid = (self.sysfs.read(f"block/{holder}/dm/uuid") or "").strip()
                if dev in maps and uuid.startswith("part"):
                    looked.append(holder)  # kpartx's partition of the map: flushed with it
                    continue
                said.setdefault(self._label(dev), []).append(f"{self._label(holder)} is built on it")
        for dev, who in self.openers.users(looked).items():
            said.setdefault(self._label(dev), []).extend(who)
        return said

    def wait_unused(self, maps: Collection[str], disks: Collection[str]) -> dict[str, list[str]]:
        """`users`, looked at again with backoff (on the injected clock) while something holds the
        devices, for at most USERS_GRACE seconds; what still holds them then."""
        deadline = Deadline(self.clock, min(USERS_GRACE, self.device_timeout))
        delay = FLUSH_RETRY_FIRST
        while True:
            held = self.users(maps, disks)
            if not held or deadline.remaining() <= delay:
                return held
            log.debug("%s in use; looking again in %.2fs", ", ".join(held), delay)
            self.clock.sleep(delay)
            delay = min(delay * 2, FLUSH_RETRY_MAX)

    def flush_map(self, name: str, dm_uuid: str) -> None:
        """`multipath -f NAME` until udev reports the map removed. Closing a map that was open for writing
        (QEMU on unplug, a writer) makes udev probe it (blkid), and `multipath -f` meanwhile fails with
        "map in use": retried with backoff on the injected clock until `device_timeout`; other failures,
        or "in use" at the deadline, are raised (CommandFailed)."""
        deadline = Deadline(self.clock, self.device_timeout)
        delay = FLUSH_RETRY_FIRST

        def flush() -> None:
            self.multipath.flush(name)

        while True:
            try:
                self.udev.wait_gone(
                    "block",
                    lambda d: d.properties.get("DM_UUID") == dm_uuid,
                    deadline,
                    trigger=flush,
                    what=f"multipath map {name}",
                )
                return
            except CommandFailed as exc:
                if not map_in_use(exc) or deadline.remaining() <= delay:
                    raise
                log.debug("map %s in use; flushing again in %.2fs", name, delay)
            self.clock.sleep(delay)
            delay = min(delay * 2, FLUSH_RETRY_MAX)
