"""The path supervisor on fakes (a sysfs tree, a kernel-like connector whose sessions live in it, a
FakeClock): a lost session is logged in again at once; a FAILED one is left to iscsid for one interval,
then logged out and in again, one path at a time; healthy paths, the map and records being attached
or detached are never touched; PATH_DOWN and PATH_UP go to the event bus once per transition."""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blockwire.errors import InvalidArgument, Unavailable
from blockwire.model import ConnectionInfo, Connector, Transport
from hostagent.api import HostAgent
from hostagent.config import AgentConfig, config_from_mapping
from hostagent.connectors.base import iscsi_of
from hostagent.events import EventBus, Subscription
from hostagent.host.sysfs import Sysfs
from hostagent.journal import Journal
from hostagent.model import ConnectorKind, EventType, HostDevice
from hostagent.pathcheck import PathSupervisor, session_states
from tests.fakes.clock import FakeClock
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.storage_api import FakeStorage
from tests.unit.hostagent.conftest import HOST_IQN, PORTALS, TARGET, WWN, two_paths

RECORDED = Path(__file__).parents[2] / "data" / "recorded" / "sysfs_iscsi_session.txt"


@dataclass
class Sessions:
    """Kernel iSCSI sessions as sysfs shows them, under `root`."""

    root: Path
    next_sid: int = 1
    sids: dict[str, int] = field(default_factory=dict)  # portal -> sid

    def add(self, portal: str, state: str = "LOGGED_IN") -> None:
        sid, self.next_sid = self.next_sid, self.next_sid + 1
        self.sids[portal] = sid
        s = self.root / "class" / "iscsi_session" / f"session{sid}"
        c = self.root / "class" / "iscsi_connection" / f"connection{sid}:0"
        s.mkdir(parents=True)
        c.mkdir(parents=True)
        (s / "targetname").write_text(TARGET + "\n")
        (s / "state").write_text(state + "\n")
        address, port = portal.rsplit(":", 1)
        (c / "persistent_address").write_text(address + "\n")
        (c / "persistent_port").write_text(port + "\n")

    def set(self, portal: str, state: str) -> None:
        (self.root / "class" / "iscsi_session" / f"session{self.sids[portal]}" / "state").write_text(state)

    def remove(self, portal: str) -> None:
        sid = self.sids.pop(portal)
        for d in (f"iscsi_session/session{sid}", f"iscsi_connection/connection{sid}:0"):
            for f in (self.root / "class" / d).iterdir():
                f.unlink()
            (self.root / "class" / d).rmdir()


@dataclass
class KernelSessions:
    """A kernel connector over `Sessions`: restore logs in the paths without a session (when the target
    is exported), relogin logs a path out first."""

    sessions: Sessions
    kind: ConnectorKind = ConnectorKind.ISCSI_KERNEL
    exported: bool = True
    calls: list[str] = field(default_factory=list)

    def validate(self, info: ConnectionInfo) -> None:
        pass

    def connect(self, info: ConnectionInfo) -> HostDevice:
        self.calls.append("connect")
        for p in PORTALS:
            self.sessions.add(p)
        return HostDevice(path="/dev/dm-0", wwn=WWN, path_devices=("/dev/sda", "/dev/sdb"))

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        self.calls.append("disconnect")

    def extend(self, info: ConnectionInfo) -> int:
        return 0

    def paths(self, info: ConnectionInfo) -> list[str]:
        return [f"/dev/sd{p}" for p in self.sessions.sids]

    def restore_paths(self, info: ConnectionInfo) -> list[str]:
        missing = [p for p in PORTALS if p not in self.sessions.sids]
        self.calls.append(f"restore {' '.join(missing)}")
        if not self.exported:
            raise Unavailable("iscsiadm exited with 24: target not found")
        for p in missing:
            self.sessions.add(p)
        return [f"/dev/sdx{p[-6]}" for p in missing]

    def relogin_paths(self, info: ConnectionInfo, portals: Collection[str]) -> list[str]:
        self.calls.append(f"logout {' '.join(portals)}")
        for p in portals:
            self.sessions.remove(p)
        return self.restore_paths(info)

    def expected_paths(self, info: ConnectionInfo) -> int:
        return len(iscsi_of(info).paths)


@dataclass
class Rig:
    agent: HostAgent
    conn: KernelSessions
    sessions: Sessions
    clock: FakeClock
    supervisor: PathSupervisor
    events: Subscription

    def drained(self) -> list[tuple[EventType, str]]:
        out = []
        while (e := self.events.get(0)) is not None:
            out.append((e.type, e.path))
        return out


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    sessions = Sessions(tmp_path / "sys")
    conn = KernelSessions(sessions)
    hv = FakeHypervisor()
    hv.add_domain("vm1")
    clock = FakeClock()
    agent = HostAgent(
        hypervisor=hv,
        connectors={Transport.ISCSI: conn},
        journal=Journal(tmp_path / "state"),
        connector=Connector(host="host-a", initiator_iqn=HOST_IQN, transports=(Transport.ISCSI,)),
        clock=clock,
        storage=FakeStorage(infos={"vol-1": two_paths()}),
        events=EventBus(),
    )
    agent.attach("vm1", volume_id="vol-1")
    conn.calls.clear()
    sup = PathSupervisor(agent, Sysfs(tmp_path / "sys"), clock, 5.0)
    assert sup.check() == []  # both paths seen LOGGED_IN
    return Rig(agent, conn, sessions, clock, sup, agent.events.subscribe())


def test_session_states_from_the_recorded_sysfs(tmp_path: Path) -> None:
    for line in RECORDED.read_text().splitlines():
        rel, _, value = line.partition(": ")
        f = tmp_path / "class" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(value + "\n")
    states = session_states(Sysfs(tmp_path))
    assert states[("127.0.0.1:3260", "iqn.2024-01.test.blockwire:rec1")] == "LOGGED_IN"
    assert set(states.values()) == {"LOGGED_IN"}
    recorded = {rel.split("/")[1] for rel in RECORDED.read_text().split() if rel.startswith("iscsi_session/")}
    assert len(states) == len(recorded)


def test_healthy_paths_are_left_alone(rig: Rig) -> None:
    assert rig.supervisor.check() == []
    assert rig.conn.calls == []
    assert rig.drained() == []


def test_a_lost_session_is_logged_in_again_at_once(rig: Rig) -> None:
    rig.sessions.remove(PORTALS[1])
    assert rig.supervisor.check() == ["/dev/sdx2"]
    assert rig.conn.calls == [f"restore {PORTALS[1]}"]  # only that path; never connect or disconnect
    assert rig.drained() == [(EventType.PATH_DOWN, PORTALS[1]), (EventType.PATH_UP, PORTALS[1])]
    assert rig.supervisor.check() == []
    assert rig.drained() == []


def test_a_failed_session_gets_one_interval_of_iscsid_recovery_then_a_relogin(rig: Rig) -> None:
    for p in PORTALS:
        rig.sessions.set(p, "FAILED")
    assert rig.supervisor.check() == []  # first seen: iscsid may still recover it
    assert rig.conn.calls == []
    assert rig.drained() == [(EventType.PATH_DOWN, PORTALS[0]), (EventType.PATH_DOWN, PORTALS[1])]
    rig.clock.advance(5.0)
    assert rig.supervisor.check() == ["/dev/sdx1", "/dev/sdx2"]
    # one path at a time: the map keeps the other path while one is logged out and in
    assert rig.conn.calls == [f"logout {PORTALS[0]}", f"restore {PORTALS[0]}", f"logout {PORTALS[1]}",
                              f"restore {PORTALS[1]}"]  # fmt: skip
    assert rig.drained() == [(EventType.PATH_UP, PORTALS[0]), (EventType.PATH_UP, PORTALS[1])]
    assert set(session_states(rig.supervisor.sysfs).values()) == {"LOGGED_IN"}


def test_a_session_stuck_in_transition_is_relogged_after_three_intervals(rig: Rig) -> None:
    """Seen in the guest after a tgtd restart: one session left in a state that is neither LOGGED_IN
    nor FAILED for good; iscsid never finished it, and waiting on "a login in progress" never ended."""
    rig.sessions.set(PORTALS[1], "FREE")
    assert rig.supervisor.check() == []
    rig.clock.advance(10.0)
    assert rig.supervisor.check() == []  # two intervals: still iscsid's to finish
    assert rig.conn.calls == []
    rig.clock.advance(5.0)
    assert rig.supervisor.check() == ["/dev/sdx2"]
    assert rig.conn.calls == [f"logout {PORTALS[1]}", f"restore {PORTALS[1]}"]
    assert rig.drained() == [(EventType.PATH_DOWN, PORTALS[1]), (EventType.PATH_UP, PORTALS[1])]


def test_iscsid_recovering_by_itself_needs_no_relogin(rig: Rig) -> None:
    rig.sessions.set(PORTALS[0], "FAILED")
    rig.supervisor.check()
    rig.sessions.set(PORTALS[0], "LOGGED_IN")
    rig.clock.advance(5.0)
    assert rig.supervisor.check() == []
    assert rig.conn.calls == []
    assert rig.drained() == [(EventType.PATH_DOWN, PORTALS[0]), (EventType.PATH_UP, PORTALS[0])]


def test_a_target_still_missing_is_retried_every_round_and_announced_once(rig: Rig) -> None:
    rig.sessions.remove(PORTALS[0])
    rig.conn.exported = False
    for _ in range(3):
        assert rig.supervisor.check() == []
        rig.clock.advance(5.0)
    assert rig.conn.calls == [f"restore {PORTALS[0]}"] * 3
    assert rig.drained() == [(EventType.PATH_DOWN, PORTALS[0])]
    rig.conn.exported = True
    assert rig.supervisor.check() == ["/dev/sdx1"]
    assert rig.drained() == [(EventType.PATH_UP, PORTALS[0])]


def test_a_volume_with_a_call_in_flight_is_skipped_this_round(rig: Rig) -> None:
    rig.sessions.remove(PORTALS[0])
    with rig.agent.hold_volume("vol-1"):
        assert rig.supervisor.check() == []
    assert rig.conn.calls == []
    assert rig.supervisor.check() == ["/dev/sdx1"]


def test_a_path_never_seen_up_is_left_alone(rig: Rig, tmp_path: Path) -> None:
    rig.sessions.remove(PORTALS[0])  # as if that portal was down during the attach
    fresh = PathSupervisor(rig.agent, rig.supervisor.sysfs, rig.clock, 5.0)
    for _ in range(2):
        assert fresh.check() == []
        rig.clock.advance(5.0)
    assert rig.conn.calls == []
    assert rig.drained() == []


def test_a_failed_session_is_supervised_even_if_never_seen_logged_in(rig: Rig) -> None:
    rig.sessions.set(PORTALS[0], "FAILED")  # failed before the first check: it was logged in then
    fresh = PathSupervisor(rig.agent, rig.supervisor.sysfs, rig.clock, 5.0)
    assert fresh.check() == []
    rig.clock.advance(5.0)
    assert fresh.check() == ["/dev/sdx1"]
    assert rig.conn.calls == [f"logout {PORTALS[0]}", f"restore {PORTALS[0]}"]


def test_records_not_attached_are_not_touched(rig: Rig) -> None:
    rig.agent.detach("vm1", "vol-1")
    rig.conn.calls.clear()
    rig.sessions.remove(PORTALS[0])
    assert rig.supervisor.check() == []
    assert rig.conn.calls == []


def test_the_loop_runs_on_the_injected_waiter_and_stops(rig: Rig) -> None:
    done = threading.Event()
    waits: list[float] = []

    def waiter(stop: threading.Event, seconds: float) -> bool:
        waits.append(seconds)
        rig.clock.advance(seconds)
        if len(waits) == 2:  # after a first round that saw both paths up
            rig.sessions.remove(PORTALS[0])
        if len(waits) == 3:
            done.set()
            return stop.wait(30)
        return stop.is_set()

    sup = PathSupervisor(rig.agent, rig.supervisor.sysfs, rig.clock, 5.0, waiter=waiter)
    sup.start()
    assert done.wait(10)
    assert sup.stop(timeout=5)
    assert not sup.periodic.running
    assert waits == [5.0, 5.0, 5.0]
    assert rig.conn.calls == [f"restore {PORTALS[0]}"]


def test_path_check_interval_config() -> None:
    assert AgentConfig().path_check_interval == 5.0
    assert config_from_mapping({"path_check_interval": 0}).path_check_interval == 0.0
    with pytest.raises(InvalidArgument):
        config_from_mapping({"path_check_interval": -1.0})


def test_the_kernel_connector_can_relogin() -> None:
    from hostagent.connectors.iscsi import IscsiConnector  # noqa: PLC0415
    from hostagent.pathcheck import PathRelogin  # noqa: PLC0415

    assert issubclass(IscsiConnector, PathRelogin)


def test_relogin_logs_out_only_the_given_path_and_never_the_map(tmp_path: Path) -> None:
    from tests.unit.hostagent.test_scsi_connectors import Kernel, info, rig  # noqa: PLC0415

    kernel = Kernel(tmp_path / "sys")
    kernel.host(6)
    kernel.host(7)
    conn, runner, _ = rig(kernel)
    conn.relogin_paths(info(), ("127.0.0.2:3260",))
    logouts = [" ".join(c) for c in runner.ran(r"--logout")]
    assert len(logouts) == 1
    assert "-p 127.0.0.2:3260" in logouts[0]
    assert runner.ran(r"multipath -f|multipathd (del|remove)") == []
