"""End to end through blockwire's daemons (kernel initiator): LUN reuse is refused.

Storage exports volume A (connection info with A's WWN); then the same target and LUN are made to serve
volume B, with B's identity (what a reused target/LUN number does, the CVE-2023-2088 class of bug).
AttachVolume with A's pre-resolved connection info must fail with FAILED_PRECONDITION (identity
mismatch) after the login: the wrong disk never reaches the domain (its XML is unchanged), and the
agent removes everything it made (no sd device, dm map, session, node record or by-path link).

When B is connected at that LUN (its map in a domain), the refusal, and DisconnectVolume with A's info
(even forced), must leave B's disks, map, sessions, node records and data exactly as they were; and
DisconnectVolume of a device something holds open is FAILED_PRECONDITION naming the holder unless forced.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.errors import FailedPrecondition
from blockwire.v1 import types_pb2
from storagesvc.identity import serial_for, wwn_for
from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack, start_stack, tgt_sections
from tests.guest.inside.kernel import MiB
from tests.host.daemons import Tgtd


def _tid(tgtd: Tgtd, iqn: str) -> int:
    for line in tgtd.adm("--op", "show", "--mode", "target").stdout.splitlines():
        if line.startswith("Target ") and line.split()[2] == iqn:
            return int(line.split()[1].rstrip(":"))
    raise AssertionError(f"tgtd has no target {iqn}")


def _serve_b_at_as_lun(s: Stack, tgtd: Tgtd, ci: types_pb2.ConnectionInfo, b_id: str) -> str:
    """The LUN of connection info `ci` now serves volume B (its file, its identity); returns B's WWN."""
    tid = str(_tid(tgtd, ci.iscsi.paths[0].target_iqn))
    lun = str(ci.iscsi.paths[0].lun)
    tgtd.adm("--op", "delete", "--mode", "logicalunit", "--tid", tid, "--lun", lun)
    tgtd.adm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", lun,
             "-b", str(s.volume_file(b_id)))  # fmt: skip
    wwn_b = wwn_for(b_id, "001405")
    tgtd.adm("--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", lun,
             "--params", f"scsi_id={wwn_b},scsi_sn={serial_for(b_id)}")  # fmt: skip
    return wwn_b


def _as_b(ci: types_pb2.ConnectionInfo, b_id: str, wwn_b: str, paths: int = 2) -> types_pb2.ConnectionInfo:
    """B's connection info: A's target and LUN (now B's), B's identity, the first `paths` paths."""
    out = types_pb2.ConnectionInfo()
    out.CopyFrom(ci)
    out.volume_id, out.wwn, out.serial, out.attachment_id = b_id, wwn_b, serial_for(b_id), ""
    del out.iscsi.paths[paths:]
    return out


def _holder(device: str) -> subprocess.Popen[bytes]:
    """A process (`sleep`) that holds `device` open, as a writer does."""
    proc = subprocess.Popen(["sh", "-c", f'exec 3<"{device}"; exec sleep 600'])
    kernel.wait_until("the holder's open descriptor", lambda: Path(f"/proc/{proc.pid}/fd/3").exists(), 30)
    return proc


@pytest.fixture(scope="module")
def reuse_stack(tgtd: Tgtd, libvirtd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The tgt stack with storage's export checks off: these tests re-point a LUN behind storage's back
    to play a reused LUN, and the checks would (rightly) put A's LUN back within seconds. A LUN really
    reused is one storage itself gave to B, which no check undoes."""
    workdir = tmp_path_factory.mktemp("stack-reuse")
    stack = start_stack(workdir, tgt_sections(workdir, tgtd, "export_check_interval = 0\n"))
    yield stack
    stack.stop()


def test_a_reused_lun_with_another_wwn_is_refused_and_nothing_is_left(
    clean_host: None, reuse_stack: Stack, tgtd: Tgtd, domain: str
) -> None:
    s = reuse_stack
    tag = uuid.uuid4().hex[:6]
    a = s.storage.create_volume(f"e2e-reuse-a-{tag}", 32 * MiB, backend="file")
    b = s.storage.create_volume(f"e2e-reuse-b-{tag}", 32 * MiB, backend="file")
    export = s.storage.create_attachment(a.id, s.agent.get_connector(), domain=domain)
    try:
        ci = export.connection_info
        assert ci.wwn == wwn_for(a.id, "001405")
        wwn_b = _serve_b_at_as_lun(s, tgtd, ci, b.id)  # the target's LUN now announces B's identity

        before = kernel.domain_xml(domain)
        started = time.monotonic()
        with pytest.raises(FailedPrecondition, match=f"(?s){wwn_b}.*{ci.wwn}"):
            s.agent.attach_volume(domain, connection_info=ci)
        refused_s = time.monotonic() - started
        assert kernel.domain_xml(domain) == before
        assert s.agent.list_attachments(domain) == []
        kernel.settle()
        assert kernel.leftovers() == {}
        print(f"refused in {refused_s:.1f}s (logins, identity check, teardown)")
    finally:
        s.storage.delete_attachment(export.id)
        s.storage.delete_volume(a.id)
        s.storage.delete_volume(b.id)


def test_refusing_a_reused_lun_leaves_the_volume_now_there_alone(
    clean_host: None, reuse_stack: Stack, tgtd: Tgtd, domain: str
) -> None:
    s = reuse_stack
    tag = uuid.uuid4().hex[:6]
    a = s.storage.create_volume(f"e2e-reuse2-a-{tag}", 32 * MiB, backend="file")
    b = s.storage.create_volume(f"e2e-reuse2-b-{tag}", 32 * MiB, backend="file")
    export = s.storage.create_attachment(a.id, s.agent.get_connector(), domain=domain)
    holder: subprocess.Popen[bytes] | None = None
    try:
        ci_a = export.connection_info
        wwn_b = _serve_b_at_as_lun(s, tgtd, ci_a, b.id)
        ci_b = _as_b(ci_a, b.id, wwn_b)

        # B is connected at the LUN, its map hot-plugged into the domain (QEMU holds it open).
        att_b = s.agent.attach_volume(domain, connection_info=ci_b)
        pattern = kernel.write_pattern(att_b.host_device, 5)
        kernel.settle()
        b_state = kernel.leftovers()
        assert b_state["dm maps"], b_state
        assert len(b_state["iscsi sessions"]) == 2, b_state
        xml = kernel.domain_xml(domain)

        def b_untouched(step: str) -> None:
            kernel.settle()
            assert kernel.leftovers() == b_state, step
            assert kernel.domain_xml(domain) == xml, step
            assert kernel.read_at(att_b.host_device, 5) == pattern, step

        with pytest.raises(FailedPrecondition, match=f"(?s){wwn_b}.*{ci_a.wwn}"):
            s.agent.attach_volume(domain, connection_info=ci_a)
        assert [x.volume_id for x in s.agent.list_attachments(domain)] == [b.id]
        b_untouched("after the refused attach")
        s.agent.disconnect_volume(ci_a)  # A is not connected here: OK, and nothing of B's goes
        s.agent.disconnect_volume(ci_a, force=True)  # force overrides "open", never "not A's"
        b_untouched("after DisconnectVolume with A's info")

        # B's own disconnect while its domain holds the map: refused (B is the agent's attachment: only
        # DetachVolume takes it, unplug first); nothing goes.
        with pytest.raises(FailedPrecondition, match=rf"attached to domain '{domain}' by this agent"):
            s.agent.disconnect_volume(ci_b)
        with pytest.raises(FailedPrecondition, match=rf"attached to domain '{domain}' by this agent"):
            s.agent.disconnect_volume(ci_b, force=True)
        b_untouched("after the refused DisconnectVolume of B")
        s.agent.detach_volume(domain, b.id)
        kernel.settle()
        assert kernel.leftovers() == {}

        # A single-path disk a process holds open: refused without force, naming it; forced, it goes.
        ci_b1 = _as_b(ci_a, b.id, wwn_b, paths=1)
        dev = s.agent.connect_volume(ci_b1).path
        assert dev.startswith("/dev/sd"), dev
        holder = _holder(dev)
        with pytest.raises(FailedPrecondition, match=rf"{dev}: process {holder.pid} \(sleep\) holds it open"):
            s.agent.disconnect_volume(ci_b1)
        assert Path("/sys/block", Path(dev).name).exists()
        assert kernel.session_ids(ci_a.iscsi.paths[0].target_iqn)
        s.agent.disconnect_volume(ci_b1, force=True)
        assert not Path("/sys/block", Path(dev).name).exists()
        kernel.settle()
        assert kernel.leftovers() == {}
    finally:
        if holder is not None:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
        for att in s.agent.list_attachments(domain):
            s.agent.detach_volume(domain, att.volume_id, force=True)
        s.storage.delete_attachment(export.id)
        s.storage.delete_volume(a.id)
        s.storage.delete_volume(b.id)
