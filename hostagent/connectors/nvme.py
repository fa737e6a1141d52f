"""NVMe over TCP through the kernel's host driver, with native NVMe multipath.

connect: one controller per announced portal (host NQN and host id of this host, or the host NQN storage
announced; DH-HMAC-CHAP secrets written with the options to /dev/nvme-fabrics, never on an argv:
`hostagent.tools.nvme`), made in parallel; a live (or reconnecting) controller to the same subsystem,
address and host NQN is reused, never connected twice (the kernel's EALREADY, ceph-csi#5808's "already
connected"); then a udev wait, with a deadline, for the namespace head; then the identity check: the
namespace's NGUID and UUID must be those storage announced (each one announced), or the connect is
refused (IdentityMismatch) and what it made is removed. With native multipath (nvme_core multipath=Y,
the Debian default) the head /dev/nvmeKnM is one device over every path.

Without native multipath (nvme_core multipath=N) each controller has its own namespace device nvmeNnM:
every portal is connected, the identity of EACH controller's namespace device is verified (one that is
not the volume's refuses the connect, and what the call made is removed: its controllers, and a map
multipathd built over their devices alone), then a dm-multipath map over them (`MultipathMaps`, shared
with the kernel iSCSI path; multipathd's WWID of an NVMe namespace is its udev ID_WWN, the sysfs
`wwid`: "uuid.<UUID>" or "eui.<NGUID>"), whose /dev/dm-N the domain gets. Where the host has no
dm-multipath (no multipathd, or the agent's `multipath = "never"`), or the volume has one portal (and
`multipath` is not "always"), the volume is reached over its first path's namespace device.

disconnect: the volume's controllers (its subsystem, portals and host NQN) are deleted only when no
other namespace hangs on them: a namespace with another identity in the subsystem (another volume of
a per-host subsystem, or the namespace reused) keeps them, and itself, untouched. A namespace head that
something holds open (QEMU, a mount; `Openers`) is FAILED_PRECONDITION naming the holder unless forced
(the agent checks the running domains first; force overrides "open", never "not this volume's").
With native multipath, when the kernel's subsystem has other controllers besides the volume's (another
host NQN of this machine, e.g. a live migration's destination identity on one kernel), the head stays
on them: only the volume's controllers go, and a holder of the head is not refused (its I/O goes on
over the others).
Without native multipath the volume's map is flushed first, under the same rules as the iSCSI kernel
path (refused while a process, a mount or a dm device on it holds it, unless forced; `multipath -f`
retried while udev's blkid briefly holds it), then the controllers deleted.
Nothing is left: no controller, so no path device, head, map or subsystem. Idempotent.

The controller loss policy (ctrl_loss_tmo, reconnect_delay, fast_io_fail_tmo) is the agent's config
(`Timeouts`; README "NVMe/TCP" says why its defaults differ from the kernel's, os-brick's and
ceph-csi's). The kernel reconnects a lost path by itself within that policy; a controller it gave up on
is gone from sysfs, and `restore_paths` (reconcile) connects that portal again.

All work on one subsystem (for one host NQN) is serialized by a lock of that subsystem: a disconnect
can never delete controllers that a concurrent connect of another namespace of the same subsystem has
just found and reuses. Different subsystems proceed in parallel.
"""

from __future__ import annotations

import errno
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass

from blockwire.errors import (
    BlockwireError,
    DeadlineExceeded,
    FailedPrecondition,
    IdentityMismatch,
    InvalidArgument,
    Unavailable,
)
from blockwire.model import ConnectionInfo, NvmeofConnection, NvmeofPortal
from blockwire.runtime.clock import Clock, Deadline
from blockwire.runtime.executor import CommandFailed
from blockwire.runtime.locks import KeyedLocks
from blockwire.validate import validate_connection_info
from hostagent.connectors.base import wait_device
from hostagent.connectors.dm_multipath import DmMap, MultipathMaps
from hostagent.host.nvme import NAMESPACE_RE, Controller, Fabrics, Namespace, NvmeHost, normal_id
from hostagent.host.openers import Openers
from hostagent.host.udev import UdevDevice, UdevWaiter
from hostagent.model import ConnectorKind, Finding, HostDevice
from hostagent.tools.nvme import (
    Timeouts,
    connect_error,
    fabrics_options,
    parse_connect_answer,
    render_options,
    split_portal,
)

log = logging.getLogger(__name__)

_HEAD_PATH = re.compile(r"/nvme-subsystem/(nvme-subsys\d+)/nvme\d+n\d+$")
_OWN_PATH = re.compile(r"/ctl/(nvme\d+)/nvme\d+n\d+$")
GONE_STATES = ("deleting", "deleting (no IO)", "dead")  # a controller on its way out: not reused
USERS_GRACE = 3.0  # seconds a holder of the head gets to let go (QEMU's blockdev-del after an unplug)
USERS_RETRY = 0.2
EXTEND_WAIT = 10.0  # seconds an extend waits for the kernel's rescan to show a new size


def nvme_of(info: ConnectionInfo) -> NvmeofConnection:
    t = info.transport
    if not isinstance(t, NvmeofConnection):
        raise InvalidArgument("connection_info", "the NVMe connector needs an nvmeof transport")
    return t


def announced_ids(info: ConnectionInfo) -> dict[str, str]:
    """The identity storage announced: {"nguid": ..., "uuid": ...} (normal form), each only if given.
    `info.wwn`, when set, is compared with the NGUID (storage's WWN of an NVMe volume is its NGUID)."""
    t = nvme_of(info)
    ids = {}
    if t.namespace_nguid:
        ids["nguid"] = normal_id(t.namespace_nguid)
    elif info.wwn:
        ids["nguid"] = normal_id(info.wwn)
    if t.namespace_uuid:
        ids["uuid"] = normal_id(t.namespace_uuid)
    return ids


def _dashed(hex32: str) -> str:
    """A UUID in normal_id form (32 hex) in UUID notation, as the kernel's wwid shows it; "" for none."""
    h = hex32
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" if len(h) == 32 else ""


def is_volume(ns: Namespace, info: ConnectionInfo) -> bool:
    """Whether `ns` is the announced namespace: every announced identity equal; with none announced
    (allow_unverified_identity), the announced namespace id."""
    ids = announced_ids(info)
    if ids:
        return all(getattr(ns, k) == v for k, v in ids.items())
    nsid = nvme_of(info).namespace_id
    return bool(nsid) and ns.nsid == nsid


@dataclass(frozen=True)
class Portal:
    traddr: str
    trsvcid: str

    @classmethod
    def of(cls, p: NvmeofPortal) -> Portal:
        return cls(*split_portal(p.address))

    def __str__(self) -> str:
        return f"{self.traddr}:{self.trsvcid}"


def decisive(errors: list[BlockwireError]) -> BlockwireError:
    """The error a connect whose every portal failed reports: the first that retrying will not change (a
    refused authentication on one path, say) over a transient one (Unavailable: another path timed out
    at the same moment, which the 6.12 host does after a refused DH-HMAC-CHAP, ~60 s later, with EIO)."""
    return next((e for e in errors if not isinstance(e, Unavailable)), errors[0])


class NvmeConnector:
    kind = ConnectorKind.NVME_TCP

    def __init__(
        self,
        host: NvmeHost,
        fabrics: Fabrics,
        udev: UdevWaiter,
        clock: Clock,
        *,
        openers: Openers,
        host_nqn: str,
        host_id: str,
        timeouts: Timeouts | None = None,
        device_timeout: float = 30.0,
        maps: MultipathMaps | None = None,
    ) -> None:
        """`maps`: dm-multipath on this host (multipathd), used only when native NVMe multipath is off."""
        self.host = host
        self.fabrics = fabrics
        self.udev = udev
        self.clock = clock
        self.openers = openers
        self.host_nqn = host_nqn
        self.host_id = host_id
        self.timeouts = timeouts or Timeouts()
        self.device_timeout = device_timeout
        self.maps = maps
        self._subsystems = KeyedLocks()

    # -- helpers ------------------------------------------------------------------------------------
    def audit(self, keep: list[ConnectionInfo]) -> list[Finding]:
        """NVMe-oF controllers to subsystems no record (`keep`) announces. Report only: a controller may
        be another program's (`hostagent.doctor`)."""
        wanted = {i.transport.subsystem_nqn for i in keep if isinstance(i.transport, NvmeofConnection)}
        return [
            Finding(
                "nvme_controller",
                c.name,
                f"{c.transport} {c.traddr}:{c.trsvcid} to {c.subsysnqn} ({c.state}); if nothing uses it: "
                f"nvme disconnect -d {c.name}",
            )
            for c in self.host.controllers()
            if c.subsysnqn not in wanted and c.transport in ("tcp", "rdma")
        ]

    def fix(self, finding: Finding) -> bool:
        return False  # a controller is never removed by the doctor: nothing proves it is blockwire's

    def validate(self, info: ConnectionInfo) -> None:
        t = nvme_of(validate_connection_info(info))
        for i, p in enumerate(t.portals):
            if p.transport != "tcp":
                raise InvalidArgument(
                    f"connection_info.nvmeof.portals[{i}].transport", "this host connects NVMe over tcp only"
                )

    def _hostnqn(self, t: NvmeofConnection) -> str:
        return t.host_nqn or self.host_nqn

    def _lock(self, t: NvmeofConnection) -> AbstractContextManager[None]:
        return self._subsystems.hold(f"{self._hostnqn(t)}|{t.subsystem_nqn}")

    def _controllers(self, t: NvmeofConnection) -> dict[Portal, Controller]:
        """The controllers of the volume: its subsystem, one of its portals, this host NQN, not being
        deleted. The first of each portal."""
        hostnqn = self._hostnqn(t)
        portals = {Portal.of(p) for p in t.portals}
        found: dict[Portal, Controller] = {}
        for c in self.host.controllers(t.subsystem_nqn):
            p = Portal(c.traddr, c.trsvcid)
            if p in portals and c.hostnqn == hostnqn and c.state not in GONE_STATES and p not in found:
                found[p] = c
        return found

    def _connect_portal(self, info: ConnectionInfo, p: Portal, made: list[str]) -> Controller:
        """A controller to `p`: the existing one, or a new one (added to `made`)."""
        t = nvme_of(info)
        existing = self._controllers(t).get(p)
        if existing is not None:
            log.info(
                "%s on %s: reusing controller %s (%s)", t.subsystem_nqn, p, existing.name, existing.state
            )
            return existing
        opts = fabrics_options(
            subsystem_nqn=t.subsystem_nqn,
            traddr=p.traddr,
            trsvcid=p.trsvcid,
            host_nqn=self._hostnqn(t),
            host_id=self.host_id,
            timeouts=self.timeouts,
            dhchap_secret=t.dhchap_host_secret,
            dhchap_ctrl_secret=t.dhchap_ctrl_secret,
        )
        log.debug("connecting: %s", render_options(opts))  # secrets shown as ********
        try:
            answer = self.fabrics.connect(render_options(opts, reveal=True))
        except OSError as exc:
            err = exc.errno or errno.EIO
            if err == errno.EALREADY:  # made meanwhile (by another agent or by hand): take it
                again = self._controllers(t).get(p)
                if again is not None:
                    return again
            raise connect_error(err, f"{t.subsystem_nqn} on {p}") from None
        instance, _ = parse_connect_answer(answer)
        name = f"nvme{instance}"
        made.append(name)
        c = self.host.controller(name)
        if c is None:
            raise Unavailable(f"controller {name} to {t.subsystem_nqn} on {p} went away after the connect")
        log.info("%s on %s: connected controller %s", t.subsystem_nqn, p, name)
        return c

    def _wait_namespace(
        self, info: ConnectionInfo, controllers: list[Controller], *, own: bool = False
    ) -> Namespace:
        """The namespace of `info` in the controllers' subsystem, once udev has it. Refuses one at the
        announced namespace id with another identity. `own` (without native multipath): the namespace
        device of the one controller given, not any controller's of the subsystem."""
        t = nvme_of(info)
        subsystem = next((c.subsystem for c in controllers if c.subsystem), "")
        if not subsystem:
            subsystem = next((s for c in controllers if (s := self.host.subsystem_of_controller(c.name))), "")
        if not subsystem:
            raise Unavailable(f"the controllers of {t.subsystem_nqn} belong to no subsystem; retry")

        def candidate(ns: Namespace) -> bool:
            return ns.nsid == t.namespace_id if t.namespace_id else is_volume(ns, info)

        def match(dev: UdevDevice) -> bool:
            if not NAMESPACE_RE.fullmatch(dev.sys_name):
                return False
            if own and dev.sys_name not in self.host.controller_namespaces(controllers[0].name):
                return False
            if not self._in_subsystem(dev, subsystem, controllers):
                return False
            ns = self.host.namespace(dev.sys_name)
            return ns is not None and candidate(ns)

        def rescan() -> None:
            for c in controllers:  # a namespace added to a subsystem we were already connected to
                if c.state == "live":
                    try:
                        self.host.rescan(c.name)
                    except BlockwireError as exc:
                        log.debug("rescan of %s: %s", c.name, exc.message)
                    return

        what = f"namespace {t.namespace_id or ''} of {t.subsystem_nqn}".replace("  ", " ")
        if own:
            what += f" on /dev/{controllers[0].name}"
        try:
            dev = wait_device(
                self.udev,
                "block",
                match,
                Deadline(self.clock, self.device_timeout),
                trigger=rescan,
                what=what,
            )
        except DeadlineExceeded:
            there = self.host.namespaces(subsystem)
            if there:
                shown = ", ".join(
                    f"nsid {n.nsid} nguid {n.nguid or '(none)'} uuid {n.uuid or '(none)'}" for n in there
                )
                raise IdentityMismatch(
                    f"{t.subsystem_nqn} has no namespace {self._announced(info)} (it has {shown}): refused, "
                    "nothing was attached"
                ) from None
            raise
        ns = self.host.namespace(dev.sys_name)
        if ns is None:
            raise Unavailable(f"/dev/{dev.sys_name} went away; retry")
        if not is_volume(ns, info):
            via = f" on /dev/{controllers[0].name}" if own else ""
            raise IdentityMismatch(
                f"/dev/{ns.name} (nsid {ns.nsid} of {t.subsystem_nqn}{via}) has NGUID "
                f"{ns.nguid or '(none)'} and UUID {ns.uuid or '(none)'} but storage announced "
                f"{self._announced(info)}: refused (the namespace may have been reused); nothing was attached"
            )
        return ns

    def _in_subsystem(self, dev: UdevDevice, subsystem: str, controllers: list[Controller]) -> bool:
        """Whether namespace device `dev` belongs to `subsystem`, from its sysfs path when it says (a head
        sits under .../nvme-subsystem/nvme-subsysK/, a controller's own device under .../ctl/nvmeN/):
        a wait of many volumes at once sees every volume's events, and a scan of every subsystem for
        each of them costs seconds under load."""
        if m := _HEAD_PATH.search(dev.sys_path):
            return m[1] == subsystem
        if m := _OWN_PATH.search(dev.sys_path):
            return (
                m[1] in {c.name for c in controllers} or self.host.subsystem_of_controller(m[1]) == subsystem
            )
        return self.host.subsystem_of_namespace(dev.sys_name) == subsystem

    def _check_identity_early(
        self, info: ConnectionInfo, controllers: list[Controller], *, every: bool = False
    ) -> None:
        """Asks a live controller (`every`: each live one) for the identity of the announced namespace id
        (Identify, one admin command) before waiting for its block device: a namespace with another
        identity is refused at once, also one the kernel will not make a device for (its NGUID is another
        subsystem's here)."""
        ids = announced_ids(info)
        for live in [c for c in controllers if c.state == "live"][: None if every else 1]:
            self._identify(info, live, ids)

    def _identify(self, info: ConnectionInfo, live: Controller, ids: dict[str, str]) -> None:
        t = nvme_of(info)
        if not t.namespace_id or not ids:
            return
        seen = self.host.identify(live.name, t.namespace_id)
        if not seen:
            return  # cannot ask, or no identifiers reported: the sysfs check after the wait decides
        if any(seen.get(k, "") != v for k, v in ids.items()):
            raise IdentityMismatch(
                f"namespace {t.namespace_id} of {t.subsystem_nqn} (controller /dev/{live.name}) has NGUID "
                f"{seen.get('nguid') or '(none)'} and UUID {seen.get('uuid') or '(none)'} but storage "
                f"announced {self._announced(info)}: refused (the namespace may have been reused); nothing "
                "was attached"
            )

    @staticmethod
    def _announced(info: ConnectionInfo) -> str:
        ids = announced_ids(info)
        return (
            " and ".join(f"{k.upper()} {v}" for k, v in ids.items()) or f"nsid {nvme_of(info).namespace_id}"
        )

    # -- dm-multipath, when native NVMe multipath is off -----------------------------------------------
    def _dm_wanted(self, info: ConnectionInfo) -> bool:
        """Whether the volume gets a dm-multipath map: native NVMe multipath off, multipathd here, and the
        agent maps a volume with this many portals (`MultipathMaps.wants_map`)."""
        return (
            self.maps is not None
            and not self.host.native_multipath()
            and self.maps.wants_map(len(nvme_of(info).portals))
        )

    def _assemble(self, info: ConnectionInfo, controllers: list[Controller]) -> HostDevice:
        """Each controller's namespace device, verified (`_wait_namespace(own=True)`: one with another
        identity refuses the whole connect), then the multipath map over them. A controller that is not
        live (a reused one, reconnecting) without a device yet is left out: multipathd adds its device
        when it comes back (restore_paths does too)."""
        assert self.maps is not None
        t = nvme_of(info)
        found: list[Namespace] = []
        for c in controllers:
            if c.state != "live" and not self.host.controller_namespaces(c.name):
                log.info("%s: controller %s is %s, no namespace device to map yet", t.subsystem_nqn, c.name,
                         c.state)  # fmt: skip
                continue
            found.append(self._wait_namespace(info, [c], own=True))
        if not found:
            raise Unavailable(f"no controller of {t.subsystem_nqn} is live; retry")
        wwids = sorted({ns.wwid for ns in found})
        if len(wwids) != 1 or not wwids[0]:
            raise IdentityMismatch(
                f"the namespace devices {' '.join('/dev/' + ns.name for ns in found)} of {t.subsystem_nqn} "
                f"show the WWIDs {wwids or '(none)'}: not one volume; refused, nothing was attached"
            )
        dm = self.maps.build_map(wwids[0], [ns.name for ns in found])
        slaves = set(self.host.sysfs.listdir(f"block/{dm.sys_name}/slaves"))
        strangers = slaves - {d for c in controllers for d in self.host.controller_namespaces(c.name)}
        if strangers:
            log.info(
                "map %s of %s has other paths too: %s", dm.sys_name, wwids[0], " ".join(sorted(strangers))
            )
        log.info(
            "%s: map %s (%s) over %s", info.volume_id, dm.properties.get("DM_NAME", ""), dm.sys_name,
            " ".join(f"/dev/{ns.name}" for ns in found),
        )  # fmt: skip
        return HostDevice(
            path=f"/dev/{dm.sys_name}",
            wwn=found[0].nguid or found[0].uuid,
            size_bytes=self.host.sysfs.block_size_bytes(dm.sys_name) or dm.size_bytes or found[0].size_bytes,
            multipath_name=dm.properties.get("DM_NAME", ""),
            path_devices=tuple(f"/dev/{c.name}" for c in controllers),
        )

    def _volume_maps(self, ours: list[Namespace]) -> dict[str, DmMap]:
        """The multipath maps a disconnect flushes: the map of the volume's WWID (wherever its paths are),
        and a map over the volume's namespace devices when it is the volume's or every one of its paths
        is the volume's. A map of another identity that also took one of them is not flushed."""
        if self.maps is None or not ours:
            return {}
        wwids = {ns.wwid for ns in ours if ns.wwid}
        names = {ns.name for ns in ours}
        maps = {dm: m for dm, m in self.maps.maps_over_only(names).items()}
        for wwid in wwids:
            found = self.maps.map_in_sysfs(wwid)
            if found is not None:
                maps[found[0]] = self.maps.dm_map(found[0])
        return maps

    def _flush_pathless_map(self, info: ConnectionInfo, force: bool) -> None:
        """No controller of the volume is left (the kernel gave up on them, or a disconnect stopped after
        deleting them): a map of the volume's WWID that has no path left is flushed, under the same rule
        (refused while held, unless forced). A map with paths is not touched: they are another host
        NQN's controllers, not this connection's."""
        if self.maps is None:
            return
        ids = announced_ids(info)
        wwids = [f"uuid.{_dashed(ids['uuid'])}"] if ids.get("uuid") else []
        wwids += [f"eui.{ids['nguid']}"] if ids.get("nguid") else []
        for wwid in wwids:
            found = self.maps.map_in_sysfs(wwid)
            if found is None:
                continue
            m = self.maps.dm_map(found[0])
            if m.slaves:
                continue
            self._refuse_held(info, [], {m.dm: m}, force)
            self._flush(m, force)
            log.info("flushed map %s of %s (no path left)", m.name, info.volume_id)

    def _flush(self, m: DmMap, force: bool) -> None:
        assert self.maps is not None
        try:
            self.maps.flush_map(m.name, m.uuid)
        except CommandFailed as exc:
            if not force:
                who = [w for ws in self.maps.users([m.dm], []).values() for w in ws]
                holders = f"; {', '.join(who)}" if who else ""
                raise FailedPrecondition(
                    f"map {m.name} is in use ({exc.message}{holders}); detach first or force"
                ) from exc
            log.warning(
                "flushing %s failed (%s); deleting its controllers anyway (force)", m.name, exc.message
            )

    # -- the interface ------------------------------------------------------------------------------
    def connect(self, info: ConnectionInfo) -> HostDevice:
        t = nvme_of(info)
        portals = [Portal.of(p) for p in t.portals]
        dm = self._dm_wanted(info)
        if not dm and not self.host.native_multipath() and len(portals) > 1:
            log.warning(
                "nvme_core multipath is off and dm-multipath is not used here: %s is reached over %s only",
                info.volume_id, portals[0],
            )  # fmt: skip
            portals = portals[:1]
        with self._lock(t):
            made: list[str] = []  # controllers this call made (list.append is atomic: shared by the threads)
            try:
                got: list[Controller] = []
                errors: list[BlockwireError] = []
                with ThreadPoolExecutor(max_workers=len(portals), thread_name_prefix="nvme-connect") as pool:
                    futures = [pool.submit(self._connect_portal, info, p, made) for p in portals]
                    for p, f in zip(portals, futures, strict=True):
                        try:
                            got.append(f.result())
                        except BlockwireError as exc:
                            log.warning("%s on %s failed: %s", t.subsystem_nqn, p, exc.message)
                            errors.append(exc)
                if not got:
                    raise decisive(errors)
                self._check_identity_early(info, got, every=dm)
                if dm:
                    return self._assemble(info, got)
                ns = self._wait_namespace(info, got)
            except BaseException:
                self._undo(made)
                raise
            return HostDevice(
                path=f"/dev/{ns.name}",
                wwn=ns.nguid or ns.uuid,
                size_bytes=ns.size_bytes,
                path_devices=tuple(f"/dev/{c.name}" for c in got),
            )

    def _undo(self, made: list[str]) -> None:
        """After a failed connect: deletes the controllers this call made (never one it reused: another
        volume's namespaces may hang on it). A head that appeared only through them goes with them; a
        multipath map multipathd built over their namespace devices alone is flushed first."""
        if self.maps is not None and made:
            devs = [d for name in made for d in self.host.controller_namespaces(name)]
            for m in sorted(self.maps.maps_over_only(devs).values(), key=lambda m: m.name):
                try:
                    self.maps.flush_map(m.name, m.uuid)
                    log.info("flushed map %s over %s made by the failed connect", m.name, " ".join(devs))
                except BlockwireError as exc:
                    log.warning("could not flush map %s after a failed connect: %s", m.name, exc.message)
        for name in made:
            try:
                self.host.delete_controller(name)
                log.info("removed controller %s made by the failed connect", name)
            except BlockwireError as exc:
                log.warning("could not remove controller %s after a failed connect: %s", name, exc.message)

    def _users(self, heads: list[str], force: bool) -> dict[str, list[str]]:
        deadline = Deadline(self.clock, 0 if force else min(USERS_GRACE, self.device_timeout))
        while True:
            held = self.openers.users(heads)
            if not held or deadline.remaining() <= USERS_RETRY:
                return held
            self.clock.sleep(USERS_RETRY)

    def _refuse_held(
        self, info: ConnectionInfo, ours: list[Namespace], maps: dict[str, DmMap], force: bool
    ) -> None:
        """FailedPrecondition naming the holder when something holds the volume's devices (its map and
        namespace devices, or its head), after a short grace; with force only logged."""
        names = [ns.name for ns in ours]
        if maps and self.maps is not None:
            held = self.maps.users(maps, names) if force else self.maps.wait_unused(maps, names)
            said = "; ".join(f"{dev}: {', '.join(who)}" for dev, who in sorted(held.items()))
        else:
            held = self._users(names, force)
            said = "; ".join(f"/dev/{dev}: {', '.join(who)}" for dev, who in sorted(held.items()))
        if not held:
            return
        if not force:
            raise FailedPrecondition(
                f"the volume's device is in use ({said}); stop that user (detach the disk from its domain, "
                "unmount it) and repeat, or force"
            )
        log.warning("disconnecting %s although it is in use (force): %s", info.volume_id, said)

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        t = nvme_of(info)
        with self._lock(t):
            ctrls = self._controllers(t)
            if not ctrls:
                self._flush_pathless_map(info, force)
                return
            subsystem = next((c.subsystem for c in ctrls.values() if c.subsystem), "")
            there = self.host.namespaces(subsystem) if subsystem else []
            if not self.host.native_multipath():  # only the devices of this volume's controllers
                mine = {d for c in ctrls.values() for d in self.host.controller_namespaces(c.name)}
                there = [ns for ns in there if ns.name in mine]
            ours = [ns for ns in there if is_volume(ns, info)]
            others = [ns for ns in there if ns not in ours]
            maps = self._volume_maps(ours)
            kept = self._other_controllers(subsystem, ctrls) if not maps and not others else []
            if kept:  # the head stays, served by them: only this connection's paths go
                for c in ctrls.values():
                    self.host.delete_controller(c.name)
                log.info(
                    "disconnected %s: controllers %s; %s kept by the subsystem's other controllers %s",
                    t.subsystem_nqn, " ".join(c.name for c in ctrls.values()),
                    " ".join(f"/dev/{ns.name}" for ns in ours) or "the subsystem", " ".join(kept),
                )  # fmt: skip
                return
            if maps or not others:  # something of the volume's goes: not while a user holds it
                self._refuse_held(info, ours, maps, force)
            for m in sorted(maps.values(), key=lambda m: m.name):
                self._flush(m, force)
            if others:  # the controllers stay, with the namespace devices on them (the map is gone)
                log.warning(
                    "keeping the controllers %s of %s: %s on them %s not volume %s's",
                    " ".join(c.name for c in ctrls.values()), t.subsystem_nqn,
                    " ".join(f"/dev/{ns.name}" for ns in others), "are" if len(others) > 1 else "is",
                    info.volume_id,
                )  # fmt: skip
                return
            heads = {ns.name for ns in ours}

            def delete() -> None:
                for c in ctrls.values():
                    self.host.delete_controller(c.name)

            if heads:
                self.udev.wait_gone(
                    "block",
                    lambda d: d.sys_name in heads,
                    Deadline(self.clock, self.device_timeout),
                    trigger=delete,
                    what=" ".join(f"/dev/{h}" for h in sorted(heads)),
                )
            else:
                delete()
            log.info(
                "disconnected %s: controllers %s", t.subsystem_nqn, " ".join(c.name for c in ctrls.values())
            )

    def _other_controllers(self, subsystem: str, ctrls: dict[Portal, Controller]) -> list[str]:
        """With native multipath: the controllers of the kernel's `subsystem` that are not this
        connection's and not on their way out, such as those of another host NQN of this machine (the
        destination identity of a live migration between two host identities of one kernel) or of a
        portal storage does not announce. The namespace heads hang on them too, so they stay when this
        connection's controllers go."""
        if not subsystem or not self.host.native_multipath():
            return []
        mine = {c.name for c in ctrls.values()}
        kept = []
        for name in self.host.subsystem_controllers(subsystem):
            c = self.host.controller(name) if name not in mine else None
            if c is not None and c.state not in GONE_STATES:
                kept.append(name)
        return kept

    def _namespace(self, info: ConnectionInfo) -> Namespace | None:
        ctrls = self._controllers(nvme_of(info))
        subsystem = next((c.subsystem for c in ctrls.values() if c.subsystem), "")
        return (
            next((ns for ns in self.host.namespaces(subsystem) if is_volume(ns, info)), None)
            if subsystem
            else None
        )

    def extend(self, info: ConnectionInfo) -> int:
        """A rescan of one live controller; when `info.size_bytes` is more than the host sees (HostAgent's
        extend passes the new size it was given), a udev wait, bounded by EXTEND_WAIT, for the head to
        reach it. The target's change notice usually made the kernel rescan already. Without native
        multipath: each live controller's namespace device likewise, then `multipathd resize map`."""
        t = nvme_of(info)
        with self._lock(t):
            ctrls = [c for c in self._controllers(t).values() if c.state == "live"]
            ns = self._namespace(info)
            if ns is None or not ctrls:
                raise FailedPrecondition(
                    f"volume {info.volume_id} is not connected here (no live controller)"
                )
            mapped = self._volume_maps([ns]) if self.maps is not None else {}
            if not mapped or self.maps is None:
                return self._grow(ctrls[0].name, ns, info.size_bytes)
            for c in ctrls:
                for name in self.host.controller_namespaces(c.name):
                    own = self.host.namespace(name)
                    if own is not None and is_volume(own, info):
                        self._grow(c.name, own, info.size_bytes)
            dm, m = next(iter(mapped.items()))
            self.maps.multipath.resize(m.name)
            return self.host.sysfs.block_size_bytes(dm) or ns.size_bytes

    def _grow(self, controller: str, ns: Namespace, want: int) -> int:
        """Rescans `controller`; waits (bounded) for the namespace device `ns` to reach `want` bytes."""
        name = ns.name

        def rescan() -> None:
            self.host.rescan(controller)

        def grown(d: UdevDevice) -> bool:
            now = self.host.namespace(d.sys_name)
            return d.sys_name == name and now is not None and now.size_bytes >= want

        if want <= ns.size_bytes:
            rescan()
        else:
            deadline = Deadline(self.clock, min(EXTEND_WAIT, self.device_timeout))
            try:
                wait_device(
                    self.udev, "block", grown, deadline, trigger=rescan, what=f"/dev/{name} at {want} bytes"
                )
            except DeadlineExceeded:
                log.info("/dev/%s is still smaller than %d bytes after a rescan", name, want)
        now = self.host.namespace(name)
        return now.size_bytes if now is not None else ns.size_bytes

    def paths(self, info: ConnectionInfo) -> list[str]:
        """The live controllers of the volume (its paths), as /dev/nvmeN."""
        return sorted(
            f"/dev/{c.name}" for c in self._controllers(nvme_of(info)).values() if c.state == "live"
        )

    def expected_paths(self, info: ConnectionInfo) -> int:
        return len(nvme_of(info).portals)

    def restore_paths(self, info: ConnectionInfo) -> list[str]:
        """Connects the portals of a live attachment that have no controller (the kernel gave up on it
        after ctrl_loss_tmo, or it was never made); never touches the controllers it has. A portal that
        fails stays down; a new controller whose namespace is not the volume's is removed again."""
        t = nvme_of(info)
        added: list[str] = []
        with self._lock(t):
            have = self._controllers(t)
            for p in (Portal.of(x) for x in t.portals):
                if p in have:
                    continue
                made: list[str] = []
                try:
                    c = self._connect_portal(info, p, made)
                    if self._dm_wanted(info) and self.maps is not None:
                        ns = self._wait_namespace(info, [c], own=True)
                        self.maps.build_map(ns.wwid, [ns.name])  # the device joins the volume's map
                    else:
                        self._wait_namespace(info, [c])
                    added.append(f"/dev/{c.name}")
                except BlockwireError as exc:
                    log.warning("path %s of %s not restored: %s", p, t.subsystem_nqn, exc.message)
                    self._undo(made)
        return added
