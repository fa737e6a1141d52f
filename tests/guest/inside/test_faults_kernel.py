"""Faults on the kernel path (kernel iSCSI + dm-multipath, through blockwire's daemons):

* tgtd restarts (forgets every target) while a volume is attached over two paths, and neither daemon
  is restarted: blockwire-storage's export supervisor rebuilds the export, the agent's path supervisor
  logs in again the sessions iscsid gave up on, multipath shows both paths active again in the same map
  and I/O through the map reaches the volume;
* a portal is down during AttachVolume: with two portals the attach succeeds on the other one (a map
  over one active path) and the detach leaves nothing; a volume whose only portal is down fails with
  UNAVAILABLE or DEADLINE_EXCEEDED naming the portal, and nothing is left (no node record, session,
  journal record or storage attachment).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.client import NO_RETRY, HostAgentClient
from blockwire.errors import DeadlineExceeded, Unavailable
from blockwire.v1 import types_pb2 as pb
from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack, start_stack
from tests.host.daemons import Tgtd

UP, DOWN = kernel.PORTALS


def _targets(tgtd: Tgtd, prefix: str) -> list[str]:
    out = tgtd.adm("--op", "show", "--mode", "target").stdout
    return [
        line.split()[2]
        for line in out.splitlines()
        if line.startswith("Target ") and line.split()[2].startswith(prefix + ":")
    ]


def _nothing_left(s: Stack, tgtd: Tgtd, volume_id: str) -> None:
    """No trace of the volume on the host (sessions, node records, disks, maps, links), among storage's
    attachments, or among tgtd's targets."""
    kernel.settle()
    assert kernel.leftovers() == {}
    assert s.storage.list_attachments(volume_id=volume_id) == []
    assert _targets(tgtd, s.prefix) == []


def _session_states(iqn: str) -> dict[str, str]:
    """SID -> the kernel's state of each session to `iqn` (LOGGED_IN, FAILED, ...)."""
    found = {}
    for d in Path("/sys/class/iscsi_session").glob("session*"):
        state = kernel.attr(d / "state")
        if kernel.attr(d / "targetname") == iqn and state is not None:
            found[d.name] = state
    return found


def _keep_state(name: str, iqn: str) -> None:
    """The sessions' and maps' state, into the run's results (results/logs/NAME)."""
    text = f"session states: {_session_states(iqn)}\n"
    for argv in (["iscsiadm", "-m", "session", "-P", "1"], ["multipath", "-ll"], ["dmesg"]):
        proc = kernel.run(argv, ok=range(256))
        text += f"\n$ {' '.join(argv)}\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    path = Path("/tmp", name)
    path.write_text(text)
    kernel.keep_log(path, name)


def _pids(s: Stack) -> tuple[int, int]:
    daemons = (s.storage_daemon.proc, s.agent_daemon.proc)
    assert all(p is not None and p.poll() is None for p in daemons), "a daemon is not running"
    return tuple(p.pid for p in daemons if p is not None)  # type: ignore[return-value]


@pytest.fixture
def portal_down(tgtd: Tgtd) -> Iterator[str]:
    """tgtd stops listening on DOWN (connections to it are refused) for the test; back afterwards."""
    tgtd.adm("--op", "delete", "--mode", "portal", "--param", f"portal={DOWN}")
    try:
        yield DOWN
    finally:
        tgtd.adm("--op", "new", "--mode", "portal", "--param", f"portal={DOWN}", check=False)


@pytest.fixture(scope="module")
def one_portal_stack(tgtd: Tgtd, libvirtd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Both daemons again, with a tgt exporter on DOWN only: its volumes have a single path."""
    workdir = tmp_path_factory.mktemp("stack-one-portal")
    stack = start_stack(
        workdir,
        f'[[backends]]\nname = "file"\nkind = "file"\npath = "{workdir}/backend"\nexporter = "tgt"\n'
        f'[exporters.tgt]\nkind = "tgt"\nportals = ["{DOWN}"]\ncontrol_port = {tgtd.control_port}\n',
    )
    yield stack
    stack.stop()


def test_tgtd_restart_while_attached_recovers_without_restarting_a_daemon(
    clean_host: None, tgt_stack: Stack, tgtd: Tgtd, domain: str
) -> None:
    s = tgt_stack
    vol = s.storage.create_volume(f"fault-tgtd-{uuid.uuid4().hex[:6]}", 32 * kernel.MiB, backend="file")
    attached = False
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        attached = True
        iqn = att.connection_info.iscsi.paths[0].target_iqn
        wwid = f"3{att.connection_info.wwn}"
        name = kernel.map_for(wwid)
        assert name
        kernel.wait_until("two active paths", lambda: len(kernel.active_paths(wwid)) == 2, 60)
        before = kernel.write_pattern(att.host_device, 1)

        pids = _pids(s)
        started = time.monotonic()
        tgtd.restart()  # forgets the export; nothing restarts blockwire's daemons
        seen: set[str] = set()

        def exported_again() -> bool:
            seen.update(_session_states(iqn).values())
            return _targets(tgtd, s.prefix) == [iqn]

        def both_logged_in() -> bool:
            states = list(_session_states(iqn).values())
            seen.update(states)
            return states == ["LOGGED_IN"] * 2

        kernel.wait_until("storage exports the volume again", exported_again, 30, every=0.2)
        exported_s = time.monotonic() - started
        try:
            kernel.wait_until("both sessions LOGGED_IN again", both_logged_in, 90, every=0.5)
        except AssertionError:
            _keep_state("tgtd-restart-sessions.txt", iqn)
            raise
        kernel.wait_until("two active paths again", lambda: len(kernel.active_paths(wwid)) == 2, 120, 0.5)
        recovered_s = time.monotonic() - started
        shown = kernel.run(["multipath", "-ll", name]).stdout
        assert shown.count("active ready running") == 2, shown
        assert sorted(kernel.session_ids(iqn)) == sorted(kernel.PORTALS)
        assert kernel.map_for(wwid) == name  # the same map, never torn down
        assert kernel.read_at(att.host_device, 1) == before
        after = kernel.write_pattern(att.host_device, 3)
        assert kernel.read_at(s.volume_file(vol.id), 3) == after

        s.agent.detach_volume(domain, vol.id)
        attached = False
        assert kernel.domain_disks(domain) == []
        _nothing_left(s, tgtd, vol.id)
        assert _pids(s) == pids  # neither daemon was restarted
        print(f"export rebuilt {exported_s:.1f}s after the tgtd restart (sessions seen {sorted(seen)}); "
              f"both paths active again after {recovered_s:.1f}s")  # fmt: skip
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)


def test_a_portal_down_during_attach_the_other_path_serves_then_nothing_left(
    clean_host: None, tgt_stack: Stack, tgtd: Tgtd, domain: str, portal_down: str
) -> None:
    s = tgt_stack
    vol = s.storage.create_volume(f"fault-portal-{uuid.uuid4().hex[:6]}", 32 * kernel.MiB, backend="file")
    attached = False
    try:
        started = time.monotonic()
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        attach_s = time.monotonic() - started
        attached = True
        ci = att.connection_info
        assert sorted(p.portal for p in ci.iscsi.paths) == sorted(kernel.PORTALS)
        iqn = ci.iscsi.paths[0].target_iqn
        wwid = f"3{ci.wwn}"
        assert list(kernel.session_ids(iqn)) == [UP]
        name = kernel.map_for(wwid)
        assert name
        assert att.host_device == f"/dev/{kernel.dm_device(name)}"
        assert len(kernel.map_slaves(name)) == 1
        kernel.wait_until("one active path", lambda: len(kernel.active_paths(wwid)) == 1, 60)
        assert not kernel.by_path_link(portal_down, iqn, ci.iscsi.paths[0].lun).exists()
        disk = next(d for d in kernel.domain_disks(domain) if d.target == att.target_dev)
        assert disk.source == att.host_device
        pattern = kernel.write_pattern(att.host_device, 4)
        assert kernel.read_at(s.volume_file(vol.id), 4) == pattern

        s.agent.detach_volume(domain, vol.id)
        attached = False
        assert kernel.domain_disks(domain) == []
        _nothing_left(s, tgtd, vol.id)
        print(f"attach with {portal_down} down: {attach_s:.1f}s")
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)


def test_the_only_portal_down_fails_clearly_and_leaves_nothing(
    clean_host: None, one_portal_stack: Stack, tgtd: Tgtd, domain: str, portal_down: str
) -> None:
    s = one_portal_stack
    vol = s.storage.create_volume(f"fault-single-{uuid.uuid4().hex[:6]}", 32 * kernel.MiB, backend="file")
    try:
        before = kernel.domain_xml(domain)
        started = time.monotonic()
        # No client retries: one AttachVolume, its own error.
        with (
            HostAgentClient(f"unix://{s.agent_daemon.socket}", retry=NO_RETRY) as agent,
            pytest.raises((Unavailable, DeadlineExceeded)) as err,
        ):
            agent.attach_volume(domain, volume_id=vol.id)
        failed_s = time.monotonic() - started
        assert portal_down in err.value.message, err.value.message
        assert kernel.domain_xml(domain) == before
        assert s.agent.list_attachments() == []
        assert not list((s.workdir / "agent-state" / "attachments").glob("*.json"))
        _nothing_left(s, tgtd, vol.id)
        assert s.storage.get_volume(vol.id).state == pb.VOLUME_STATE_AVAILABLE
        print(f"failed in {failed_s:.1f}s: {err.value.code}: {err.value.message}")
    finally:
        s.storage.delete_volume(vol.id)
