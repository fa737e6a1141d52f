"""Host tier, live migration between two real libvirt hosts on this machine (tests/host/libvirt_hosts.py),
through both agents (blockwire-agent A and B, QEMU-native iSCSI with CHAP, each on its own libvirtd)
and one storage daemon (file + tgt):

* a running no-OS domain with two volumes migrates A -> B with libvirt's migrateToURI3 and the XML
  PrepareMigration returned; data QEMU wrote on A (HMP qemu-io) is read by QEMU on B, and B's writes
  reach the volume; B holds the attachments, A nothing (no libvirt secret, journal record, storage
  attachment or ACL entry); and back B -> A;
* a destination QEMU that cannot log in (an initiator the target does not admit) fails libvirt's
  migration, AbortMigration on B undoes B's part, and the domain runs on A with its disks untouched;
* an agent killed at a step on either side (failpoints), restarted (its reconcile) with the caller
  repeating its call, ends "migrated" or "not migrated", never in between;
* an encrypted volume (LUKS1, the embedded key manager) migrates with a key secret of B's own in the
  destination XML; A's secret goes with FinishOutgoingMigration.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import libvirt
import libvirt_qemu  # type: ignore[import-untyped]
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from hostagent.migration import (
    FP_FINISH_IN_AFTER_JOURNAL,
    FP_FINISH_OUT_AFTER_JOURNAL,
    FP_PREPARE_AFTER_CONNECT,
    FP_PREPARE_AFTER_CREATE_ATTACHMENT,
)
from storagesvc.keys.embedded import EmbeddedKeys
from tests.conftest import tier_unavailable
from tests.fakes.daemon_rig import MIB
from tests.host.daemons import Missing, Started, Tgtd
from tests.host.migration_rig import World, finish, libvirt_migrate, migrate, prepare, running_world
from tests.rig import KILLED, Daemon, domain_xml, wait_until

PATTERN_A, PATTERN_B = 0xA1, 0xB2


@pytest.fixture(scope="module")
def world(host_daemons: Started, tgtd: Tgtd) -> Iterator[World]:
    try:
        with running_world(tgtd) as w:
            yield w
    except Missing as exc:
        tier_unavailable("host", f"two libvirt hosts cannot run here: {exc}")


@dataclass
class Vm:
    name: str
    volumes: list[str]


@pytest.fixture
def vm(world: World) -> Iterator[Vm]:
    """A running no-OS domain on host A with two volumes attached by agent A; afterwards whatever is
    left goes, wherever it is."""
    name = f"bw-mig-{uuid.uuid4().hex[:6]}"
    world.a.lv().createXML(domain_xml(name), 0)
    volumes = [world.a.create_volume(8 * MIB).id for _ in range(2)]
    world.b.volume_ids.update(volumes)
    for v in volumes:
        world.a.attach(name, v)
    yield Vm(name, volumes)
    for rig in (world.a, world.b):
        with contextlib.suppress(libvirt.libvirtError):
            rig.lv().lookupByName(name).destroy()
        for v in volumes:
            with contextlib.suppress(grpc.RpcError):
                rig.detach(name, v)
            with contextlib.suppress(grpc.RpcError):
                rig.agent.AbortMigration(hpb.AbortMigrationRequest(domain=name), timeout=60)
    for v in volumes:
        with contextlib.suppress(grpc.RpcError):
            world.a.delete_volume(v)


# -- probes ------------------------------------------------------------------------------------------


def qemu_io(world: World, side: str, domain: str, target_dev: str, command: str) -> str:
    """HMP qemu-io on the disk's qdev; qemu-io prints to QEMU's stdout, which libvirt writes to the
    domain's log under the host's log directory: the lines it added."""
    rig = world.rig(side)
    (alias,) = [
        str(d.xpath("string(alias/@name)"))
        for d in rig.live_disks(domain)
        if d.xpath("string(target/@dev)") == target_dev
    ]
    log = world.host(side).root / "log" / "qemu" / f"{domain}.log"
    size = log.stat().st_size
    dom = rig.lv().lookupByName(domain)
    libvirt_qemu.qemuMonitorCommand(
        dom, f'qemu-io -d {alias} "{command}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )

    def written() -> str | None:
        with open(log, "rb") as f:
            f.seek(size)
            text = f.read().decode(errors="replace")
        return text if "bytes" in text or "fail" in text.lower() else None

    return wait_until("qemu-io output in the domain log", written, 30, 0.05)


def backing(world: World, volume_id: str) -> bytes:
    return (world.a.work / "volumes" / "volumes" / f"{volume_id}.raw").read_bytes()


def holds_nothing(world: World, side: str, domain: str, volumes: list[str]) -> dict[str, object]:
    """What `side` still has of the domain's volumes: its libvirt secrets, journal, storage attachments
    of its host, the ACL entries of its initiator; {} when nothing."""
    rig = world.rig(side)
    left: dict[str, object] = {}
    if rig.secrets():
        left["libvirt secrets"] = rig.secrets()
    if rig.journal():
        left["journal"] = rig.journal()
    host = f"bw-host-{side}"
    rows = [a for v in volumes for a in world.a.attachments(v) if a.connector.host == host]
    if rows:
        left["storage attachments"] = [(a.volume_id, pb.AttachmentState.Name(a.state)) for a in rows]
    iqn = rig.agent_iqn()
    acl = [t for t, initiators in world.a.targets().items() if iqn in initiators]
    if acl:
        left["ACL entries"] = acl
    with contextlib.suppress(libvirt.libvirtError):
        if rig.lv().lookupByName(domain).isActive():
            left["domain"] = "running"
    return left


def holds_all(world: World, side: str, domain: str, volumes: list[str]) -> dict[str, object]:
    """What is missing or wrong for `side` to hold the running domain with every volume; {} when all."""
    rig = world.rig(side)
    wrong: dict[str, object] = {}
    try:
        if not rig.lv().lookupByName(domain).isActive():
            wrong["domain"] = "not running"
    except libvirt.libvirtError:
        return {"domain": "not here"}
    disks = rig.live_disks(domain)
    if len(disks) != len(volumes):
        wrong["disks"] = len(disks)
    iqn = rig.agent_iqn()
    initiators = [d.xpath("string(source/initiator/iqn/@name)") for d in disks]
    if any(i != iqn for i in initiators):
        wrong["disk initiators"] = initiators
    if len(rig.secrets()) != len(volumes):
        wrong["libvirt secrets"] = rig.secrets()
    records = rig.agent.ListAttachments(
        hpb.HostAgentServiceListAttachmentsRequest(domain=domain), timeout=10
    ).attachments
    if sorted((r.volume_id, r.state, r.migration_source_id) for r in records) != sorted(
        (v, pb.ATTACHMENT_STATE_ATTACHED, "") for v in volumes
    ):
        wrong["journal"] = [(r.volume_id, pb.AttachmentState.Name(r.state)) for r in records]
    for v in volumes:
        rows = world.a.attachments(v)
        if [(a.connector.host, a.state, a.migration_source_id) for a in rows] != [
            (f"bw-host-{side}", pb.ATTACHMENT_STATE_ATTACHED, "")
        ]:
            wrong[f"storage {v}"] = [(a.connector.host, pb.AttachmentState.Name(a.state)) for a in rows]
    return wrong


def write_pattern(world: World, side: str, vm: Vm, pattern: int, offset: str) -> None:
    for dev in ("sda", "sdb"):
        out = qemu_io(world, side, vm.name, dev, f"write -P {pattern:#x} {offset} 64k")
        assert "wrote 65536/65536 bytes" in out, out


def read_pattern(world: World, side: str, vm: Vm, pattern: int, offset: str) -> None:
    for dev in ("sda", "sdb"):
        out = qemu_io(world, side, vm.name, dev, f"read -P {pattern:#x} {offset} 64k")
        assert "read 65536/65536 bytes" in out, out
        assert "Pattern verification failed" not in out, out


# -- tests -------------------------------------------------------------------------------------------


def test_migrate_a_to_b_and_back_with_the_data(world: World, vm: Vm) -> None:
    write_pattern(world, "a", vm, PATTERN_A, "0")
    prepared = prepare(world, "a", "b", vm.name)
    assert sorted(d.volume_id for d in prepared.disks) == sorted(vm.volumes)
    # B connected (its own secrets, its initiator admitted) while A's QEMU still uses the volumes
    assert len(world.b.secrets()) == 2
    assert len(world.a.secrets()) == 2
    for v in vm.volumes:
        (src, dst) = sorted(world.a.attachments(v), key=lambda a: a.connector.host)
        assert (src.connector.host, src.state) == ("bw-host-a", pb.ATTACHMENT_STATE_ATTACHED)
        assert (dst.connector.host, dst.state) == ("bw-host-b", pb.ATTACHMENT_STATE_ATTACHING)
        assert dst.migration_source_id == src.id
    libvirt_migrate(world, "a", "b", vm.name, prepared.destination_domain_xml)
    finish(world, "a", "b", vm.name)
    assert holds_all(world, "b", vm.name, vm.volumes) == {}
    assert holds_nothing(world, "a", vm.name, vm.volumes) == {}
    read_pattern(world, "b", vm, PATTERN_A, "0")  # what A's QEMU wrote, read by B's
    write_pattern(world, "b", vm, PATTERN_B, "64k")
    for v in vm.volumes:
        data = backing(world, v)
        assert data[: 64 << 10] == bytes([PATTERN_A]) * (64 << 10)
        assert data[64 << 10 : 128 << 10] == bytes([PATTERN_B]) * (64 << 10)
    # repeats of the finishing calls change nothing
    finish(world, "a", "b", vm.name)
    assert holds_all(world, "b", vm.name, vm.volumes) == {}

    migrate(world, "b", "a", vm.name)
    assert holds_all(world, "a", vm.name, vm.volumes) == {}
    assert holds_nothing(world, "b", vm.name, vm.volumes) == {}
    read_pattern(world, "a", vm, PATTERN_B, "64k")


def test_destination_that_cannot_log_in_aborts_with_the_vm_running_on_a(world: World, vm: Vm) -> None:
    write_pattern(world, "a", vm, PATTERN_A, "0")
    prepared = prepare(world, "a", "b", vm.name)
    # the destination QEMU comes with an initiator name the target does not admit
    xml = prepared.destination_domain_xml.replace(world.b.agent_iqn(), "iqn.2026-01.io.example:not-admitted")
    with pytest.raises(libvirt.libvirtError):
        libvirt_migrate(world, "a", "b", vm.name, xml)
    undone = world.b.agent.AbortMigration(hpb.AbortMigrationRequest(domain=vm.name), timeout=60).volume_ids
    assert sorted(undone) == sorted(vm.volumes)
    assert (
        list(world.a.agent.AbortMigration(hpb.AbortMigrationRequest(domain=vm.name), timeout=60).volume_ids)
        == []
    )
    assert holds_nothing(world, "b", vm.name, vm.volumes) == {}
    assert holds_all(world, "a", vm.name, vm.volumes) == {}
    read_pattern(world, "a", vm, PATTERN_A, "0")


def _armed(world: World, side: str, failpoint: str) -> Daemon:
    """`side`'s agent restarted with `failpoint` armed to kill (armed before the flow begins: a restart
    runs reconcile, which may take the same step)."""
    rig = world.rig(side)
    assert rig.agent_proc is not None
    rig.agent_proc.stop()
    return rig.start_agent(failpoints=f"{failpoint}=kill")


def _killed_then_restarted(world: World, side: str, agent: Daemon, call: Callable[[], object]) -> None:
    """`call` reaches the armed failpoint and kills the agent; then the agent starts again (its
    reconcile runs before it serves)."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert agent.died() == KILLED
    world.rig(side).start_agent()


@pytest.mark.parametrize("failpoint", [FP_PREPARE_AFTER_CREATE_ATTACHMENT, FP_PREPARE_AFTER_CONNECT])
def test_destination_killed_in_prepare_ends_not_migrated(world: World, vm: Vm, failpoint: str) -> None:
    agent = _armed(world, "b", failpoint)
    _killed_then_restarted(world, "b", agent, lambda: prepare(world, "a", "b", vm.name))
    # the caller gives up on this migration: AbortMigration (nothing left to undo after B's reconcile)
    world.b.agent.AbortMigration(hpb.AbortMigrationRequest(domain=vm.name), timeout=60)
    assert holds_nothing(world, "b", vm.name, vm.volumes) == {}
    assert holds_all(world, "a", vm.name, vm.volumes) == {}


def test_destination_killed_in_finish_ends_migrated(world: World, vm: Vm) -> None:
    agent = _armed(world, "b", FP_FINISH_IN_AFTER_JOURNAL)
    prepared = prepare(world, "a", "b", vm.name)
    libvirt_migrate(world, "a", "b", vm.name, prepared.destination_domain_xml)
    request = hpb.FinishIncomingMigrationRequest(domain=vm.name)
    _killed_then_restarted(
        world, "b", agent, lambda: world.b.agent.FinishIncomingMigration(request, timeout=60)
    )
    finish(world, "a", "b", vm.name)  # the caller repeats
    assert holds_all(world, "b", vm.name, vm.volumes) == {}
    assert holds_nothing(world, "a", vm.name, vm.volumes) == {}


def test_source_killed_in_finish_ends_migrated(world: World, vm: Vm) -> None:
    agent = _armed(world, "a", FP_FINISH_OUT_AFTER_JOURNAL)
    prepared = prepare(world, "a", "b", vm.name)
    libvirt_migrate(world, "a", "b", vm.name, prepared.destination_domain_xml)
    world.b.agent.FinishIncomingMigration(hpb.FinishIncomingMigrationRequest(domain=vm.name), timeout=60)
    request = hpb.FinishOutgoingMigrationRequest(domain=vm.name)
    _killed_then_restarted(
        world, "a", agent, lambda: world.a.agent.FinishOutgoingMigration(request, timeout=60)
    )
    assert holds_nothing(world, "a", vm.name, vm.volumes) == {}  # A's reconcile finished it
    assert list(world.a.agent.FinishOutgoingMigration(request, timeout=60).volume_ids) == []
    assert holds_all(world, "b", vm.name, vm.volumes) == {}


def test_source_killed_after_libvirt_migrated_ends_migrated(world: World, vm: Vm) -> None:
    """The source agent dies before any finish (kill -9 with nothing armed): at its restart the
    domain is gone from A, so reconcile releases A's side; B finishes as usual."""
    prepared = prepare(world, "a", "b", vm.name)
    libvirt_migrate(world, "a", "b", vm.name, prepared.destination_domain_xml)
    assert world.a.agent_proc is not None
    world.a.agent_proc.kill()
    world.a.start_agent()
    world.b.agent.FinishIncomingMigration(hpb.FinishIncomingMigrationRequest(domain=vm.name), timeout=60)
    assert holds_nothing(world, "a", vm.name, vm.volumes) == {}
    assert holds_all(world, "b", vm.name, vm.volumes) == {}


def test_migrate_domain_runs_the_flow_agent_to_agent(world: World, vm: Vm) -> None:
    """The source agent's MigrateDomain calls agent B itself (here over B's unix socket) and libvirt."""
    assert world.b.agent_proc is not None
    request = hpb.MigrateDomainRequest(
        domain=vm.name,
        destination_agent=world.b.agent_proc.address,
        destination_libvirt_uri=world.host("b").uri,
    )
    moved = world.a.agent.MigrateDomain(request, timeout=300)
    assert sorted(moved.volume_ids) == sorted(vm.volumes)
    assert moved.libvirt_seconds > 0
    assert holds_all(world, "b", vm.name, vm.volumes) == {}
    assert holds_nothing(world, "a", vm.name, vm.volumes) == {}
    # a failing libvirt migration (no libvirtd at that URI): B aborts, the VM stays on B with its disks
    assert world.a.agent_proc is not None
    back = hpb.MigrateDomainRequest(
        domain=vm.name,
        destination_agent=world.a.agent_proc.address,
        destination_libvirt_uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock",
    )
    with pytest.raises(grpc.RpcError):
        world.b.agent.MigrateDomain(back, timeout=300)
    assert holds_nothing(world, "a", vm.name, vm.volumes) == {}
    assert holds_all(world, "b", vm.name, vm.volumes) == {}


def luks_secrets(world: World, side: str, volume_id: str) -> dict[str, str]:
    """usage id -> uuid of `side`'s libvirt secrets holding the volume's key (hostagent.encryption)."""
    return {
        str(s.usageID()): str(s.UUIDString())
        for s in world.rig(side).lv().listAllSecrets()
        if str(s.usageID() or "").startswith(f"blockwire-luks/{volume_id}/")
    }


def test_an_encrypted_volume_migrates_with_a_secret_of_the_destinations_own(
    world: World, tmp_path: Path
) -> None:
    """B defines its own private secret for the key (from its CreateMigrationAttachment answer) and the
    destination XML's <encryption> names it; A's secret goes with FinishOutgoing; what QEMU wrote on A
    reads back through QEMU on B; the file holds ciphertext only; the key is in no log or argv."""
    a, b = world.a, world.b
    name = f"bw-migenc-{uuid.uuid4().hex[:6]}"
    v = a.storage.CreateVolume(
        spb.CreateVolumeRequest(name=f"enc-{name}", size_bytes=8 * MIB, backend="file", encrypted=True),
        timeout=120,
    ).volume
    assert v.state == pb.VOLUME_STATE_AVAILABLE, v
    a.volume_ids.add(v.id)
    b.volume_ids.add(v.id)
    key = EmbeddedKeys(world.master_key).get_key(v.encryption.key_ref).reveal()
    vm = Vm(name, [v.id])
    a.lv().createXML(domain_xml(name), 0)
    try:
        att = a.attach(name, v.id)
        assert att.target_dev == "sda"
        (source_secret,) = luks_secrets(world, "a", v.id).values()
        out = qemu_io(world, "a", name, "sda", f"write -P {PATTERN_A:#x} 0 64k")
        assert "wrote 65536/65536 bytes" in out, out

        prepared = prepare(world, "a", "b", name)
        ((dst_usage, dst_secret),) = luks_secrets(world, "b", v.id).items()
        (disk,) = prepared.disks
        assert dst_usage == f"blockwire-luks/{v.id}/{disk.attachment_id}"  # B's own secret ...
        assert dst_secret != source_secret
        xml = prepared.destination_domain_xml
        assert f'<secret type="passphrase" uuid="{dst_secret}"/>' in xml  # ... named by B's XML
        assert source_secret not in xml
        assert xml.count("<encryption") == 1
        assert key not in xml
        assert list(luks_secrets(world, "a", v.id).values()) == [source_secret]  # A's QEMU still uses its

        libvirt_migrate(world, "a", "b", name, xml)
        finish(world, "a", "b", name)
        assert luks_secrets(world, "a", v.id) == {}  # FinishOutgoing removed A's secret
        assert list(luks_secrets(world, "b", v.id).values()) == [dst_secret]
        assert holds_all(world, "b", name, vm.volumes) == {}
        assert holds_nothing(world, "a", name, vm.volumes) == {}
        live = b.lv().lookupByName(name).XMLDesc(0)
        assert f"uuid='{dst_secret}'" in live
        out = qemu_io(world, "b", name, "sda", f"read -P {PATTERN_A:#x} 0 64k")  # A's write, B's QEMU
        assert "read 65536/65536 bytes" in out, out
        assert "Pattern verification failed" not in out, out
        assert bytes([PATTERN_A]) * 4096 not in backing(world, v.id)

        b.detach(name, v.id)
        assert luks_secrets(world, "b", v.id) == {}
        for rig in (a, b):
            for log in rig.work.glob("*.log"):
                assert key not in log.read_text(errors="replace"), log
            for record in (rig.state / "attachments").glob("*.json"):
                assert key not in record.read_text(), record
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError):
                    assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), f"pid {pid}"
    finally:
        for side in ("a", "b"):
            rig = world.rig(side)
            with contextlib.suppress(libvirt.libvirtError):
                rig.lv().lookupByName(name).destroy()
            with contextlib.suppress(grpc.RpcError):
                rig.detach(name, v.id)
            with contextlib.suppress(grpc.RpcError):
                rig.agent.AbortMigration(hpb.AbortMigrationRequest(domain=name), timeout=60)
        with contextlib.suppress(grpc.RpcError):
            a.delete_volume(v.id)
