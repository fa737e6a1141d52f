"""Node-database work of the kernel iSCSI connector: one `-T IQN -o delete` for all portals of a target
whose sessions are all gone, and the agent's node-database writes one at a time (open-iscsi answers
writers that meet in its lock with exit 6, which cost retries and sleeps)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from blockwire.errors import NotFound
from blockwire.model import ConnectionInfo, IscsiConnection, IscsiPath
from hostagent.tools.iscsiadm import Iscsiadm
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.unit.hostagent.test_scsi_connectors import (
    HOST_IQN,
    TARGET,
    TARGET_DELETE,
    Kernel,
    info,
    kernel,
    rig,
)

__all__ = ["kernel"]  # the fixture, shared with test_scsi_connectors

WRITES = r"-o (new|update|delete)"


def contended_runner() -> tuple[FakeRunner, list[int]]:
    """A runner whose node-database writes fail with exit 6 when another write is in flight (what
    open-iscsi's idbm lock does to writers that meet), each write taking a few ms."""
    guard = threading.Lock()
    in_flight = [0]
    refused: list[int] = []

    def write(argv: tuple[str, ...]) -> Reply:
        with guard:
            if in_flight[0]:
                refused.append(1)
                return Reply(6, stderr="iscsiadm: Could not lock discovery DB")
            in_flight[0] += 1
        try:
            time.sleep(0.003)
            return Reply()
        finally:
            with guard:
                in_flight[0] -= 1

    return FakeRunner().on(WRITES, write), refused


def test_parallel_node_database_writes_never_meet_in_open_iscsis_lock() -> None:
    runner, refused = contended_runner()
    adm = Iscsiadm(runner, FakeClock())
    targets = [f"iqn.2024-01.test.blockwire:vol{i}" for i in range(16)]

    def cycle(target: str) -> None:
        for portal in ("127.0.0.1:3260", "127.0.0.2:3260"):
            adm.node_new(portal, target)
            adm.node_update_many(portal, target, [("node.startup", "manual")])
        adm.target_delete(target)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(cycle, targets))
    assert refused == []  # no exit 6, so no retry and no backoff sleep
    assert len(runner.ran(WRITES)) == 16 * 5  # exactly one run per write
    assert len(runner.ran(r"-o delete")) == 16  # one per target, not one per portal
    assert all("-p" not in c for c in runner.ran(r"-o delete"))


def test_target_delete_of_a_target_without_records_is_ok() -> None:
    runner = FakeRunner().on(r"-o delete", Reply(21, stderr="iscsiadm: No records found"))
    assert Iscsiadm(runner, FakeClock()).target_delete(TARGET) is False


def test_two_path_disconnect_deletes_the_targets_records_in_one_run(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    conn.connect(info())
    conn.disconnect(info())
    assert len(runner.ran(r"--logout")) == 2
    assert runner.ran(r"-o delete") == [TARGET_DELETE]


def test_a_session_to_the_target_on_another_portal_keeps_its_record(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    conn.connect(info())
    kernel.add_session(9, 9, "127.0.0.3")  # another program's session to the same target
    conn.disconnect(info())
    # the volume's two records, each alone: a per-target delete would take the third portal's too
    assert sorted(c[6] for c in runner.ran(r"-o delete")) == ["127.0.0.1:3260", "127.0.0.2:3260"]
    assert all(c[5] == "-p" for c in runner.ran(r"-o delete"))


def third_portal() -> ConnectionInfo:
    return ConnectionInfo(
        transport=IscsiConnection(paths=(IscsiPath("127.0.0.3:3260", TARGET, 2),), initiator_iqn=HOST_IQN),
        volume_id="vol-2",
        wwn="",
    )


def test_a_connect_in_flight_to_the_target_keeps_the_records_it_uses(kernel: Kernel) -> None:
    conn, runner, _ = rig(kernel)
    conn.connect(info())
    logging_in, release = threading.Event(), threading.Event()

    def slow_login(argv: tuple[str, ...]) -> Reply:
        logging_in.set()
        assert release.wait(10)
        return Reply(19, stderr="iscsiadm: target not found")

    runner.on(r"-p 127.0.0.3:3260 --login", slow_login)
    with ThreadPoolExecutor(max_workers=1) as pool:
        other = pool.submit(conn.connect, third_portal())  # vol-2's record on 127.0.0.3 is in use
        assert logging_in.wait(10)
        conn.disconnect(info())
        deletes = runner.ran(r"-o delete")
        assert sorted(c[6] for c in deletes) == ["127.0.0.1:3260", "127.0.0.2:3260"]  # never -T alone
        release.set()
        with pytest.raises(NotFound):
            other.result(10)
    # vol-2's failed connect cleans up: nothing is connecting to the target any more, no session is
    # left to it, so its records go in one run
    assert runner.ran(r"-o delete")[2:] == [TARGET_DELETE]
