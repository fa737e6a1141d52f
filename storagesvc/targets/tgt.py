"""The `tgt` exporter: targets in a running tgtd, driven by tgtadm through the injected Runner.

Per volume: one target (tid allocated here), LUN 1 backed by the volume's file or device (LUN 0 is
tgt's controller), ``scsi_id=<wwn>`` and ``scsi_sn=<serial>`` so that every portal announces the
volume's identity (see `storagesvc.identity` for the exact designators), ``readonly=1`` for read-only
exports, an incoming CHAP account (and an outgoing one for mutual CHAP) bound to the target, and one
``--initiator-name`` ACL entry per attaching host. tgt serves every target on every portal it listens
on; `start()` makes tgtd listen on the configured portals.

tgtadm exits 22 for every refusal and says which in one stderr line; "already exists" on a create and
"can't find" on a delete are successes here (idempotency). Exit 107 means tgtd is not running.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from blockwire import failpoints
from blockwire.errors import BlockwireError, Unavailable
from blockwire.model import Chap
from blockwire.secret import Secret
from hostagent.host.executor import Arg, CommandFailed, Result, Runner
from storagesvc.targets.base import TargetSpec, TargetState

log = logging.getLogger(__name__)

REFUSED = 22  # tgtadm's exit code for every refused request
NOT_RUNNING = 107
_EXISTS = ("already exists",)
_MISSING = ("can't find", "not found", "doesn't exist", "does not exist", "no such")

# Failpoints (blockwire.failpoints, armed only by BLOCKWIRE_FAILPOINTS) for the recovery tests.
FP_AFTER_TARGET_CREATE = "storage.tgt.after_target_create"  # a target with no LUN, no CHAP
FP_AFTER_ACCOUNT_CREATE = "storage.tgt.after_account_create"  # a CHAP account bound to no target


@dataclass(frozen=True)
class TgtTarget:
    """One target in `tgtadm --op show --mode target` output."""

    tid: int
    iqn: str
    luns: tuple[int, ...]
    accounts: tuple[str, ...]
    outgoing_accounts: tuple[str, ...]
    acl: tuple[str, ...]


_TARGET_RE = re.compile(r"^Target (\d+): (\S+)$")
_LUN_RE = re.compile(r"^\s+LUN: (\d+)$")


@dataclass
class _Building:
    tid: int
    iqn: str
    luns: list[int] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    outgoing: list[str] = field(default_factory=list)
    acl: list[str] = field(default_factory=list)

    def done(self) -> TgtTarget:
        return TgtTarget(
            self.tid, self.iqn, tuple(self.luns), tuple(self.accounts), tuple(self.outgoing), tuple(self.acl)
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
        stripped = line.strip()
        if line.startswith("    ") and not line.startswith("     "):
            section = stripped.rstrip(":")
        elif section == "LUN information":
            lm = _LUN_RE.match(line)
            if lm:
                current.luns.append(int(lm.group(1)))
        elif section == "Account information" and stripped:
            if stripped.endswith(" (outgoing)"):
                current.outgoing.append(stripped.removesuffix(" (outgoing)"))
            else:
                current.accounts.append(stripped)
        elif section == "ACL information" and stripped:
            current.acl.append(stripped)
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
    ) -> None:
        self.runner = runner
        self.portals = tuple(portals)
        self.control_port = control_port
        self.tgtadm = tgtadm
        self.timeout = timeout
        # tids are tgtd's per-daemon target numbers; allocation is the only thing serialized here.
        self._tid_lock = threading.Lock()
        self._next_tid = 1

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

    def _create_target(self, target_iqn: str) -> int:
        """Creates the target with a free tid. Allocation is serialized; everything else is not."""
        with self._tid_lock:
            used = {t.tid for t in self._show()}
            tid = max(self._next_tid, 1)
            for _ in range(10_000):
                if tid not in used:
                    break
                tid += 1
            self._adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", target_iqn)
            self._next_tid = tid + 1
            return tid

    def ensure_target(self, spec: TargetSpec) -> None:
        existing = self._find(spec.target_iqn)
        with contextlib.ExitStack() as undo:
            if existing is None:
                tid = self._create_target(spec.target_iqn)
                undo.callback(self._delete_target, tid)
                failpoints.hit(FP_AFTER_TARGET_CREATE)
                luns: tuple[int, ...] = ()
            else:
                tid, luns = existing.tid, existing.luns
            if self.lun not in luns:
                self._adm(
                    "--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(self.lun),
                    "--bstype", "rdwr", "-b", spec.device_path, tolerate=_EXISTS,
                )  # fmt: skip
            self._set_identity(tid, spec)
            for chap, outgoing in ((spec.chap, False), (spec.mutual_chap, True)):
                if chap is not None:
                    undo.callback(self._delete_account, chap.username)
                    self._account(tid, chap, outgoing)
            undo.pop_all()
        log.info("tgt target %s (tid %d) exports %s", spec.target_iqn, tid, spec.device_path)

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

    def _account(self, tid: int, chap: Chap, outgoing: bool) -> None:
        # Accounts are global in tgtd: recreate it so that its password is the recorded one.
        self._delete_account(chap.username)
        password: Secret = chap.password
        self._adm("--op", "new", "--mode", "account", "--user", chap.username, "--password", password)
        failpoints.hit(FP_AFTER_ACCOUNT_CREATE)
        bind = ["--op", "bind", "--mode", "account", "--tid", str(tid), "--user", chap.username]
        self._adm(*bind, *(["--outgoing"] if outgoing else []), tolerate=_EXISTS)

    def _delete_account(self, username: str) -> None:
        self._adm("--op", "delete", "--mode", "account", "--user", username, tolerate=_MISSING)

    def _delete_target(self, tid: int) -> None:
        self._adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force", tolerate=_MISSING)

    def remove_target(self, target_iqn: str) -> None:
        target = self._find(target_iqn)
        if target is None:
            return
        # --force: hosts still logged in are cut off (the attachment is being deleted).
        self._delete_target(target.tid)
        for user in (*target.accounts, *target.outgoing_accounts):
            self._delete_account(user)
        log.info("tgt target %s (tid %d) removed", target_iqn, target.tid)

    def allow(self, spec: TargetSpec, initiator_iqn: str) -> None:
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
        """tgt reads the backing size when a LUN is created: re-create LUN 1 with the same identity.
        Logged-in hosts keep their sessions and see the new capacity on their next rescan."""
        target = self._require(spec.target_iqn)
        tid = str(target.tid)
        self._adm(
            "--op", "delete", "--mode", "logicalunit", "--tid", tid, "--lun", str(self.lun), tolerate=_MISSING
        )
        self._adm(
            "--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", str(self.lun),
            "--bstype", "rdwr", "-b", spec.device_path, tolerate=_EXISTS,
        )  # fmt: skip
        self._set_identity(target.tid, spec)

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
        return [TargetState(t.iqn, t.acl) for t in self._show() if t.iqn.startswith(prefix)]
