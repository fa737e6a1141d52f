"""The `tgt` exporter: targets in a running tgtd, driven by tgtadm through the injected Runner.

Per volume: one target (tid allocated here), LUN 1 backed by the volume's file or device (LUN 0 is
tgt's controller), ``scsi_id=<wwn>`` and ``scsi_sn=<serial>`` so that every portal announces the
volume's identity (see `storagesvc.identity` for the exact designators), ``readonly=1`` for read-only
exports, an incoming CHAP account (and an outgoing one for mutual CHAP) bound to the target, and one
``--initiator-name`` ACL entry per attaching host. tgt serves every target on every portal it listens
on; `start()` makes tgtd listen on the configured portals.

tgtadm exits 22 for every refusal and says which in one stderr line; "already exists" on a create and
"can't find" on a delete are successes here (idempotency). Exit 107 means tgtd is not running.

The LUN and its identity: tgt 1.0.85's ``--op new --mode logicalunit`` takes no ``--params`` (tgtadm
refuses ``-P`` there, and tgtd applies no scsi_id at creation), so a new LUN announces tgt's default
identity ("IET ..." scsi_id, "beaf.." serial) until the ``--op update`` that follows. Only a LUN that
this module creates can be in that state, for the milliseconds between the two requests, and if the
update fails the LUN is deleted again. An existing LUN keeps its identity: it is never deleted to be
re-made, see `resize`. `list_targets` reports each LUN's backing path, identity and state, so the
export checks notice a LUN that was lost or changed behind our back and `ensure_target` repairs it.

CHAP secrets: tgtadm only takes the password on its command line. It is passed as a `Secret`, so the
Executor never logs it and scrubs it from errors, but it is visible in /proc/<pid>/cmdline to other
local users for the few milliseconds tgtadm runs. Run storagesvc on a host without untrusted local
users (as for any target host), or use the LIO exporter, which writes secrets to configfs instead.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from blockwire.errors import BlockwireError, FailedPrecondition, Unavailable
from blockwire.model import Chap
from blockwire.runtime.executor import Arg, CommandFailed, Result, Runner
from blockwire.runtime.failpoints import NO_FAILPOINTS, Failpoints
from blockwire.secret import Secret
from storagesvc.targets.base import LunState, TargetSpec, TargetState, same_path

log = logging.getLogger(__name__)

REFUSED = 22  # tgtadm's exit code for every refused request
NOT_RUNNING = 107
_EXISTS = ("already exists",)
_MADE_VALID = 10.0  # seconds a made target's tid is used by `allow` without listing the targets
_MISSING = ("can't find", "not found", "doesn't exist", "does not exist", "no such")

# Failpoints (blockwire.runtime.failpoints, injected; the daemon arms them from BLOCKWIRE_FAILPOINTS) for
# the recovery tests.
FP_AFTER_TARGET_CREATE = "storage.tgt.after_target_create"  # a target with no LUN, no CHAP
FP_AFTER_ACCOUNT_CREATE = "storage.tgt.after_account_create"  # a CHAP account bound to no target


@dataclass(frozen=True)
class TgtLun:
    """One logical unit in `tgtadm --op show --mode target` output."""

    lun: int
    scsi_id: str = ""
    scsi_sn: str = ""
    online: bool = True
    readonly: bool = False
    path: str = ""  # "Backing store path"; "" for none

    @classmethod
    def parse(cls, lun: int, attrs: Mapping[str, str]) -> TgtLun:
        path = attrs.get("Backing store path", "")
        return cls(
            lun,
            attrs.get("SCSI ID", ""),
            attrs.get("SCSI SN", ""),
            attrs.get("Online", "Yes") == "Yes",
            attrs.get("Readonly", "No") == "Yes",
            "" if path == "None" else path,
        )

    def state(self) -> LunState:
        # tgt's NAA-6 designator is made of scsi_id's hex digits (storagesvc.identity): scsi_id is the wwn
        return LunState(self.lun, self.path, self.scsi_id, self.scsi_sn, self.online, self.readonly)


@dataclass(frozen=True)
class TgtTarget:
    """One target in `tgtadm --op show --mode target` output."""

    tid: int
    iqn: str
    units: tuple[TgtLun, ...]
    accounts: tuple[str, ...]
    outgoing_accounts: tuple[str, ...]
    acl: tuple[str, ...]

    @property
    def luns(self) -> tuple[int, ...]:
        return tuple(u.lun for u in self.units)

    def unit(self, lun: int) -> TgtLun | None:
        return next((u for u in self.units if u.lun == lun), None)


_TARGET_RE = re.compile(r"^Target (\d+): (\S+)$")
_LUN_RE = re.compile(r"^\s+LUN: (\d+)$")
_LUN_ATTR_RE = re.compile(r"^ {12}(\S[^:]*): ?(.*)$")


@dataclass
class _Building:
    tid: int
    iqn: str
    luns: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    outgoing: list[str] = field(default_factory=list)
    acl: list[str] = field(default_factory=list)

    def take(self, section: str, line: str) -> None:
        """One line inside a section of this target."""
        stripped = line.strip()
        if section == "LUN information":
            lm = _LUN_RE.match(line)
            am = _LUN_ATTR_RE.match(line)
            if lm:
                self.luns.append((int(lm.group(1)), {}))
            elif am and self.luns:
                self.luns[-1][1][am.group(1)] = am.group(2).strip()
        elif section == "Account information" and stripped:
            if stripped.endswith(" (outgoing)"):
                self.outgoing.append(stripped.removesuffix(" (outgoing)"))
            else:
                self.accounts.append(stripped)
        elif section == "ACL information" and stripped:
            self.acl.append(stripped)

    def done(self) -> TgtTarget:
        units = tuple(TgtLun.parse(n, attrs) for n, attrs in self.luns)
        return TgtTarget(
            self.tid, self.iqn, units, tuple(self.accounts), tuple(self.outgoing), tuple(self.acl)
        )


def parse_targets(text: str) -> list[TgtTarget]:
    """Parses `tgtadm --lld iscsi --op show --mode target`."""
    targets: list[TgtTarget] = []
    current: _Building | None = None
    section = ""
    for line in text.splitlines():
        m = _TARGET_RE.match(line)
        if m:
            if current is not None:
                targets.append(current.done())
            current = _Building(int(m.group(1)), m.group(2))
            section = ""
            continue
        if current is None:
            continue
        if line.startswith("    ") and not line.startswith("     "):
            section = line.strip().rstrip(":")
        else:
            current.take(section, line)
    if current is not None:
        targets.append(current.done())
    return targets


def parse_accounts(text: str) -> list[str]:
    """Parses `tgtadm --lld iscsi --op show --mode account` ("Account list:" then one user a line)."""
    return [line.strip() for line in text.splitlines() if line.startswith(" ") and line.strip()]


def parse_portals(text: str) -> list[str]:
    """Parses `tgtadm --lld iscsi --op show --mode portal` ("Portal: 127.0.0.1:3260,1")."""
    out = []
    for line in text.splitlines():
        if line.startswith("Portal: "):
            out.append(line.removeprefix("Portal: ").rsplit(",", 1)[0])
    return out


class TgtExporter:
    kind = "tgt"
    lun = 1

    def __init__(
        self,
        runner: Runner,
        portals: Sequence[str],
        *,
        control_port: int = 0,
        tgtadm: str = "tgtadm",
        timeout: float = 30.0,
        failpoints: Failpoints = NO_FAILPOINTS,
    ) -> None:
        self.runner = runner
        self.failpoints = failpoints
        self.portals = tuple(portals)
        self.control_port = control_port
        self.tgtadm = tgtadm
        self.timeout = timeout
        # tids are tgtd's per-daemon target numbers; allocation is the only thing serialized here.
        self._tid_lock = threading.Lock()
        self._next_tid = 1
        # targets `ensure_target` just made: IQN -> (tid, when), for the `allow` that follows
        self._made: dict[str, tuple[int, float]] = {}

    # -- running tgtadm

    def _adm(self, *args: Arg, tolerate: Sequence[str] = ()) -> Result:
        argv: list[Arg] = [self.tgtadm, "-C", str(self.control_port), "--lld", "iscsi", *args]
        try:
            result = self.runner.run(argv, ok={0: "ok", REFUSED: "refused"}, timeout=self.timeout)
        except CommandFailed as exc:
            if exc.returncode == NOT_RUNNING:
                raise Unavailable(
                    f"tgtd is not running on control port {self.control_port} (tgtadm -C {self.control_port})"
                ) from exc
            raise
        if result.returncode == REFUSED:
            message = result.stderr.strip().removeprefix("tgtadm: ")
            if any(t in message for t in tolerate):
                return result
            raise Unavailable(f"tgtd refused {' '.join(result.argv[5:8])}: {message}")
        return result

    def _show(self) -> list[TgtTarget]:
        return parse_targets(self._adm("--op", "show", "--mode", "target").stdout)

    def _find(self, target_iqn: str) -> TgtTarget | None:
        return next((t for t in self._show() if t.iqn == target_iqn), None)

    # -- Exporter

    def start(self) -> None:
        have = parse_portals(self._adm("--op", "show", "--mode", "portal").stdout)
        for portal in self.portals:
            if portal not in have:
                self._adm("--op", "new", "--mode", "portal", "--param", f"portal={portal}", tolerate=_EXISTS)
                log.info("tgtd now listens on %s", portal)

    def healthy(self) -> bool:
        try:
            self._adm("--op", "show", "--mode", "sys")
        except (BlockwireError, OSError):
            return False
        return True

    def _try_new_target(self, target_iqn: str) -> int | None:
        """The usual case in one request, no listing: the target made with this process's next tid.
        None when tgtd refused (the IQN exists already: a repeat, a leftover; or the tid is taken):
        the caller lists the targets and decides. tgtd refuses a second target of the same IQN (as it
        refuses a taken tid), so a target is never made twice."""
        with self._tid_lock:
            tid = max(self._next_tid, 1)
            new = ("--op", "new", "--mode", "target", "--tid", str(tid), "-T", target_iqn)
            if self._adm(*new, tolerate=_EXISTS).returncode == REFUSED:
                return None
            self._next_tid = tid + 1
            return tid

    def _create_target(self, target_iqn: str, shown: Sequence[TgtTarget] | None = None) -> int:
        """Creates the target with a free tid. Allocation is serialized; everything else is not.
        `shown`: a listing the caller just took (one tgtadm less); when tgtd refuses the tid it picked
        from it (another tgtadm user took it since), a fresh listing is taken and the tid picked again.
        The next tid is past every tid listed, so that the next `_try_new_target` finds it free."""
        with self._tid_lock:
            for listing in (shown, None) if shown is not None else (None,):
                used = {t.tid for t in (listing if listing is not None else self._show())}
                tid = max(self._next_tid, 1)
                for _ in range(10_000):
                    if tid not in used:
                        break
                    tid += 1
                try:
                    self._adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", target_iqn)
                except Unavailable:
                    if listing is None:
                        raise
                    log.info("tgt tid %d was taken since the listing; listing again", tid)
                    continue
                self._next_tid = max(tid, *used) + 1
                return tid
            raise AssertionError("unreachable: the last attempt raises or returns")

    def ensure_target(self, spec: TargetSpec) -> None:
        """The target made (one `new` request, no listing: the first export of a volume), or, when
        tgtd refuses that, the targets listed and the one of this IQN checked and repaired in place
        (a repeat, a leftover of a crash) or made with a free tid."""
        existing: TgtTarget | None = None
        shown: list[TgtTarget] | None = None
        made = self._try_new_target(spec.target_iqn)
        if made is None:
            shown = self._show()
            existing = next((t for t in shown if t.iqn == spec.target_iqn), None)
        with contextlib.ExitStack() as undo:
            if existing is None:
                tid = made if made is not None else self._create_target(spec.target_iqn, shown)
                undo.callback(self._delete_target, tid)
                self.failpoints.hit(FP_AFTER_TARGET_CREATE)
                unit: TgtLun | None = None
            else:
                tid, unit = existing.tid, existing.unit(self.lun)
            self._ensure_lun(tid, spec, unit, undo)
            for chap, outgoing in ((spec.chap, False), (spec.mutual_chap, True)):
                if chap is not None:
                    undo.callback(self._delete_account, chap.username)
                    self._account(tid, chap, outgoing)
            undo.pop_all()
        if existing is None:
            # the `allow` that follows (same export, under the volume's lock) binds without listing again
            self._made[spec.target_iqn] = (tid, time.monotonic())
        log.info("tgt target %s (tid %d) exports %s", spec.target_iqn, tid, spec.device_path)

    def _ensure_lun(
        self, tid: int, spec: TargetSpec, unit: TgtLun | None, undo: contextlib.ExitStack
    ) -> None:
        """LUN `self.lun` of target `tid` backed by the volume's device, online, with the volume's
        identity. A LUN made here is deleted by `undo` if anything after fails (its identity update
        first of all), so no LUN stays with tgt's default identity. An existing LUN on the wrong
        backing, or offline, is re-opened in place (`_reopen`): it keeps its identity meanwhile."""
        if unit is None:
            self._adm(
                "--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(self.lun),
                "--bstype", "rdwr", "-b", _backing(spec.device_path),
            )  # fmt: skip
            undo.callback(self._delete_lun, tid)
        elif not same_path(unit.path, spec.device_path) or not unit.online:
            log.warning(
                "tgt tid %d LUN %d: backed by %s (%s), not %s: re-opening it on its backing",
                tid,
                self.lun,
                unit.path or "nothing",
                "online" if unit.online else "offline",
                spec.device_path,
            )
            self._reopen(tid, spec.device_path)
        if unit is None or (unit.scsi_id, unit.scsi_sn, unit.readonly) != (
            spec.wwn,
            spec.serial,
            spec.readonly,
        ):
            self._set_identity(tid, spec)

    def _set_identity(self, tid: int, spec: TargetSpec) -> None:
        params = f"scsi_id={spec.wwn},scsi_sn={spec.serial},readonly={1 if spec.readonly else 0}"
        self._adm(
            "--op",
            "update",
            "--mode",
            "logicalunit",
            "--tid",
            str(tid),
            "--lun",
            str(self.lun),
            "--params",
            params,
        )

    def _reopen(self, tid: int, device_path: str) -> None:
        """One request: take the LUN offline and open its backing again (``online=0,path=...``). tgtd
        closes the backing store, opens `device_path`, reads its size and puts the LUN back online in
        one step of its event loop: the logical unit, its identity, its sessions and their unit
        attentions stay; only its size (and backing) change. tgtd refuses the path while the LUN is
        online, so a refused ``online=0`` (an initiator holds PREVENT MEDIUM REMOVAL) changes nothing."""
        self._adm(
            "--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(self.lun),
            "--params", f"online=0,path={_backing(device_path)}",
        )  # fmt: skip

    def _delete_lun(self, tid: int) -> None:
        self._adm(
            "--op", "delete", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(self.lun),
            tolerate=_MISSING,
        )  # fmt: skip

    def _account(self, tid: int, chap: Chap, outgoing: bool) -> None:
        # Accounts are global in tgtd: one left from before is made again, so that its password is the
        # recorded one (the usual case, a new account, takes one request).
        password: Secret = chap.password
        new = ("--op", "new", "--mode", "account", "--user", chap.username, "--password", password)
        if self._adm(*new, tolerate=_EXISTS).returncode == REFUSED:
            self._delete_account(chap.username)
            self._adm(*new)
        self.failpoints.hit(FP_AFTER_ACCOUNT_CREATE)
        bind = ["--op", "bind", "--mode", "account", "--tid", str(tid), "--user", chap.username]
        self._adm(*bind, *(["--outgoing"] if outgoing else []), tolerate=_EXISTS)

    def _delete_account(self, username: str) -> None:
        self._adm("--op", "delete", "--mode", "account", "--user", username, tolerate=_MISSING)

    def _delete_target(self, tid: int) -> None:
        self._adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force", tolerate=_MISSING)

    def remove_target(self, target_iqn: str) -> None:
        self._made.pop(target_iqn, None)
        target = self._find(target_iqn)
        if target is None:
            return
        # --force: hosts still logged in are cut off (the attachment is being deleted).
        self._delete_target(target.tid)
        for user in (*target.accounts, *target.outgoing_accounts):
            self._delete_account(user)
        log.info("tgt target %s (tid %d) removed", target_iqn, target.tid)

    def allow(self, spec: TargetSpec, initiator_iqn: str) -> None:
        made = self._made.pop(spec.target_iqn, None)
        if made is not None and time.monotonic() - made[1] < _MADE_VALID:
            # ensure_target just made this target (tid from this process's own counter, never reused):
            # its ACL is empty, no listing needed
            self._adm(
                "--op", "bind", "--mode", "target", "--tid", str(made[0]), "--initiator-name", initiator_iqn,
                tolerate=_EXISTS,
            )  # fmt: skip
            return
        target = self._require(spec.target_iqn)
        if initiator_iqn in target.acl:
            return
        self._adm(
            "--op", "bind", "--mode", "target", "--tid", str(target.tid), "--initiator-name", initiator_iqn,
            tolerate=_EXISTS,
        )  # fmt: skip

    def deny(self, target_iqn: str, initiator_iqn: str) -> None:
        target = self._find(target_iqn)
        if target is None or initiator_iqn not in target.acl:
            return
        self._adm(
            "--op", "unbind", "--mode", "target", "--tid", str(target.tid), "--initiator-name", initiator_iqn,
            tolerate=_MISSING,
        )  # fmt: skip

    def resize(self, spec: TargetSpec) -> None:
        """tgt reads a LUN's size when it opens the backing store: re-open LUN 1 in place (`_reopen`).
        The LUN is never deleted (before, a delete and a re-create left a window in which initiators got
        "LUN not supported" or tgt's default identity, and a failure in between left the target without
        its LUN). Logged-in hosts keep their sessions and see the new capacity on their next rescan.

        On a failure the LUN is put back online on its backing with its identity (`_restore_lun`) and
        the error raised; what cannot be put back is left to the export checks, which see it.

        What remains: tgtd closes and re-opens the backing file descriptor inside that one step; a read
        or write that one of its I/O threads issues at that very moment fails with MEDIUM ERROR (measured
        on tgt 1.0.85 under nonstop 1 MiB I/O: 10 failed I/Os in 1619 resizes; delete and re-create failed
        356 I/Os in 315). tgt offers no way to hold I/O around it: a target in state "offline" drops
        SCSI commands unanswered (QEMU's initiator then hangs; measured), so it is not used."""
        target = self._require(spec.target_iqn)
        unit = target.unit(self.lun)
        if unit is None:
            log.warning("target %s lost LUN %d; making it again", spec.target_iqn, self.lun)
            with contextlib.ExitStack() as undo:
                self._ensure_lun(target.tid, spec, None, undo)
                undo.pop_all()
            return
        try:
            self._reopen(target.tid, spec.device_path)
        except BlockwireError as exc:
            now = self._unit(spec.target_iqn)
            if now is not None and now.online and now.path == unit.path:
                raise FailedPrecondition(
                    f"tgtd kept LUN {self.lun} of {spec.target_iqn} as it was and did not read its new "
                    f"size ({exc.message}); an initiator may hold it (PREVENT MEDIUM REMOVAL): "
                    "retry, or detach and extend"
                ) from None
            self._restore_lun(target.tid, spec)
            raise Unavailable(
                f"re-opening LUN {self.lun} of {spec.target_iqn} on {spec.device_path} failed "
                f"({exc.message}); the LUN was put back on its backing where possible: retry"
            ) from None
        now = self._unit(spec.target_iqn)
        if now is None or not now.online or not same_path(now.path, spec.device_path):
            self._restore_lun(target.tid, spec)
            raise Unavailable(
                f"LUN {self.lun} of {spec.target_iqn} is not online on {spec.device_path} after the "
                "re-open; it was put back where possible: retry"
            )

    def _unit(self, target_iqn: str) -> TgtLun | None:
        target = self._find(target_iqn)
        return target.unit(self.lun) if target is not None else None

    def _restore_lun(self, tid: int, spec: TargetSpec) -> None:
        """After a failed resize: the LUN online on its backing with its identity, if tgtd lets us."""
        try:
            with contextlib.ExitStack() as undo:
                self._ensure_lun(tid, spec, self._unit(spec.target_iqn), undo)
                undo.pop_all()
        except (BlockwireError, OSError) as exc:
            log.error(
                "target %s: LUN %d could not be put back on %s (%s); the export checks will retry",
                spec.target_iqn,
                self.lun,
                spec.device_path,
                exc,
            )

    def _require(self, target_iqn: str) -> TgtTarget:
        target = self._find(target_iqn)
        if target is None:
            raise Unavailable(
                f"target {target_iqn} is gone from tgtd (restarted?); the export checks rebuild it: retry"
            )
        return target

    def prune_accounts(self, is_ours: Callable[[str], bool]) -> list[str]:
        bound = {u for t in self._show() for u in (*t.accounts, *t.outgoing_accounts)}
        pruned = []
        for user in parse_accounts(self._adm("--op", "show", "--mode", "account").stdout):
            if is_ours(user) and user not in bound:
                self._delete_account(user)
                pruned.append(user)
        return pruned

    def list_targets(self, prefix: str) -> list[TargetState]:
        out = []
        for t in self._show():
            if t.iqn.startswith(prefix):
                unit = t.unit(self.lun)
                out.append(TargetState(t.iqn, t.acl, unit.state() if unit is not None else None))
        return out


def _backing(path: str) -> str:
    """tgtadm hands the backing path to tgtd inside a comma-separated parameter string."""
    if "," in path:
        raise FailedPrecondition(f"tgt cannot take a backing path with a comma ({path[:80]!r}); rename it")
    return path
