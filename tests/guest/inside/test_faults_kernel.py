"""Faults on the kernel path (kernel iSCSI + dm-multipath, through blockwire's daemons):

* tgtd restarts (forgets every target) while a volume is attached over two paths: blockwire-storage,
  restarted, exports it again; iscsid reconnects both sessions by itself, multipath shows both paths
  active again and I/O through the map reaches the volume;
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

from blockwire.client import NO_RETRY, HostAgentClient, StorageClient
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


def _session_states(iqn: str) -> dict[str, str]:
    """SID -> the kernel's state of each session to `iqn` (LOGGED_IN, FAILED, ...)."""
    found = {}
    for d in Path("/sys/class/iscsi_session").glob("session*"):
        if (d / "targetname").read_text().strip() == iqn:
            found[d.name] = (d / "state").read_text().strip()
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


def _restart_storage(s: Stack) -> None:
    s.storage.close()
    s.storage_daemon.stop()
    s.storage_daemon.start()
    s.storage = StorageClient(f"unix://{s.storage_daemon.socket}")


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


@pytest.mark.xfail(
    strict=False,
    reason="races open-iscsi: the sessions' recovery meets 'target not found' from the restarted tgtd "
    "until storage re-exports; in one of two runs iscsid stopped reconnecting and the sessions stayed "
    "FAILED (no reconnect within 180 s), in the other both were LOGGED_IN again 19 s after the tgtd "
    "restart. blockwire does not yet log such sessions in again. When it fails, the sessions' state is "
    "kept in results/logs/tgtd-restart-sessions.txt",
)
def test_tgtd_restart_while_attached_sessions_recover_after_storage_reexports(
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

        started = time.monotonic()
        tgtd.restart()
        assert _targets(tgtd, s.prefix) == []  # tgtd forgot the export
        # The kernel notices: both sessions fail, multipath fails both paths.
        kernel.wait_until(
            "both sessions FAILED", lambda: set(_session_states(iqn).values()) == {"FAILED"}, 60
        )
        failed_s = time.monotonic() - started
        while_failed = [p for p in kernel.map_paths() if p.wwid == wwid]

        _restart_storage(s)  # its reconcile exports the attached volume again
        assert _targets(tgtd, s.prefix) == [iqn]
        try:
            kernel.wait_until(
                "both sessions LOGGED_IN again",
                lambda: list(_session_states(iqn).values()) == ["LOGGED_IN"] * 2,
                90,
                every=0.5,
            )
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
        kernel.settle()
        assert kernel.leftovers() == {}
        assert s.storage.list_attachments(volume_id=vol.id) == []
        assert _targets(tgtd, s.prefix) == []
        print(f"sessions failed {failed_s:.1f}s after the tgtd restart (paths then: {while_failed}); "
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
        kernel.settle()
        assert kernel.leftovers() == {}
        assert s.storage.list_attachments(volume_id=vol.id) == []
        assert _targets(tgtd, s.prefix) == []
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
        kernel.settle()
        assert kernel.leftovers() == {}
        assert s.storage.list_attachments(volume_id=vol.id) == []
        assert s.storage.get_volume(vol.id).state == pb.VOLUME_STATE_AVAILABLE
        assert _targets(tgtd, s.prefix) == []
        print(f"failed in {failed_s:.1f}s: {err.value.code}: {err.value.message}")
    finally:
        s.storage.delete_volume(vol.id)
