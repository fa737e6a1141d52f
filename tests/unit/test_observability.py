"""Step names of commands, and the step observer's timing (also of the agent's and storage's Ceph reads)."""

from __future__ import annotations

import pytest

from blockwire.errors import Unavailable
from blockwire.observability import TimedRunner, step_of, timed
from blockwire.runtime.executor import CommandFailed
from blockwire.secret import Secret
from hostagent.host.ceph import CephAccess
from hostagent.timing import TimedCephProbe
from storagesvc.backends.rbd import ClusterError, TimedRbdCluster
from tests.fakes.ceph import FakeCeph
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.rbd import FakeRbd


@pytest.mark.parametrize(
    ("argv", "step"),
    [
        (["iscsiadm", "-m", "node", "-T", "iqn.x", "-p", "127.0.0.1:3260", "--login"], "login"),
        (["/usr/bin/iscsiadm", "-m", "node", "-T", "iqn.x", "-u"], "logout"),
        (["iscsiadm", "-m", "session", "-r", "3", "--rescan"], "rescan"),
        (["iscsiadm", "-m", "node", "-o", "new"], "node"),
        (["iscsiadm", "-m", "session", "-P", "3"], "session"),
        (["iscsi-inq", "-e", "1", "-c", "0x83", "iscsi://x"], "identity"),
        (["multipathd", "add", "map", "x"], "multipath"),
        (["tgtadm", "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1"], "tgt_target_new"),
        (["tgtadm", "--op"], "tgt_?_?"),
        (["qemu-img", "convert"], "qemu-img"),
        ([], "?"),
    ],
)
def test_step_of(argv: list[str], step: str) -> None:
    assert step_of(argv) == step


class Steps:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    def observe(self, step: str, seconds: float) -> None:
        self.seen.append((step, seconds))


def test_a_failed_command_is_timed_too_and_secrets_are_passed_through() -> None:
    clock, steps = FakeClock(), Steps()
    runner = FakeRunner().on(r"--logout", Reply(returncode=8, stderr="no session"))
    timed_runner = TimedRunner(runner, steps, clock)
    timed_runner.run(["iscsiadm", "-m", "node", "--login", "-v", Secret("pw")])
    with pytest.raises(CommandFailed):
        timed_runner.run(["iscsiadm", "-m", "node", "--logout"])
    assert [s for s, _ in steps.seen] == ["login", "logout"]
    assert runner.revealed[0][-1] == "pw"
    with timed(steps, clock, "hotplug"):
        clock.advance(0.25)
    assert steps.seen[-1] == ("hotplug", 0.25)


def test_the_rbd_identity_read_and_storage_cluster_sessions_are_timed_failed_or_not() -> None:
    clock, steps = FakeClock(), Steps()
    ceph = FakeCeph()
    ceph.add("rbd", "vol", "1a2b")
    probe = TimedCephProbe(ceph, steps, clock)
    assert probe.image(CephAccess(("127.0.0.1:6789",)), "rbd", "vol", 3.0).image_id == "1a2b"
    ceph.down = True
    with pytest.raises(Unavailable):
        probe.image(CephAccess(("127.0.0.1:6789",)), "rbd", "vol", 3.0)
    assert [s for s, _ in steps.seen] == ["rbd_identity", "rbd_identity"]

    rbd = FakeRbd()
    cluster = TimedRbdCluster(rbd, steps, clock)
    with cluster.session() as s:
        s.create("vol", 1 << 20)
        clock.advance(0.5)
        assert s.image_id("vol")
    rbd.down = True
    with pytest.raises(ClusterError), cluster.session():
        pass
    assert steps.seen[-2:] == [("rbd", 0.5), ("rbd", 0.0)]
