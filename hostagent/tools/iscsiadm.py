"""open-iscsi's iscsiadm: build argv, run through the injected Runner, parse apart (VDSM's shape).

Static node records only (`-m node -o new`, never SendTargets); exit codes are named and handled at
the call site. `parse_*` are pure and tested on output recorded in the guest tier (tests/data/recorded).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from blockwire.errors import NotFound, PermissionDenied, Unavailable
from blockwire.runtime.clock import Clock
from blockwire.runtime.executor import Arg, CommandFailed, Runner
from blockwire.secret import Secret

log = logging.getLogger(__name__)

ISCSIADM = "iscsiadm"
# open-iscsi include/iscsi_err.h
ISCSI_ERR_SUCCESS = 0
ISCSI_ERR_IDBM = 6  # node database failure: retry
ISCSI_ERR_TRANS_NOT_FOUND = 12  # no iscsi_tcp transport (module not loaded)
ISCSI_ERR_SESS_EXISTS = 15
ISCSI_ERR_FATAL_LOGIN = 19  # the target refused the login (unknown target, ACL)
ISCSI_ERR_ISCSID_NOTCONN = 20  # iscsid is not running
ISCSI_ERR_NO_OBJS_FOUND = 21  # no such record / no sessions
ISCSI_ERR_SYSFS_LOOKUP = 22
ISCSI_ERR_LOGIN_AUTH_FAILED = 24

IDBM_RETRIES = 3
_GONE_OK = {ISCSI_ERR_SUCCESS: "ok", ISCSI_ERR_NO_OBJS_FOUND: "gone"}


@dataclass(frozen=True)
class Session:
    """One line of `iscsiadm -m session`."""

    transport: str
    sid: int
    portal: str
    tpgt: int
    target: str


@dataclass(frozen=True)
class Node:
    """One line of `iscsiadm -m node`."""

    portal: str
    tpgt: int
    target: str


@dataclass(frozen=True)
class SessionDetail:
    """A session of `iscsiadm -m session -P 3`: its SCSI host and the disks per LUN."""

    target: str
    portal: str
    sid: int
    host_number: int
    initiator: str = ""
    disks: dict[int, str] = field(default_factory=dict, hash=False)


_SESSION = re.compile(r"^(?P<tr>\w+): \[(?P<sid>\d+)\] (?P<portal>\S+),(?P<tpgt>-?\d+) (?P<target>\S+)")
_NODE = re.compile(r"^(?P<portal>\S+),(?P<tpgt>-?\d+) (?P<target>\S+)$")


def parse_sessions(text: str) -> list[Session]:
    out = []
    for line in text.splitlines():
        m = _SESSION.match(line.strip())
        if m:
            out.append(Session(m["tr"], int(m["sid"]), m["portal"], int(m["tpgt"]), m["target"]))
    return out


def parse_nodes(text: str) -> list[Node]:
    out = []
    for line in text.splitlines():
        m = _NODE.match(line.strip())
        if m:
            out.append(Node(m["portal"], int(m["tpgt"]), m["target"]))
    return out


def parse_session_details(text: str) -> list[SessionDetail]:
    """`iscsiadm -m session -P 3` -> sessions with host numbers and LUN -> disk."""
    out: list[SessionDetail] = []
    target = portal = initiator = ""
    sid = host = -1
    lun = -1
    disks: dict[int, str] = {}

    def flush() -> None:
        if sid >= 0:
            out.append(SessionDetail(target, portal, sid, host, initiator, dict(disks)))

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Target:"):
            flush()
            target, sid, host, disks = line.split()[1], -1, -1, {}
        elif line.startswith("Current Portal:"):
            if sid >= 0:
                flush()
                sid, host, disks = -1, -1, {}
            portal = line.split()[2].rsplit(",", 1)[0]
        elif line.startswith("Iface Initiatorname:"):
            initiator = line.split(":", 1)[1].strip()
        elif line.startswith("SID:"):
            sid = int(line.split()[1])
        elif line.startswith("Host Number:"):
            host = int(line.split()[2])
        elif m := re.match(r"scsi\d+ Channel \d+ Id \d+ Lun: (\d+)", line):
            lun = int(m.group(1))
        elif m := re.match(r"Attached scsi disk (\w+)", line):
            disks[lun] = m.group(1)
    flush()
    return out


# iscsiadm waits up to 30 s for open-iscsi's node-database lock (idbm_lock). A process killed while it
# holds that lock leaves /run/lock/iscsi/lock.write behind, and every later iscsiadm then fails with 6
# (ISCSI_ERR_IDBM) until an operator removes it. So a process is never killed before it could have waited
# for the lock and then spent the whole operation budget; logins are bounded by iscsid's own retry
# settings (see connectors/iscsi.py), not by killing iscsiadm.
IDBM_LOCK_WAIT_SECONDS = 30.0
KILL_MARGIN_SECONDS = 10.0


# open-iscsi's node database is host-wide and every writer takes its one lock (idbm_lock); writers that
# meet in it fail with exit 6 and were retried after sleeps (32 volumes on two paths: 168 `-o delete` runs
# for 64 records). The agent's own node-database writes (new, update, delete) queue here instead, in the
# process, so they meet in open-iscsi's lock only with other programs' (STYLE rule 8's exception: the
# resource itself is one per host). Logins, logouts and reads do not take it: they only read records.
_NODE_DB = threading.Lock()


class Iscsiadm:
    def __init__(self, runner: Runner, clock: Clock, *, timeout: float = 30.0) -> None:
        """`timeout` is the budget of one operation; the process limit adds the lock wait to it."""
        self.runner = runner
        self.clock = clock
        self.timeout = timeout
        self.kill_after = timeout + IDBM_LOCK_WAIT_SECONDS + KILL_MARGIN_SECONDS

    def _run(self, args: list[Arg], ok: dict[int, str] | None = None) -> tuple[int, str]:
        accepted = ok or {ISCSI_ERR_SUCCESS: "ok"}
        delay = 0.1
        for attempt in range(IDBM_RETRIES + 1):
            try:
                r = self.runner.run([ISCSIADM, *args], ok=accepted, timeout=self.kill_after)
                return r.returncode, r.stdout
            except CommandFailed as exc:
                if exc.returncode == ISCSI_ERR_IDBM and attempt < IDBM_RETRIES:
                    log.debug("iscsiadm database busy; retry in %.1fs", delay)
                    self.clock.sleep(delay)  # backoff: the only sleep, through the injected clock
                    delay *= 2
                    continue
                raise _translate(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _node(self, portal: str, target: str) -> list[Arg]:
        return ["-m", "node", "-T", target, "-p", portal]

    def _write(self, args: list[Arg], ok: dict[int, str] | None = None) -> tuple[int, str]:
        """A node-database write: one at a time in this process (`_NODE_DB`)."""
        with _NODE_DB:
            return self._run(args, ok)

    def node_new(self, portal: str, target: str) -> None:
        self._write([*self._node(portal, target), "-o", "new"])

    def node_update(self, portal: str, target: str, name: str, value: str | Secret) -> None:
        self._write([*self._node(portal, target), "-o", "update", "-n", name, "-v", value])

    def node_update_many(
        self, portal: str, target: str, settings: Sequence[tuple[str, str | Secret]]
    ) -> None:
        """Several settings in one `-o update` (iscsiadm applies each `-n NAME -v VALUE` pair in turn): one
        process and one database write instead of one per setting."""
        if not settings:
            return
        args: list[Arg] = [*self._node(portal, target), "-o", "update"]
        for name, value in settings:
            args += ["-n", name, "-v", value]
        self._write(args)

    def node_delete(self, portal: str, target: str) -> bool:
        rc, _ = self._write(
            [*self._node(portal, target), "-o", "delete"], {0: "ok", ISCSI_ERR_NO_OBJS_FOUND: "gone"}
        )
        return rc == 0

    def target_delete(self, target: str) -> bool:
        """`-m node -T IQN -o delete`: the records of `target` on every portal in one run (False: there
        were none). iscsiadm refuses a record a session uses (exit 15): the caller deletes only a target
        no session is to."""
        rc, _ = self._write(
            ["-m", "node", "-T", target, "-o", "delete"], {0: "ok", ISCSI_ERR_NO_OBJS_FOUND: "gone"}
        )
        return rc == 0

    def login(self, portal: str, target: str) -> bool:
        """True when this call logged in, False when a session existed already."""
        try:
            rc, _ = self._run(
                [*self._node(portal, target), "--login"], {0: "ok", ISCSI_ERR_SESS_EXISTS: "session exists"}
            )
        except CommandFailed as exc:  # not one of the codes _translate names: say which portal
            raise Unavailable(
                f"login to {target} on portal {portal} failed ({exc.message}); check that the portal is "
                "reachable, then retry"
            ) from exc
        return rc == 0

    def logout(self, portal: str, target: str) -> bool:
        rc, _ = self._run(
            [*self._node(portal, target), "--logout"], {0: "ok", ISCSI_ERR_NO_OBJS_FOUND: "gone"}
        )
        return rc == 0

    def sessions(self) -> list[Session]:
        _, out = self._run(["-m", "session"], {0: "ok", ISCSI_ERR_NO_OBJS_FOUND: "none"})
        return parse_sessions(out)

    def session_details(self) -> list[SessionDetail]:
        _, out = self._run(["-m", "session", "-P", "3"], {0: "ok", ISCSI_ERR_NO_OBJS_FOUND: "none"})
        return parse_session_details(out)

    def nodes(self) -> list[Node]:
        _, out = self._run(["-m", "node"], {0: "ok", ISCSI_ERR_NO_OBJS_FOUND: "none"})
        return parse_nodes(out)

    def rescan_session(self, sid: int) -> None:
        self._run(["-m", "session", "-r", str(sid), "--rescan"])


def _translate(exc: CommandFailed) -> Exception:
    rc = exc.returncode
    if rc == ISCSI_ERR_LOGIN_AUTH_FAILED:
        return PermissionDenied("the target refused the CHAP credentials (iscsiadm exit 24)")
    if rc == ISCSI_ERR_FATAL_LOGIN:
        return NotFound("the target refused the login: not exported to this initiator (iscsiadm exit 19)")
    if rc == ISCSI_ERR_ISCSID_NOTCONN:
        return Unavailable("iscsid is not running (iscsiadm exit 20); start it and retry")
    if rc == ISCSI_ERR_TRANS_NOT_FOUND:
        return Unavailable("the iscsi_tcp transport is missing (iscsiadm exit 12); modprobe iscsi_tcp")
    if rc == ISCSI_ERR_IDBM:
        return Unavailable("the iSCSI node database stayed busy (iscsiadm exit 6); retry")
    return exc
