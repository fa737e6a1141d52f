"""iSCSI through the kernel initiator (open-iscsi): what os-brick's ISCSIConnector does, without its
sleeps, its host-wide lock, its leaks and its wrong-LUN risk.

connect: a static node record per path (`-o new`, no SendTargets) with node.session.scan=manual and
CHAP / mutual CHAP set through `-o update` (secrets as Secret); logins to every portal in parallel
(one lock per target); a scan of only the announced LUN; a udev wait for the disk at that SCSI address;
the WWN check (IdentityMismatch, and everything it made is removed); a multipath map through multipathd.
disconnect: flush and remove the map, delete each SCSI device, log out only sessions no other LUN
uses, delete the node records: one `-m node -T IQN -o delete` for a target whose sessions are all gone
(no session to it on any portal, no path connect to it in flight), one per portal otherwise. Node-database
writes go one at a time (`hostagent.tools.iscsiadm`), so parallel detaches no longer meet in open-iscsi's
lock and retry exit 6. Idempotent; nothing left behind.

A target and LUN say where a volume was announced, not what is there now (a reused LUN, stale
connection info): every path that removes host state here takes only devices whose WWN is the
volume's, and what a failed connect itself brought (`ScsiDevices.remove`); a session stays logged in
while any disk is left on it, and its node record stays with it. An open device is refused without
force, naming its holder; force overrides "open", never "not this volume's".

Which sessions exist, their SCSI hosts and their disks are read from sysfs
(`hostagent.host.iscsi_sessions`), not from
`iscsiadm -m session -P 3`: that command walks every session of the host (one process and a sysfs walk
per call, contending for CPU with every other attach), which made detach cost grow with the number of
volumes attached. iscsiadm runs only to change state (node records, login, logout).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from blockwire.errors import BlockwireError, Unavailable
from blockwire.model import ConnectionInfo, IscsiConnection, IscsiPath
from blockwire.runtime.clock import Clock
from blockwire.runtime.locks import KeyedLocks
from blockwire.secret import Secret
from hostagent.connectors.base import iscsi_of, validate_iscsi
from hostagent.connectors.scsi import ScsiDevices
from hostagent.host.iscsi_sessions import kernel_sessions, session_host
from hostagent.host.openers import Openers
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevWaiter
from hostagent.identity import normalize_wwn, same_wwn, verify_wwn, wwn_from_wwid
from hostagent.model import ConnectorKind, Finding, HostDevice
from hostagent.tools.iscsiadm import Iscsiadm
from hostagent.tools.multipath import Multipath

log = logging.getLogger(__name__)


LOGIN_ATTEMPT_SECONDS = 15  # open-iscsi's node.conn[0].timeo.login_timeout default


def login_retries(deadline: float) -> int:
    """iscsid's initial_login_retry_max that ends its attempts well within `deadline` seconds."""
    return max(1, int(deadline // LOGIN_ATTEMPT_SECONDS) - 2)


class IscsiConnector:
    kind = ConnectorKind.ISCSI_KERNEL

    def __init__(
        self,
        iscsiadm: Iscsiadm,
        sysfs: Sysfs,
        udev: UdevWaiter,
        multipath: Multipath,
        clock: Clock,
        *,
        initiator_iqn: str,
        openers: Openers,
        device_timeout: float = 30.0,
        use_multipath: bool = True,
        map_single_path: bool = False,
    ) -> None:
        self.iscsiadm = iscsiadm
        self.initiator_iqn = initiator_iqn
        self.scsi = ScsiDevices(
            sysfs,
            udev,
            multipath,
            clock,
            openers=openers,
            device_timeout=device_timeout,
            use_multipath=use_multipath,
            map_single_path=map_single_path,
        )
        self._targets = KeyedLocks()
        # Per-target node-record deletion: `_iqns` (one lock per IQN) orders a target's "nobody uses its
        # records" check and its `-T IQN -o delete` against the path connects (`_connecting`) starting
        # on it, which create and log in with those records.
        self._iqns = KeyedLocks()
        self._connecting: Counter[str] = Counter()
        self._counting = threading.Lock()

    @contextmanager
    def _connecting_to(self, iqn: str) -> Iterator[None]:
        """Marks a path connect to `iqn` in flight (its node record must not be deleted meanwhile)."""
        with self._iqns.hold(iqn), self._counting:
            self._connecting[iqn] += 1
        try:
            yield
        finally:
            with self._counting:
                self._connecting[iqn] -= 1
                if not self._connecting[iqn]:
                    del self._connecting[iqn]

    def validate(self, info: ConnectionInfo) -> None:
        validate_iscsi(info)

    def _hosts(self, paths: Sequence[IscsiPath]) -> dict[IscsiPath, int]:
        """The SCSI host of each of `paths` that has a session (-1: not in sysfs yet), from one walk of
        the sessions; a path without a session is not in the result."""
        sessions = kernel_sessions(self.scsi.sysfs, {p.target_iqn for p in paths})
        sids = {(s.portal, s.target): s.sid for s in sessions}
        return {
            p: session_host(self.scsi.sysfs, sids[(p.portal, p.target_iqn)])
            for p in paths
            if (p.portal, p.target_iqn) in sids
        }

    def _host_of(self, path: IscsiPath) -> int | None:
        """The SCSI host of the session to `path`: None when there is no session, -1 when it has no
        SCSI host (yet)."""
        return self._hosts([path]).get(path)

    def _disk(self, host: int, lun: int) -> str:
        """The disk of `lun` on SCSI host `host` ("" when there is none, or no host)."""
        return next(iter(self.scsi.disks_at(host, lun)), "") if host >= 0 else ""

    def _host_number(self, path: IscsiPath) -> int:
        """The SCSI host of the session to `path` (-1: none). Asks iscsiadm only if sysfs does not tell."""
        host = self._host_of(path)
        if host is not None and host >= 0:
            return host
        session = next(
            (
                s
                for s in self.iscsiadm.session_details()
                if s.portal == path.portal and s.target == path.target_iqn
            ),
            None,
        )
        return session.host_number if session is not None else -1

    def _prepare_node(self, t: IscsiConnection, path: IscsiPath) -> None:
        p, iqn = path.portal, path.target_iqn
        self.iscsiadm.node_new(p, iqn)
        settings: list[tuple[str, str | Secret]] = [
            ("node.startup", "manual"),
            ("node.session.scan", "manual"),
            # iscsid retries a failed login (a portal down) on its own, 15 s an attempt: fewer retries than
            # fit in our login deadline, or iscsid goes on logging in after iscsiadm was stopped at the
            # deadline and the session appears later, owned by nothing.
            ("node.session.initial_login_retry_max", str(login_retries(self.iscsiadm.timeout))),
        ]
        if t.initiator_iqn and t.initiator_iqn != self.initiator_iqn:
            settings.append(("iface.initiatorname", t.initiator_iqn))
        if t.chap is not None:
            settings.append(("node.session.auth.authmethod", "CHAP"))
            settings.append(("node.session.auth.username", t.chap.username))
            settings.append(("node.session.auth.password", t.chap.password))
            if t.mutual_chap is not None:
                settings.append(("node.session.auth.username_in", t.mutual_chap.username))
                settings.append(("node.session.auth.password_in", t.mutual_chap.password))
        self.iscsiadm.node_update_many(p, iqn, settings)  # one iscsiadm run, not one per setting

    def _connect_path(self, t: IscsiConnection, path: IscsiPath, made: set[str]) -> str:
        """Logs `path` in, scans its LUN and returns the disk there. A disk at the LUN that was not there
        before (no session, or none at that LUN) is added to `made`, also when this fails: only this
        call can have brought it (the target's lock is held), so a failed connect may remove it
        whatever it shows. A disk that was there already may be another volume's and is not."""
        with self._connecting_to(path.target_iqn), self._targets.hold(f"{path.portal}|{path.target_iqn}"):
            had = self._host_of(path)
            before = set(self.scsi.disks_at(had, path.lun)) if had is not None and had >= 0 else set()
            host = -1
            try:
                self._prepare_node(t, path)
                self.iscsiadm.login(path.portal, path.target_iqn)
                host = self._host_number(path)
                if host < 0:
                    raise Unavailable(
                        f"no session to {path.target_iqn} on {path.portal} after the login; retry"
                    )
                return self.scsi.wait_disk(
                    host,
                    path.lun,
                    trigger=lambda: self.scsi.scan(host, path.lun),
                    what=f"LUN {path.lun} of {path.target_iqn} on {path.portal}",
                )
            finally:
                if host >= 0:
                    made.update(set(self.scsi.disks_at(host, path.lun)) - before)

    def connect(self, info: ConnectionInfo) -> HostDevice:
        t = iscsi_of(info)
        devs: list[str] = []
        errors: list[BaseException] = []
        made: set[str] = set()  # disks this connect brought (set.update is atomic: shared by the logins)
        with ThreadPoolExecutor(max_workers=len(t.paths), thread_name_prefix="iscsi-login") as pool:
            futures = [pool.submit(self._connect_path, t, p, made) for p in t.paths]
            for p, f in zip(t.paths, futures, strict=True):
                try:
                    devs.append(f.result())
                except BlockwireError as exc:
                    log.warning("path %s to %s failed: %s", p.portal, p.target_iqn, exc.message)
                    errors.append(exc)
        try:
            if not devs:
                raise errors[0]
            return self.scsi.assemble(info, sorted(devs), len(t.paths))
        except BaseException:
            self._undo_connect(info, made)
            raise

    def _undo_connect(self, info: ConnectionInfo, made: set[str]) -> None:
        """After a failed connect: removes the volume's devices and the disks this connect brought
        (forced: a half-made map may be held by udev's probe), never a disk at the LUN with another
        identity that was there before (the LUN reused by a volume connected here: its map may be
        open); logs out only sessions no disk is left on."""
        t = iscsi_of(info)
        devs, hosts = self._devices(t)
        self.scsi.remove(info.wwn, devs, force=True, made=made)
        self._log_out(t, hosts)

    def _devices(self, t: IscsiConnection) -> tuple[list[str], dict[IscsiPath, int]]:
        """The disks of the LUN on every path, and the SCSI host of each path that has a session."""
        hosts = self._hosts(t.paths)
        devs = {d for p, h in hosts.items() if h >= 0 for d in self.scsi.disks_at(h, p.lun)}
        return sorted(devs), hosts

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        """Removes the volume's devices (its WWN's: a disk at the LUN with another identity, or with none
        to compare when the connection info has no WWN, is left alone; `ScsiDevices.remove`), then logs
        out the sessions no disk is left on and deletes their node records. Without `force`, a device
        that is open is FAILED_PRECONDITION naming the holder, and nothing is touched."""
        t = iscsi_of(info)
        devs, hosts = self._devices(t)
        self.scsi.remove(info.wwn, devs, force=force)
        self._log_out(t, hosts)

    def audit(self, keep: list[ConnectionInfo]) -> list[Finding]:
        """Kernel iSCSI state no record (`keep`) accounts for: sessions, node records, the disks on such
        sessions, multipath maps of no record's WWID. Report only (`hostagent.doctor`)."""
        wanted = {
            (p.portal, p.target_iqn)
            for i in keep
            if isinstance(i.transport, IscsiConnection)
            for p in i.transport.paths
        }
        wwns = {normalize_wwn(i.wwn) for i in keep if i.wwn}
        found: list[Finding] = []
        sessions = {(s.portal, s.target): s for s in kernel_sessions(self.scsi.sysfs)}
        for (portal, target), s in sorted(sessions.items()):
            if (portal, target) in wanted:
                continue
            host = session_host(self.scsi.sysfs, s.sid)
            disks = self.scsi.disks_at(host) if host >= 0 else []
            found.append(
                Finding(
                    "iscsi_session",
                    f"{portal} {target}",
                    f"session {s.sid} ({s.state}), disks {' '.join(disks) or 'none'}; if it is not another "
                    f"program's: iscsiadm -m node -T {target} -p {portal} --logout",
                )
            )
            found += [
                Finding(
                    "scsi_disk",
                    f"/dev/{d}",
                    f"wwn {self.scsi.wwn_of(d) or '-'}, on session {s.sid} to {target}",
                )
                for d in disks
            ]
        for n in self.iscsiadm.nodes():
            if (n.portal, n.target) not in wanted and (n.portal, n.target) not in sessions:
                found.append(
                    Finding(
                        "iscsi_node",
                        f"{n.portal} {n.target}",
                        f"a node record without a session; if it is not another program's: iscsiadm -m node "
                        f"-T {n.target} -p {n.portal} -o delete",
                    )
                )
        for m in self.scsi.multipath.show_maps():
            if wwn_from_wwid(m.wwid) not in wwns:
                found.append(
                    Finding(
                        "multipath_map",
                        m.name,
                        f"wwid {m.wwid} ({m.sysfs}, {m.paths} paths); if unused: multipath -f {m.name}",
                    )
                )
        return found

    def fix(self, finding: Finding) -> bool:
        return False  # kernel state is never removed by the doctor: nothing proves it is blockwire's

    def _log_out(self, t: IscsiConnection, hosts: dict[IscsiPath, int]) -> None:
        """Logs out each path's session unless a disk is left on it (another LUN's, or another volume's
        at this LUN), then deletes the node records of the paths whose session is gone: never the record
        of a session that stays. When every path to a target lost its session, one `-T IQN -o delete`
        removes the target's records on all portals (`_delete_records`)."""

        def log_out(p: IscsiPath) -> bool:
            """True when `p` has no session any more (its record may go)."""
            with self._targets.hold(f"{p.portal}|{p.target_iqn}"):
                # A session seen above keeps its SCSI host while it lives (a logout of one already gone
                # is OK); only a path that had none is looked up again, under the target's lock.
                host = hosts[p] if p in hosts else self._host_of(p)
                left = self.scsi.disks_at(host) if host is not None and host >= 0 else []
                if left:
                    log.info(
                        "keeping the session to %s on %s and its node record: %s on it",
                        p.target_iqn,
                        p.portal,
                        " ".join(f"/dev/{d}" for d in left),
                    )
                    return False
                if host is not None:
                    self.iscsiadm.logout(p.portal, p.target_iqn)
                return True

        if len(t.paths) == 1:
            gone = [t.paths[0]] if log_out(t.paths[0]) else []
        else:
            with ThreadPoolExecutor(max_workers=len(t.paths), thread_name_prefix="iscsi-logout") as pool:
                futures = [pool.submit(log_out, p) for p in t.paths]
            # f.result() raises the first failure, once every path had its turn
            gone = [p for p, f in zip(t.paths, futures, strict=True) if f.result()]
        self._delete_records(t.paths, gone)

    def _delete_records(self, paths: Sequence[IscsiPath], gone: Sequence[IscsiPath]) -> None:
        """Deletes the node records of `gone` (paths of `paths` whose session is gone). A target whose
        paths are all gone, that no session is to on any portal (sysfs) and that no path connect is in
        flight to, has all its records deleted in one run; otherwise each gone path's record is deleted
        alone, under its portal's lock, if it still has no session."""
        rest: list[IscsiPath] = []
        for iqn in dict.fromkeys(p.target_iqn for p in paths):
            mine = [p for p in gone if p.target_iqn == iqn]
            if not mine:
                continue
            if {p.portal for p in mine} == {p.portal for p in paths if p.target_iqn == iqn}:
                with self._iqns.hold(iqn):
                    if not self._connecting[iqn] and not kernel_sessions(self.scsi.sysfs, {iqn}):
                        self.iscsiadm.target_delete(iqn)
                        continue
            rest += mine
        for p in rest:
            with self._targets.hold(f"{p.portal}|{p.target_iqn}"):
                if self._host_of(p) is None:
                    self.iscsiadm.node_delete(p.portal, p.target_iqn)

    def extend(self, info: ConnectionInfo) -> int:
        devs, _ = self._devices(iscsi_of(info))
        return self.scsi.rescan(devs, info.wwn)

    def paths(self, info: ConnectionInfo) -> list[str]:
        devs, _ = self._devices(iscsi_of(info))
        return [f"/dev/{d}" for d in devs]

    def restore_paths(self, info: ConnectionInfo) -> list[str]:
        """Logs in again the paths of a live attachment that have no disk for its LUN and adds their disks
        to its map; returns the disks added. Unlike `connect`, a failure never touches what the
        attachment still uses (its map, its other paths): a path that fails (login, udev, identity) only
        has its own disk removed and its own session logged out."""
        t = iscsi_of(info)
        hosts = self._hosts(t.paths)
        wwn = normalize_wwn(info.wwn)

        def disk_of(p: IscsiPath) -> str:
            return self._disk(hosts.get(p, -1), p.lun)

        kept = []
        for p in t.paths:
            dev = disk_of(p)
            if dev and (not wwn or same_wwn(wwn, self.scsi.wwn_of(dev))):
                kept.append(dev)
            elif dev:
                log.warning(
                    "path %s to %s not restored: /dev/%s at LUN %d is not volume %s (WWN %s); left alone",
                    p.portal, p.target_iqn, dev, p.lun, info.volume_id, self.scsi.wwn_of(dev) or "none",
                )  # fmt: skip
        added: list[str] = []
        for p in (p for p in t.paths if not disk_of(p)):
            made: set[str] = set()
            try:
                dev = self._connect_path(t, p, made)
                verify_wwn(info.wwn, self.scsi.wwn_of(dev), f"/dev/{dev}")
                added.append(dev)
            except BlockwireError as exc:
                log.warning("path %s to %s not restored: %s", p.portal, p.target_iqn, exc.message)
                self._drop_path(p, wwn, made)
        if added:
            self.scsi.assemble(info, sorted({*kept, *added}), len(t.paths))
        return [f"/dev/{d}" for d in added]

    def relogin_paths(self, info: ConnectionInfo, portals: Collection[str]) -> list[str]:
        """Logs out the sessions of the attachment's paths on `portals` (sessions the kernel holds FAILED
        and iscsid no longer recovers: a restarted target answered "target not found"), which removes
        their disks, then logs those paths in again with `restore_paths`; returns the disks added. The
        map and the attachment's other paths are never touched, nor a session that carries a disk that
        is not the volume's (another LUN's, or the LUN reused: the logout would remove it too); that
        path stays down."""
        wwn = normalize_wwn(info.wwn)
        for p in iscsi_of(info).paths:
            if p.portal in portals:
                with self._targets.hold(f"{p.portal}|{p.target_iqn}"):
                    host = self._host_of(p)
                    disks = self.scsi.disks_at(host) if host is not None and host >= 0 else []
                    others = [d for d in disks if not (wwn and same_wwn(wwn, self.scsi.wwn_of(d)))]
                    if others:
                        log.warning(
                            "not logging out the session to %s on %s: %s on it %s not volume %s's",
                            p.target_iqn, p.portal, " ".join(f"/dev/{d}" for d in others),
                            "are" if len(others) > 1 else "is", info.volume_id,
                        )  # fmt: skip
                        continue
                    self.iscsiadm.logout(p.portal, p.target_iqn)
        return self.restore_paths(info)

    def _drop_path(self, p: IscsiPath, wwn: str, made: set[str]) -> None:
        """After `restore_paths` failed on `p`: a disk there that this attempt brought (`made`) and that
        is not the volume's is removed (with a map multipathd built over it alone; another volume's map
        that took it as a path keeps its other paths), and the session is logged out unless some disk
        is still on it. A disk of the volume itself (a udev wait that ran out) is left to multipathd:
        it is one of the attachment's paths; a disk that was there before is not ours to remove."""
        with self._targets.hold(f"{p.portal}|{p.target_iqn}"):
            host = self._host_of(p)
            if host is None:
                return
            dev = self._disk(host, p.lun)
            if dev and wwn and same_wwn(wwn, self.scsi.wwn_of(dev)):
                return
            if dev in made:
                self.scsi.remove("", [dev], force=True, made={dev})
            if host < 0 or not self.scsi.disks_at(host):
                self.iscsiadm.logout(p.portal, p.target_iqn)

    def expected_paths(self, info: ConnectionInfo) -> int:
        return len(iscsi_of(info).paths)  # a session and a disk on each announced path
