"""Crash recovery on the kernel path: `blockwire-agent` killed (SIGKILL, armed by BLOCKWIRE_FAILPOINTS)
at each step of a kernel iSCSI + multipath attach and detach, and `blockwire-storage` killed in the
middle of an export, then restarted. Reconciliation must end with one complete attachment (the map in
the domain's live XML, the map over both paths, storage ATTACHED) or nothing at all (no sd device, dm
map, session, node record or by-path link; no journal record; no storage attachment; no tgt target),
per the table in `HostAgent.reconcile`.

One domain and the session's daemons (tgt_stack) serve every case; each case restarts the agent with the
failpoint it needs. An agent armed with a detach failpoint is only started where its reconcile finishes
an attach (no teardown runs, so the failpoint waits for the detach the test asks for).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from blockwire.client import NO_RETRY, HostAgentClient, StorageClient
from blockwire.errors import BlockwireError, Unavailable
from blockwire.v1 import types_pb2 as pb
from hostagent import api
from storagesvc import service
from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack, running_domain
from tests.host.daemons import Tgtd
from tests.rig import KILLED, Daemon

COMPLETE, NOTHING = "complete", "nothing"
# A kill at each attach step, what reconcile makes of it, and (where it finishes the attach) the detach
# step the next agent is killed at. Every step of HostAgent.reconcile's table that does something on
# the kernel path: nothing made yet, the export made, sessions + map made, the map hot-plugged.
CASES = [
    (api.FP_ATTACH_AFTER_JOURNAL, NOTHING, ""),
    (api.FP_ATTACH_AFTER_CREATE_ATTACHMENT, NOTHING, ""),
    (api.FP_ATTACH_AFTER_CONNECT, NOTHING, ""),
    (api.FP_ATTACH_AFTER_HOTPLUG, COMPLETE, api.FP_DETACH_AFTER_UNPLUG),
    (api.FP_ATTACH_BEFORE_COMPLETE, COMPLETE, api.FP_DETACH_AFTER_DISCONNECT),
]


@dataclass
class Daemons:
    """The session stack's daemons, restarted with failpoints armed (or not)."""

    s: Stack
    tgtd: Tgtd
    armed: dict[str, str] = field(default_factory=dict)

    def start_agent(self, failpoints: str = "") -> None:
        self.s.agent.close()
        self.s.agent_daemon.stop()  # nothing to do when a failpoint killed it
        self.s.agent_daemon.start(failpoints)
        self.s.agent = HostAgentClient(f"unix://{self.s.agent_daemon.socket}")
        self.armed["agent"] = failpoints

    def start_storage(self, failpoints: str = "") -> None:
        self.s.storage.close()
        self.s.storage_daemon.stop()
        self.s.storage_daemon.start(failpoints)
        self.s.storage = StorageClient(f"unix://{self.s.storage_daemon.socket}")
        self.armed["storage"] = failpoints

    def killed(self, daemon: Daemon, call: Callable[[HostAgentClient], object]) -> None:
        """Makes `call` on an agent client that does not retry; `daemon` must die of SIGKILL meanwhile."""
        with HostAgentClient(f"unix://{self.s.agent_daemon.socket}", retry=NO_RETRY) as client:
            try:
                call(client)
                outcome = "OK"
            except BlockwireError as exc:
                outcome = f"{exc.code}: {exc.message}"
        try:
            rc: int | None = daemon.died(60)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == KILLED, f"{daemon.name} was not killed by its failpoint (the call ended {outcome})"

    def unarmed(self) -> None:
        """Both daemons serving without failpoints (after a test, whatever happened in it)."""
        for name, daemon, start in (
            ("storage", self.s.storage_daemon, self.start_storage),
            ("agent", self.s.agent_daemon, self.start_agent),
        ):
            if self.armed.get(name) or not daemon.running:
                start()

    # -- probes

    def targets(self) -> list[str]:
        """The stack's tgt targets (IQNs)."""
        out = self.tgtd.adm("--op", "show", "--mode", "target").stdout
        return [
            line.split()[2]
            for line in out.splitlines()
            if line.startswith("Target ") and line.split()[2].startswith(self.s.prefix + ":")
        ]

    def journal(self) -> list[str]:
        d = self.s.workdir / "agent-state" / "attachments"
        return sorted(p.name for p in d.glob("*.json")) if d.exists() else []

    def nothing_left(self, domain: str, volume_id: str) -> dict[str, object]:
        """Everything an attachment of the volume could have left, anywhere; {} when clean."""
        kernel.settle()
        left: dict[str, object] = dict(kernel.leftovers())
        if kernel.domain_disks(domain):
            left["domain disks"] = kernel.domain_disks(domain)
        if self.s.agent.list_attachments():
            left["agent attachments"] = [a.volume_id for a in self.s.agent.list_attachments()]
        if self.journal():
            left["journal"] = self.journal()
        rows = self.s.storage.list_attachments(volume_id=volume_id)
        if rows:
            left["storage attachments"] = [pb.AttachmentState.Name(a.state) for a in rows]
        state = self.s.storage.get_volume(volume_id).state
        if state != pb.VOLUME_STATE_AVAILABLE:
            left["volume state"] = pb.VolumeState.Name(state)
        if self.targets():
            left["tgt targets"] = self.targets()
        return left

    def complete(self, domain: str, volume_id: str) -> pb.Attachment:
        """Asserts one complete attachment: ATTACHED in the agent and in storage, the map over both paths
        hot-plugged (live XML), the target there, and data through the map reaching the volume's file."""
        att = self.s.agent.get_attachment(volume_id, domain)
        assert att.state == pb.ATTACHMENT_STATE_ATTACHED, pb.AttachmentState.Name(att.state)
        disks = kernel.domain_disks(domain)
        assert [(d.target, d.source) for d in disks] == [(att.target_dev, att.host_device)], disks
        wwid = f"3{att.connection_info.wwn}"
        name = kernel.map_for(wwid)
        assert name, f"no multipath map for {wwid}: {kernel.maps()}"
        assert att.host_device == f"/dev/{kernel.dm_device(name)}"
        kernel.wait_until("two active paths", lambda: len(kernel.active_paths(wwid)) == 2, 60)
        iqn = att.connection_info.iscsi.paths[0].target_iqn
        assert sorted(kernel.session_ids(iqn)) == sorted(kernel.PORTALS)
        rows = self.s.storage.list_attachments(volume_id=volume_id)
        assert [a.state for a in rows] == [pb.ATTACHMENT_STATE_ATTACHED], rows
        assert self.s.storage.get_volume(volume_id).state == pb.VOLUME_STATE_IN_USE
        assert self.targets() == [iqn]
        pattern = kernel.write_pattern(att.host_device, 2)
        assert kernel.read_at(self.s.volume_file(volume_id), 2) == pattern
        return att


@pytest.fixture(scope="module")
def vm(libvirtd: None) -> Iterator[str]:
    """One running no-OS domain for every case of this file (conftest's `running_domain`)."""
    with running_domain("bw-crash") as name:
        yield name


@pytest.fixture
def daemons(tgt_stack: Stack, tgtd: Tgtd) -> Iterator[Daemons]:
    d = Daemons(tgt_stack, tgtd)
    yield d
    d.unarmed()


@pytest.fixture
def volume(daemons: Daemons, vm: str) -> Iterator[str]:
    """A new volume; afterwards (also after a failure) detached with force and deleted."""
    s = daemons.s
    vol = s.storage.create_volume(f"crash-{uuid.uuid4().hex[:6]}", 16 * kernel.MiB, backend="file")
    yield vol.id
    daemons.unarmed()
    s.agent.detach_volume(vm, vol.id, force=True)
    s.storage.delete_volume(vol.id)


@pytest.mark.parametrize(
    ("attach_fp", "outcome", "detach_fp"),
    CASES,
    ids=[f"{a.removeprefix('agent.')}+{d.removeprefix('agent.') or 'none'}" for a, _, d in CASES],
)
def test_agent_killed_at_a_kernel_attach_step_then_at_a_detach_step(
    clean_host: None, daemons: Daemons, vm: str, volume: str, attach_fp: str, outcome: str, detach_fp: str
) -> None:
    s = daemons.s
    wwid = f"3{s.storage.get_volume(volume).wwn}"
    daemons.start_agent(f"{attach_fp}=kill")
    daemons.killed(s.agent_daemon, lambda c: c.attach_volume(vm, volume_id=volume))

    # What the kill left behind: the fault is real.
    if attach_fp == api.FP_ATTACH_AFTER_CONNECT:
        assert kernel.map_for(wwid), f"no map at the kill: {kernel.leftovers()}"
        assert len(kernel.sessions()) == 2, kernel.sessions()
        assert kernel.domain_disks(vm) == []
    if outcome == COMPLETE:
        assert len(kernel.domain_disks(vm)) == 1
        rows = s.storage.list_attachments(volume_id=volume)
        assert [a.state for a in rows] == [pb.ATTACHMENT_STATE_ATTACHING]

    started = time.monotonic()
    daemons.start_agent(f"{detach_fp}=kill" if detach_fp else "")  # reconciles before it serves
    print(f"{attach_fp}: restart + reconcile {time.monotonic() - started:.1f}s")
    if outcome == COMPLETE:
        att = daemons.complete(vm, volume)
        daemons.killed(s.agent_daemon, lambda c: c.detach_volume(vm, volume))
        assert kernel.domain_disks(vm) == []  # unplugged before either detach failpoint
        if detach_fp == api.FP_DETACH_AFTER_UNPLUG:  # not yet disconnected
            assert kernel.map_for(wwid), kernel.leftovers()
            assert len(kernel.sessions()) == 2, kernel.leftovers()
        else:  # disconnected; storage still exports it
            kernel.settle()
            assert kernel.leftovers() == {}
            assert daemons.targets() == [att.connection_info.iscsi.paths[0].target_iqn]
        daemons.start_agent()
    assert daemons.nothing_left(vm, volume) == {}


def test_storage_killed_in_the_middle_of_an_export_for_a_kernel_attach(
    clean_host: None, daemons: Daemons, vm: str, volume: str
) -> None:
    """Storage dies with the target, LUN, CHAP and ACL made and the attachment still RESERVED: the agent
    gets UNAVAILABLE before it has connection info (nothing on the host), the restarted storage rolls
    the export back, and the caller's repeat attaches completely."""
    s = daemons.s
    daemons.start_storage(f"{service.FP_EXPORT_AFTER_ACL}=kill")
    daemons.killed(s.storage_daemon, lambda c: c.attach_volume(vm, volume_id=volume))
    kernel.settle()
    assert kernel.leftovers() == {}
    assert kernel.domain_disks(vm) == []

    daemons.start_storage()  # reconciles before it serves
    assert daemons.targets() == []
    assert s.storage.list_attachments(volume_id=volume) == []

    # The caller repeats (the agent's channel to storage may still be in its reconnect backoff).
    deadline = time.monotonic() + 120
    while True:
        try:
            s.agent.attach_volume(vm, volume_id=volume)
            break
        except Unavailable:
            assert time.monotonic() < deadline, "the repeated attach stayed UNAVAILABLE for 120s"
            time.sleep(1)
    daemons.complete(vm, volume)
    s.agent.detach_volume(vm, volume)
    assert daemons.nothing_left(vm, volume) == {}
