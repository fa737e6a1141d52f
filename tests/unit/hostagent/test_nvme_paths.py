"""The path supervisor on NVMe/TCP attachments (fake kernel): a controller the kernel is reconnecting is
reported down and up again without any action; a port whose controller is gone is connected again; a
path whose ANA state makes the namespace unusable is reported down, and up when it is usable again."""

from __future__ import annotations

from pathlib import Path

from hostagent.host.sysfs import Sysfs
from hostagent.model import EventType
from hostagent.pathcheck import PathSupervisor
from tests.unit.hostagent.test_nvme import P2
from tests.unit.hostagent.test_nvme_agent import NvmeRig


def test_a_reconnecting_controller_is_reported_and_a_gone_one_restored(tmp_path: Path) -> None:
    r = NvmeRig(tmp_path)
    events = r.agent.events.subscribe()
    r.agent.attach("vm1", volume_id="vol-1")
    sup = PathSupervisor(r.agent, Sysfs(tmp_path / "sys"), r.clock, 5.0)

    def drained() -> list[tuple[EventType, str]]:
        out = []
        while (e := events.get(0)) is not None:
            if e.type in (EventType.PATH_DOWN, EventType.PATH_UP):
                out.append((e.type, e.path))
        return out

    assert sup.check() == []
    drained()
    # the controller of P2 (the two are made in parallel: either may be nvme1)
    c2 = next(c["name"] for c in r.kernel.controllers() if "traddr=127.0.0.2," in c["address"])
    r.kernel.set_state(c2, "connecting")
    assert sup.check() == []
    assert drained() == [(EventType.PATH_DOWN, P2)]
    assert len(r.kernel.written) == 2  # nothing done: the kernel reconnects by itself
    r.kernel.set_state(c2, "live")
    sup.check()
    assert drained() == [(EventType.PATH_UP, P2)]
    r.kernel.drop(c2)  # the kernel gave up (ctrl_loss_tmo)
    assert sup.check() == ["/dev/nvme2"]
    assert len(r.kernel.controllers()) == 2
    sup.check()
    assert drained() == [(EventType.PATH_DOWN, P2), (EventType.PATH_UP, P2)]
    r.agent.detach("vm1", "vol-1")
    assert sup.check() == []
    r.nothing_left()


def test_ana_states_are_followed_without_touching_the_controllers(tmp_path: Path) -> None:
    r = NvmeRig(tmp_path)
    events = r.agent.events.subscribe()
    r.agent.attach("vm1", volume_id="vol-1")
    sup = PathSupervisor(r.agent, Sysfs(tmp_path / "sys"), r.clock, 5.0)
    sup.check()

    def drained() -> list[tuple[EventType, str, str]]:
        out = []
        while (e := events.get(0)) is not None:
            if e.type in (EventType.PATH_DOWN, EventType.PATH_UP):
                out.append((e.type, e.path, e.message))
        return out

    drained()
    c2 = next(c["name"] for c in r.kernel.controllers() if "traddr=127.0.0.2," in c["address"])
    r.kernel.set_ana(c2, 1, "inaccessible")
    assert sup.check() == []
    assert drained() == [(EventType.PATH_DOWN, P2, "NVMe namespace ANA state inaccessible")]
    assert sup.paths() == (1, 1)
    sup.check()
    assert drained() == []  # reported once
    r.kernel.set_ana(c2, 1, "non-optimized")
    sup.check()
    assert drained() == [(EventType.PATH_UP, P2, "NVMe controller live, ANA state non-optimized")]
    assert sup.paths() == (2, 0)
    assert len(r.kernel.written) == 2  # no connect, no delete: the kernel routes I/O by ANA itself
    assert len(r.kernel.controllers()) == 2
    r.agent.detach("vm1", "vol-1")
    r.nothing_left()
