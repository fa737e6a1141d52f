"""PathSupervisor: keeps the kernel iSCSI sessions of attached volumes logged in.

When a target restarts (tgtd forgets its targets until storage rebuilds them), the kernel marks the
sessions FAILED and iscsid reconnects; a reconnect that meets "target not found" makes iscsid give up,
and the session stays FAILED with its disk offline until someone logs it in again. Like multipathd's
path checker, this is supervision in the background, not a wait in the attach path: every `interval`
seconds it reads the sessions' state from sysfs (/sys/class/iscsi_session/session*/state) and, for each
ATTACHED kernel iSCSI record of the journal, finds its paths whose session is FAILED, or gone after it
was seen (LOGGED_IN or FAILED: a FAILED session was logged in before). A path never seen with a session,
such as a portal down during the attach, is left alone: a login to it would hold the volume's lock for
the whole login timeout at every round; reconcile at start and a new attach deal with it.

* PATH_DOWN is published once per path when it is first seen down, PATH_UP when it is LOGGED_IN again;
* a path without a session is logged in again at once (`restore_paths`);
* a FAILED session is left to iscsid's own recovery for one interval; still FAILED after that, it is
  logged out and that path logged in again (`relogin_paths`), one path at a time.

NVMe/TCP attachments (ConnectorKind.NVME_TCP) are watched too, with less to do: the kernel reconnects a
lost controller by itself (every reconnect_delay, until ctrl_loss_tmo), so a controller that is not
`live` (connecting, resetting) only gets PATH_DOWN, and PATH_UP when it is live again; a port whose
controller is gone (the kernel gave up, or it was deleted) after it was seen is connected again
(`restore_paths`), that port only. ANA is followed the same way: a live controller over which the
volume's namespace is `inaccessible`, `persistent-loss` or in `change` (the target moved its ANA group,
e.g. a port under maintenance) is a path down, and up again when the namespace is `optimized` or
`non-optimized` there; the kernel's native multipath already sends I/O only to usable paths, so there
is nothing to repair, only to report (an operator sees which paths carry I/O).

Each repair takes the volume's lock (a call in flight on it: skipped until the next round) and the
connector's per-target locks; the multipath map and the healthy paths are never touched. An interval of
0 disables it; `stop()` ends the thread within a bound.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Protocol, runtime_checkable

from blockwire.errors import BlockwireError
from blockwire.model import ConnectionInfo, IscsiConnection, NvmeofConnection
from blockwire.runtime.clock import Clock
from blockwire.runtime.periodic import Periodic, Waiter, event_wait
from hostagent.api import HostAgent, PathRestorer
from hostagent.host.iscsi_sessions import kernel_sessions
from hostagent.host.nvme import NvmeHost
from hostagent.host.sysfs import Sysfs
from hostagent.model import AttachmentState, ConnectorKind, EventType, JournalRecord

log = logging.getLogger(__name__)

LOGGED_IN = "LOGGED_IN"
FAILED = "FAILED"
TRANSITION_INTERVALS = 3  # intervals a session may stay in a state other than LOGGED_IN or FAILED


@runtime_checkable
class PathRelogin(Protocol):
    def relogin_paths(self, info: ConnectionInfo, portals: Collection[str]) -> list[str]: ...


def session_states(sysfs: Sysfs) -> dict[tuple[str, str], str]:
    """(portal, target IQN) -> the kernel's session state (LOGGED_IN, FAILED, FREE), from sysfs."""
    return {(s.portal, s.target): s.state for s in kernel_sessions(sysfs)}


#: ANA states over which the namespace takes no I/O (NVMe base spec 8.1.3; the kernel's names).
ANA_UNUSABLE = frozenset({"inaccessible", "persistent-loss", "change"})


class PathSupervisor:
    def __init__(
        self, agent: HostAgent, sysfs: Sysfs, clock: Clock, interval: float, *, waiter: Waiter = event_wait
    ) -> None:
        self.agent = agent
        self.sysfs = sysfs
        self.clock = clock
        self.interval = interval
        self.periodic = Periodic("path-supervisor", interval, self.check, waiter=waiter)
        self._down: dict[tuple[str, str, str], float] = {}  # (volume, domain, portal) -> first seen down
        self._seen_up: set[tuple[str, str, str]] = set()  # paths seen LOGGED_IN: the ones supervised

    def start(self) -> None:
        if self.interval:
            log.info("path supervisor: checking kernel iSCSI sessions every %.1fs", self.interval)
        self.periodic.start()

    def stop(self, timeout: float = 10.0) -> bool:
        return self.periodic.stop(timeout)

    def paths(self) -> tuple[int, int]:
        """(up, down): the supervised paths as the last round saw them."""
        return len(self._seen_up - self._down.keys()), len(self._down)

    def check(self) -> list[str]:
        """One round; returns the devices added by the paths it logged in again."""
        states = session_states(self.sysfs)
        added: list[str] = []
        watched: set[tuple[str, str, str]] = set()
        for a in self.agent.journal.all():
            t = a.connection_info.transport
            if a.state is not AttachmentState.ATTACHED or a.connector_kind is not ConnectorKind.ISCSI_KERNEL:
                continue
            if not isinstance(t, IscsiConnection):
                continue
            gone, failed = [], []
            for p in t.paths:
                key = (a.volume_id, a.domain, p.portal)
                watched.add(key)
                state = states.get((p.portal, p.target_iqn))
                if state == LOGGED_IN:
                    self._seen_up.add(key)
                    self._up(a, key)
                    continue
                if state == FAILED:
                    self._seen_up.add(key)  # it was logged in before it failed
                if key not in self._seen_up:
                    continue  # never up: a login of the attach itself may be under way
                first = self._down_since(a, key, state or "gone")
                # FAILED gets one interval of iscsid's own recovery; any other state (FREE: a login or
                # logout in progress) gets TRANSITION_INTERVALS, then counts as failed too: iscsid can
                # leave a session in it for good after a target restart.
                grace = self.interval * (1 if state == FAILED else TRANSITION_INTERVALS)
                if state is None:
                    gone.append(p.portal)
                elif self.clock.monotonic() - first >= grace:
                    failed.append(p.portal)
            if gone or failed:
                added += self._repair(a, gone, failed)
        added += self._check_nvme(watched)
        for key in set(self._down) - watched:  # detached meanwhile
            del self._down[key]
        self._seen_up &= watched
        return added

    def _check_nvme(self, watched: set[tuple[str, str, str]]) -> list[str]:
        """The NVMe/TCP round: events for controllers not live; a port whose controller is gone after it
        was seen is connected again."""
        records = [
            a for a in self.agent.journal.all()
            if a.state is AttachmentState.ATTACHED and a.connector_kind is ConnectorKind.NVME_TCP
        ]  # fmt: skip
        if not records:
            return []
        host = NvmeHost(self.sysfs)
        ctrls = {(c.subsysnqn, f"{c.traddr}:{c.trsvcid}"): c for c in host.controllers()}
        added: list[str] = []
        for a in records:
            t = a.connection_info.transport
            if not isinstance(t, NvmeofConnection):
                continue
            gone = False
            for p in t.portals:
                key = (a.volume_id, a.domain, p.address)
                watched.add(key)
                c = ctrls.get((t.subsystem_nqn, p.address))
                state = c.state if c is not None else None
                if c is not None and state == "live":
                    self._seen_up.add(key)
                    ana = host.ana_state_via(c.name, t.namespace_id) if t.namespace_id else ""
                    if ana in ANA_UNUSABLE:
                        self._down_since(a, key, f"ANA state {ana}", "NVMe namespace")
                    else:
                        self._up(a, key, f"NVMe controller live{f', ANA state {ana}' if ana else ''}")
                    continue
                if state is not None:
                    self._seen_up.add(key)  # it exists: it was connected
                if key not in self._seen_up:
                    continue
                self._down_since(a, key, state or "gone", "NVMe controller")
                gone = gone or state is None
            if gone:
                added += self._restore_nvme(a)
        return added

    def _restore_nvme(self, a: JournalRecord) -> list[str]:
        conn = self.agent.connector_of_kind(ConnectorKind.NVME_TCP)
        if not isinstance(conn, PathRestorer):
            return []
        try:
            with self.agent.hold_volume(a.volume_id):
                current = self.agent.journal.get(a.volume_id, a.domain)
                if current is None or current.state is not AttachmentState.ATTACHED:
                    return []
                log.warning("%s@%s: connecting the ports whose controller is gone", a.volume_id, a.domain)
                return conn.restore_paths(current.connection_info)
        except BlockwireError as exc:
            log.warning("%s@%s: restoring paths failed (next round in %.1fs): %s",
                        a.volume_id, a.domain, self.interval, exc.message)  # fmt: skip
            return []

    def _down_since(
        self, a: JournalRecord, key: tuple[str, str, str], state: str, what: str = "iSCSI session"
    ) -> float:
        """When the path was first seen down; PATH_DOWN is published then."""
        if key not in self._down:
            self._down[key] = self.clock.monotonic()
            log.warning("%s@%s: path %s is down (%s %s)", a.volume_id, a.domain, key[2], what, state)
            self.agent.emit(EventType.PATH_DOWN, a, path=key[2], message=f"{what} {state}")
        return self._down[key]

    def _up(
        self, a: JournalRecord, key: tuple[str, str, str], message: str = "iSCSI session logged in"
    ) -> None:
        if self._down.pop(key, None) is not None:
            log.info("%s@%s: path %s is up again", a.volume_id, a.domain, key[2])
            self.agent.emit(EventType.PATH_UP, a, path=key[2], message=message)

    def _repair(self, a: JournalRecord, gone: list[str], failed: list[str]) -> list[str]:
        conn = self.agent.connector_of_kind(ConnectorKind.ISCSI_KERNEL)
        if not isinstance(conn, PathRestorer):
            return []
        added: list[str] = []
        try:
            with self.agent.hold_volume(a.volume_id):
                current = self.agent.journal.get(a.volume_id, a.domain)
                if current is None or current.state is not AttachmentState.ATTACHED:
                    return []
                info = current.connection_info
                if gone:
                    log.warning("%s@%s: logging in again %s", a.volume_id, a.domain, ", ".join(gone))
                    added += conn.restore_paths(info)
                if failed and isinstance(conn, PathRelogin):
                    for portal in failed:  # one at a time: the map keeps its other paths meanwhile
                        log.warning("%s@%s: session on %s stays FAILED: logging it out and in again",
                                    a.volume_id, a.domain, portal)  # fmt: skip
                        added += conn.relogin_paths(info, (portal,))
        except BlockwireError as exc:
            log.warning("%s@%s: restoring paths failed (next round in %.1fs): %s",
                        a.volume_id, a.domain, self.interval, exc.message)  # fmt: skip
            return added
        states = session_states(self.sysfs)
        t = a.connection_info.transport
        assert isinstance(t, IscsiConnection)
        for p in t.paths:
            if p.portal in (*gone, *failed) and states.get((p.portal, p.target_iqn)) == LOGGED_IN:
                self._up(a, (a.volume_id, a.domain, p.portal))
        return added
