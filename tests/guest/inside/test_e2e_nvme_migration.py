"""The host side of a live migration of an NVMe/TCP volume, in the guest's real kernel: `blockwire-storage`
(file backend, nvmet on 127.0.0.1:4420 and 127.0.0.2:4420) and two `blockwire-agent` daemons that are two
hosts to storage: the stack's agent (A, the source: the guest's host name and host NQN) and agent B (the
destination: its own host name, host NQN and host id), both on the guest's one libvirtd.

One kernel holds both hosts' controllers: nvmet admits them by host NQN (DH-HMAC-CHAP off: the guest's
6.1 kernel has no NVMe authentication), each agent connects its own two controllers, and the kernel joins
all four under one subsystem and one namespace head. So the handoff at the agent level is real: when A's
FinishOutgoingMigration deletes A's controllers, I/O that is going on on the head (a writer in this test,
O_DIRECT) can only go on over B's controllers, and it must, without an error.

What one libvirtd cannot be is two hosts for one domain (both agents would see it), so libvirt's
migration is played in three steps: the domain stops on "A" (destroyed, still defined: what libvirt's
migration leaves on a source is nothing running), B's PrepareMigration with the domain's migratable XML,
and later the domain started again from B's destination XML (what arrives on the destination). The
destination XML, libvirt's migration itself and the data in a migrating QEMU are the host tier's
(tests/host/test_migration.py: two libvirtd, QEMU's iSCSI); this test is the kernel's NVMe side:

* B's PrepareMigration: B connects its own controllers (host NQN B), storage admits B beside A, the
  destination XML opens the namespace head; AbortMigration on B removes B's controllers and admission
  only, A's controllers, head and data untouched;
* prepared again, A's FinishOutgoingMigration while a writer writes to the head: A's controllers go,
  the head and B's controllers stay, the writer never fails and goes on after A's controllers are gone,
  storage admits B only; every write is in the volume's file;
* the domain runs with B's destination XML, FinishIncomingMigration on B: ATTACHED there; I/O through
  the head; DetachVolume on B: nothing left on the host, no subsystem on the target.
"""

from __future__ import annotations

import mmap
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.client import HostAgentClient
from blockwire.errors import BlockwireError
from blockwire.v1 import hostagent_pb2
from blockwire.v1 import types_pb2 as pb
from tests.guest.inside import kernel, nvmet
from tests.guest.inside.conftest import GUEST_DAEMON, Stack, start_stack
from tests.guest.inside.kernel import MiB
from tests.guest.inside.test_e2e_nvme import nvmet_sections
from tests.rig import Daemon, wait_until

CONFIGFS = Path("/sys/kernel/config/nvmet")
CHUNK = 64 * 1024
SLOTS = 128  # the writer's region: 8 MiB from 16 MiB on
REGION = 16 * MiB


class Destination:
    """Agent B: a second blockwire-agent with its own host name, host NQN and host id, same storage."""

    def __init__(self, workdir: Path) -> None:
        hostid = str(uuid.uuid4())
        (workdir / "b-hostnqn").write_text(f"nqn.2014-08.org.nvmexpress:uuid:{hostid}\n")
        (workdir / "b-hostid").write_text(hostid + "\n")
        config = workdir / "agent-b.toml"
        config.write_text(
            f'state_dir = "{workdir}/agent-b-state"\nstorage_address = "unix://{workdir}/storage.sock"\n'
            f'iscsi_mode = "kernel"\nlisten_unix = "{workdir}/agent-b.sock"\nlog_level = "DEBUG"\n'
            f'host_name = "bw-nvme-dest"\nhostnqn_file = "{workdir}/b-hostnqn"\n'
            f'hostid_file = "{workdir}/b-hostid"\n'
            "device_timeout = 90.0\ndetach_timeout = 60.0\nlogin_timeout = 60.0\n"
        )
        self.daemon = Daemon.agent(config, workdir / "agent-b.sock", **GUEST_DAEMON)
        self.daemon.start()
        self.agent = HostAgentClient(f"unix://{self.daemon.socket}")

    def stop(self) -> None:
        self.agent.close()
        try:
            self.daemon.stop()
        finally:
            kernel.keep_log(self.daemon.log, f"{self.daemon.config.parent.name}-agent-b.log")


@pytest.fixture(scope="module")
def two_hosts(libvirtd: None) -> Iterator[tuple[Stack, Destination]]:
    why = nvmet.available()
    if why:
        pytest.fail(f"NVMe/TCP is not available in the guest: {why}", pytrace=False)
    # on the root file system: nvmet opens a file backing with O_DIRECT, which 6.1's tmpfs refuses
    workdir = Path(f"/var/tmp/bw-nvme-mig-{uuid.uuid4().hex[:6]}")
    stack = start_stack(workdir, nvmet_sections(workdir, f"nqn.2026-01.io.blockwire.m{uuid.uuid4().hex[:8]}"))
    try:
        dest = Destination(workdir)
        try:
            yield stack, dest
        finally:
            dest.stop()
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def controllers_of(nqn: str) -> dict[str, tuple[str, str]]:
    """nvmeN -> (host NQN, state) of the host's controllers to subsystem `nqn`."""
    return {
        name: (a.get("hostnqn", ""), a.get("state", ""))
        for name, a in nvmet.controllers().items()
        if a.get("subsysnqn") == nqn
    }


def allowed_hosts(nqn: str) -> list[str]:
    return sorted(p.name for p in (CONFIGFS / "subsystems" / nqn / "allowed_hosts").iterdir())


class Writer(threading.Thread):
    """Writes CHUNK-sized blocks round the region with O_DIRECT until stopped (at most `limit` writes or
    `seconds`); block i holds its number. An OSError stops it and is kept."""

    def __init__(self, device: str, limit: int = 50_000, seconds: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.device, self.limit, self.seconds = device, limit, seconds
        self.count = 0
        self.error: OSError | None = None
        self.halt = threading.Event()

    @staticmethod
    def block(i: int) -> bytes:
        return f"{i:015d}\n".encode() * (CHUNK // 16)

    def run(self) -> None:
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT)
        end = time.monotonic() + self.seconds
        try:
            while not self.halt.is_set() and self.count < self.limit and time.monotonic() < end:
                buf[:] = self.block(self.count)
                os.pwrite(fd, buf, REGION + (self.count % SLOTS) * CHUNK)
                self.count += 1
        except OSError as exc:
            self.error = exc
        finally:
            os.close(fd)
            buf.close()

    def expected(self) -> dict[int, bytes]:
        """slot -> what its last write put there."""
        return {(i % SLOTS): self.block(i) for i in range(max(0, self.count - SLOTS), self.count)}


def test_source_lets_go_while_io_goes_on_over_the_destinations_controllers(
    clean_nvme: None, two_hosts: tuple[Stack, Destination], domain: str
) -> None:
    s, b = two_hosts
    steps = kernel.Steps()
    took, timings = steps.took, steps.timings

    nqn_a = s.agent.get_connector().nvme_host_nqn
    nqn_b = b.agent.get_connector().nvme_host_nqn
    assert nqn_a
    assert nqn_b != nqn_a
    vol = s.storage.create_volume(f"e2e-nvme-mig-{uuid.uuid4().hex[:6]}", 64 * MiB, backend="file")
    on_a = on_b = finished = False
    writer: Writer | None = None
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        on_a = True
        took("attach on A")
        nqn = att.connection_info.nvmeof.subsystem_nqn
        head = att.host_device
        a_ctrls = controllers_of(nqn)
        assert sorted(a_ctrls.values()) == [(nqn_a, "live")] * 2
        first = kernel.write_pattern(head, 5)
        volumes = [
            hostagent_pb2.MigrationVolume(
                volume_id=vol.id, source_attachment_id=att.id, target_dev=att.target_dev
            )
        ]
        xml = kernel.virsh("dumpxml", "--migratable", domain).stdout
        kernel.virsh("destroy", domain)  # the domain leaves "A" (still defined, as after a migration)

        # B prepares, then aborts: only B's part goes
        on_b = True
        prepared = b.agent.prepare_migration(domain, xml, volumes, timeout=300)
        took("prepare on B")
        assert allowed_hosts(nqn) == sorted([nqn_a, nqn_b])
        both = controllers_of(nqn)
        assert sorted(both.values()) == sorted([(nqn_a, "live")] * 2 + [(nqn_b, "live")] * 2), both
        assert b.agent.abort_migration(domain, timeout=300) == [vol.id]
        on_b = False
        took("abort on B")
        assert controllers_of(nqn) == a_ctrls
        assert allowed_hosts(nqn) == [nqn_a]
        assert kernel.read_at(head, 5) == first == kernel.read_at(s.volume_file(vol.id), 5)

        # B prepares again; A lets go while a writer writes to the head
        prepared = b.agent.prepare_migration(domain, xml, volumes, timeout=300)
        on_b = True
        took("prepare on B again")
        (disk,) = prepared.disks
        assert f"<source dev='{head}'/>" in disk.disk_xml or f'<source dev="{head}"/>' in disk.disk_xml, disk
        b_ctrls = {n: v for n, v in controllers_of(nqn).items() if n not in a_ctrls}
        assert sorted(b_ctrls.values()) == [(nqn_b, "live")] * 2
        writer = Writer(head)
        writer.start()
        wait_until("the writer under way", lambda: writer is not None and writer.count >= 20, 60)
        assert s.agent.finish_outgoing_migration(domain, timeout=300) == [vol.id]
        on_a = False
        took("finish outgoing on A (I/O going on)")
        assert controllers_of(nqn) == b_ctrls  # A's controllers gone, B's untouched
        assert Path("/sys/block", head.removeprefix("/dev/")).exists()
        assert allowed_hosts(nqn) == [nqn_b]  # storage dropped A's admission
        after = writer.count
        wait_until(
            "writes over B's controllers alone",
            lambda: writer is not None and (writer.count >= after + 50 or writer.error is not None),
            120,
        )
        writer.halt.set()
        writer.join(timeout=60)
        assert writer.error is None, (
            f"I/O failed during the handoff after {writer.count} writes: {writer.error}"
        )
        assert controllers_of(nqn) == b_ctrls
        region = kernel.read_at(s.volume_file(vol.id), REGION // MiB, SLOTS * CHUNK // MiB)
        for slot, data in writer.expected().items():
            assert region[slot * CHUNK : (slot + 1) * CHUNK] == data, f"slot {slot} of the volume's file"
        took("writes checked")

        # the domain arrives on B with B's destination XML
        dest_xml = Path(f"/tmp/{domain}-dest.xml")
        dest_xml.write_text(prepared.destination_domain_xml)
        kernel.virsh("define", str(dest_xml))
        dest_xml.unlink()
        kernel.virsh("start", domain, timeout=120)
        done = b.agent.finish_incoming_migration(domain, timeout=300)
        assert [(x.volume_id, x.state, x.migration_source_id) for x in done] == [
            (vol.id, pb.ATTACHMENT_STATE_ATTACHED, "")
        ]
        took("finish incoming on B")
        assert [d.source for d in kernel.domain_disks(domain) if d.target == att.target_dev] == [head]
        listed = s.storage.list_attachments(volume_id=vol.id)
        assert [(x.connector.host, x.state) for x in listed] == [
            ("bw-nvme-dest", pb.ATTACHMENT_STATE_ATTACHED)
        ]
        last = kernel.write_pattern(head, 40)
        assert kernel.read_at(s.volume_file(vol.id), 40) == last
        assert kernel.read_at(s.volume_file(vol.id), 5) == first

        b.agent.detach_volume(domain, vol.id)
        on_b = False
        took("detach on B")
        kernel.settle()
        assert nvmet.host_leftovers() == {}
        assert not (CONFIGFS / "subsystems" / nqn).exists()
        finished = True
    finally:
        if writer is not None:
            writer.halt.set()
            writer.join(timeout=60)
        if on_b:
            try:
                b.agent.abort_migration(domain, timeout=300)
                b.agent.detach_volume(domain, vol.id, force=True)
            except BlockwireError as exc:  # cleanup after a failure: say it, go on
                print(f"cleanup on B: {exc}")
        if on_a:
            try:
                s.agent.detach_volume(domain, vol.id, force=True)
            except BlockwireError as exc:
                print(f"cleanup on A: {exc}")
        try:
            s.storage.delete_volume(vol.id)
        except BlockwireError as exc:
            if finished:
                raise
            print(f"cleanup: {exc}")  # never in place of the test's own failure
    print(f"timings (s): {timings}, writes during the handoff: {writer.count if writer else 0}")
