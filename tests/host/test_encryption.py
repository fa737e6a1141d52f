"""Host tier, all real: encrypted volumes through both daemons (blockwire-storage + tgtd + the embedded key
manager, blockwire-agent + libvirtd + QEMU's iSCSI initiator and luks driver), logging at DEBUG.

(a) An encrypted volume attached to a running no-OS domain: a pattern QEMU writes (HMP qemu-io) reads
    back through QEMU, is absent from the backing file (ciphertext at rest and on the wire), and
    decrypts with qemu-img given the key from the key manager; snapshot, clone and extend stay readable.
(b) The key travels only in CreateAttachment's answer: never in a listing, a log, the catalog, the agent's
    journal, a process's argv or the domain XML; detach removes the libvirt secret.
(c) A missing key -> FAILED_PRECONDITION, a wrong key -> PERMISSION_DENIED; nothing attached either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.runtime.executor import Executor
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from storagesvc.encryption import VolumeCrypt
from storagesvc.keys.embedded import EmbeddedKeys
from tests.conftest import tier_unavailable
from tests.fakes.daemon_rig import Rig, define_domain, force_cleanup, remove_domain
from tests.host.daemons import Started, Tgtd
from tests.rig import hmp_qemu_io

MIB = 1 << 20
PATTERN = 0xA5
LUKS_MAGIC = b"LUKS\xba\xbe"


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def rig(
    host_daemons: Started, tgtd: Tgtd, tmp_path_factory: pytest.TempPathFactory, virt: libvirt.virConnect
) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("crypt")
    keys = f'\n[keys]\nkind = "embedded"\nmaster_key_file = "{work / "keys" / "master.key"}"\n'
    with Rig(work=work, tgtd=tgtd, virt=virt, storage_config=keys).running() as r:
        yield r


def luks_secrets(rig: Rig) -> list[str]:
    ours = tuple(f"blockwire-luks/{v}/" for v in rig.volume_ids)
    return [u for u in (s.usageID() for s in rig.lv().listAllSecrets()) if u and u.startswith(ours)]


@pytest.fixture
def domain(rig: Rig) -> Iterator[str]:
    name = define_domain(rig.lv(), "bw-crypt")
    try:
        yield name
    finally:
        force_cleanup(rig, name)
        remove_domain(rig.lv(), name)
        for s in rig.lv().listAllSecrets():
            if (s.usageID() or "").startswith(tuple(f"blockwire-luks/{v}/" for v in rig.volume_ids)):
                with contextlib.suppress(libvirt.libvirtError):
                    s.undefine()


def create_encrypted(rig: Rig, size: int = 16 * MIB, **kw: object) -> pb.Volume:
    v = rig.storage.CreateVolume(
        spb.CreateVolumeRequest(
            name=f"enc-{os.urandom(5).hex()}", size_bytes=size, backend="file", encrypted=True, **kw
        ),
        timeout=120,
    ).volume
    rig.volume_ids.add(v.id)
    return wait_available(rig, v.id)


def wait_available(rig: Rig, volume_id: str) -> pb.Volume:
    for _ in range(600):  # bounded: CREATING -> AVAILABLE
        v = rig.volume(volume_id)
        if v.state == pb.VOLUME_STATE_AVAILABLE:
            return v
        assert v.state != pb.VOLUME_STATE_ERROR, v.error_message
        time.sleep(0.05)
    raise AssertionError(f"volume {volume_id} never became available")


def backing(rig: Rig, volume_id: str) -> Path:
    return rig.work / "volumes" / "volumes" / f"{volume_id}.raw"


def passphrase(rig: Rig, v: pb.Volume) -> str:
    """The key, from the key manager the storage service uses (the master key file it made)."""
    return EmbeddedKeys(rig.work / "keys" / "master.key").get_key(v.encryption.key_ref).reveal()


def decrypt(path: Path, key: str, out: Path) -> None:
    """qemu-img converts the LUKS image to raw with the key (on stdin, not argv)."""
    subprocess.run(
        ["qemu-img", "convert", "--object", "secret,id=s0,file=/dev/stdin", "--image-opts",
         f"driver=luks,key-secret=s0,file.filename={path}", "-O", "raw", str(out)],
        input=key.encode(), check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def has_pattern(path: Path, length: int = 64 * 1024) -> bool:
    with open(path, "rb") as f:
        return f.read(length) == bytes([PATTERN]) * length


def code_of(call: object) -> grpc.RpcError:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call succeeded")


def test_encrypted_volume_written_by_qemu_is_ciphertext_at_rest_and_decrypts_with_its_key(
    rig: Rig, domain: str, tmp_path: Path
) -> None:
    v = create_encrypted(rig, key_size_bits=512)
    assert v.encryption.format == pb.ENCRYPTION_FORMAT_LUKS
    assert (v.encryption.cipher, v.encryption.key_size_bits) == ("aes-xts-plain64", 512)
    assert v.encryption.key_ref.startswith("embedded:")
    assert not v.encryption.passphrase
    f = backing(rig, v.id)
    assert f.stat().st_size == 16 * MIB + 2 * MIB
    assert f.read_bytes()[:6] == LUKS_MAGIC
    key = passphrase(rig, v)

    a = rig.attach(domain, v.id)
    assert not a.connection_info.encryption.passphrase  # the agent never returns it
    xml = rig.lv().lookupByName(domain).XMLDesc(0)
    assert "<encryption format='luks' engine='qemu'>" in xml
    assert "<secret type='passphrase' uuid='" in xml
    assert luks_secrets(rig) == [f"blockwire-luks/{v.id}/{a.connection_info.attachment_id}"]
    out = hmp_qemu_io(domain, a.target_dev, f"write -P {PATTERN:#x} 0 64k")
    assert "wrote 65536/65536" in out, out
    out = hmp_qemu_io(domain, a.target_dev, f"read -P {PATTERN:#x} 0 64k")
    assert "read 65536/65536" in out, out
    assert "Pattern verification failed" not in out, out

    # at rest: ciphertext only; where the plaintext lands (after the header), it is not there
    raw = f.read_bytes()
    assert bytes([PATTERN]) * 4096 not in raw
    plain = tmp_path / "plain.raw"
    decrypt(f, key, plain)
    assert has_pattern(plain)

    # the key: nowhere but in CreateAttachment's answer
    journal = [p.read_text() for p in (rig.state / "attachments").glob("*.json")]
    assert journal
    assert all(key not in j for j in journal)
    listed = rig.attachments(v.id)
    assert listed
    assert all(not x.connection_info.encryption.passphrase for x in listed)
    got = rig.storage.GetAttachment(spb.GetAttachmentRequest(attachment_id=listed[0].id), timeout=10)
    assert got.attachment.connection_info.encryption.key_ref == v.encryption.key_ref
    assert not got.attachment.connection_info.encryption.passphrase
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), f"pid {pid}"
    assert key not in xml

    # a snapshot and a clone (while attached) decrypt with the same key and hold the pattern
    snap = rig.storage.CreateSnapshot(
        spb.CreateSnapshotRequest(volume_id=v.id, name=f"s-{v.id[:8]}"), timeout=60
    )
    from_snap = rig.storage.CreateVolume(
        spb.CreateVolumeRequest(name=f"fs-{v.id[:8]}", source_snapshot_id=snap.snapshot.id), timeout=60
    ).volume
    clone = rig.storage.CreateVolume(
        spb.CreateVolumeRequest(name=f"cl-{v.id[:8]}", source_volume_id=v.id), timeout=60
    ).volume
    for copy in (from_snap, clone):
        rig.volume_ids.add(copy.id)
        c = wait_available(rig, copy.id)
        assert c.encryption.key_ref == v.encryption.key_ref  # a copy reuses its source's key
        out_c = tmp_path / f"{c.id}.raw"
        decrypt(backing(rig, c.id), key, out_c)
        assert has_pattern(out_c)
        assert bytes([PATTERN]) * 4096 not in backing(rig, c.id).read_bytes()

    rig.detach(domain, v.id)
    assert luks_secrets(rig) == []
    assert rig.journal() == []

    # extend: the header stays valid, the payload grows
    rig.storage.ExtendVolume(spb.ExtendVolumeRequest(volume_id=v.id, new_size_bytes=32 * MIB), timeout=60)
    assert f.stat().st_size == 34 * MIB
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "--object", "secret,id=s0,file=/dev/stdin", "--image-opts",
         f"driver=luks,key-secret=s0,file.filename={f}"],
        input=key, check=True, capture_output=True, timeout=60, text=True,
    ).stdout  # fmt: skip
    assert json.loads(info)["virtual-size"] >= 32 * MIB
    decrypt(f, key, plain)
    assert has_pattern(plain)

    for c in (from_snap, clone):
        rig.delete_volume(c.id)
    rig.storage.DeleteSnapshot(spb.DeleteSnapshotRequest(snapshot_id=snap.snapshot.id), timeout=30)
    rig.delete_volume(v.id)

    # no key material in either daemon's log (DEBUG), nor in the catalog files
    for name in ("storage.log", "agent.log"):
        text = (rig.work / name).read_text(errors="replace")
        assert key not in text, f"the volume key is in {name}"
    for db in rig.work.glob("storage.db*"):
        assert key.encode() not in db.read_bytes(), db


def test_a_missing_or_wrong_key_is_refused_and_nothing_is_attached(rig: Rig, domain: str) -> None:
    v = create_encrypted(rig, key_size_bits=256)
    same = spb.CreateVolumeRequest(
        name=v.name, size_bytes=v.size_bytes, backend="file", encrypted=True, key_size_bits=256
    )
    assert rig.storage.CreateVolume(same, timeout=60).volume.id == v.id  # a repeat returns it
    same.encrypted = False
    err = code_of(lambda: rig.storage.CreateVolume(same, timeout=60))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
    connector = rig.agent.GetConnector(hpb.GetConnectorRequest(), timeout=10).connector
    sa = rig.storage.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=v.id, connector=connector, domain=domain), timeout=30
    ).attachment
    info = sa.connection_info
    key = info.encryption.passphrase
    assert key == passphrase(rig, v)  # CreateAttachment's answer carries the key
    again = rig.storage.GetAttachment(spb.GetAttachmentRequest(attachment_id=sa.id), timeout=10).attachment
    assert not again.connection_info.encryption.passphrase  # a read never does

    def attach(passphrase: str) -> object:
        given = pb.ConnectionInfo()
        given.CopyFrom(info)
        given.encryption.passphrase = passphrase
        return lambda: rig.agent.AttachVolume(
            hpb.AttachVolumeRequest(domain=domain, connection_info=given), timeout=60
        )

    try:
        err = code_of(attach(""))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "carries no key" in (err.details() or "")
        assert rig.live_disks(domain) == []
        assert luks_secrets(rig) == []
        assert rig.journal() == []

        wrong = "A" * len(key)
        err = code_of(attach(wrong))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert "key is wrong" in (err.details() or "")
        assert rig.live_disks(domain) == []
        assert luks_secrets(rig) == []
        assert rig.journal() == []

        a = rig.agent.AttachVolume(
            hpb.AttachVolumeRequest(domain=domain, connection_info=info), timeout=60
        ).attachment  # the right key attaches
        assert len(rig.live_disks(domain)) == 1
        assert len(luks_secrets(rig)) == 1
        rig.detach(domain, v.id)
        assert luks_secrets(rig) == []
        for name in ("storage.log", "agent.log"):
            text = (rig.work / name).read_text(errors="replace")
            assert key not in text, name
            assert wrong not in text, name
        assert a.target_dev
    finally:
        rig.storage.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=sa.id), timeout=30)
        rig.delete_volume(v.id)


@pytest.mark.parametrize("tool", ["cryptsetup", "qemu-img"])
def test_both_header_writers_make_a_luks1_volume_qemu_opens_with_the_key(tool: str, tmp_path: Path) -> None:
    """The daemon formats with cryptsetup where it is installed, with qemu-img otherwise: both headers
    open in QEMU with the key, and a wrong key opens neither."""
    if shutil.which(tool) is None:
        tier_unavailable("host", f"{tool} is not installed")
    keys = EmbeddedKeys(tmp_path / "master.key")
    crypt = VolumeCrypt(keys, Executor(), cryptsetup=tool == "cryptsetup")
    e, key = crypt.new_key(512)
    dev = tmp_path / "vol.raw"
    with open(dev, "wb") as f:
        f.truncate(8 * MIB + e.header_bytes)
    crypt.format(str(dev), e, key)
    assert dev.read_bytes()[:6] == LUKS_MAGIC
    assert dev.stat().st_size == 8 * MIB + e.header_bytes  # formatted in place, never resized
    opts = f"driver=luks,key-secret=s0,file.filename={dev}"
    io = ["qemu-io", "--object", "secret,id=s0,file=/dev/stdin", "--image-opts", opts]
    out = subprocess.run(
        [*io, "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k"],
        input=crypt.passphrase(e).reveal(), capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "read 65536/65536" in out, out
    wrong = subprocess.run(
        [*io, "-c", "read 0 64k"],
        input="not-the-key",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert wrong.returncode != 0
    assert "Invalid password" in wrong.stderr + wrong.stdout


def test_a_restarted_agent_sweeps_orphaned_key_secrets_and_keeps_the_one_a_domain_uses(
    rig: Rig, domain: str
) -> None:
    """Crash recovery: the agent killed while an encrypted volume is attached; a key secret no record
    and no domain accounts for (what a crash between defining it and the hot-plug leaves) is removed by
    the reconcile of the restarted agent; the attached volume's secret stays, and detach removes it."""
    v = create_encrypted(rig, size=8 * MIB)
    a = rig.attach(domain, v.id)
    orphan_volume = os.urandom(16).hex()
    rig.volume_ids.add(orphan_volume)
    orphan = f"blockwire-luks/{orphan_volume}/att-1"
    rig.lv().secretDefineXML(
        f"<secret ephemeral='yes' private='yes'><usage type='volume'><volume>{orphan}</volume></usage>"
        "</secret>"
    )
    live = f"blockwire-luks/{v.id}/{a.connection_info.attachment_id}"
    assert sorted(luks_secrets(rig)) == sorted([orphan, live])
    assert rig.agent_proc is not None
    rig.agent_proc.kill()
    rig.start_agent()  # reconciles on start
    assert luks_secrets(rig) == [live]
    assert len(rig.live_disks(domain)) == 1
    rig.detach(domain, v.id)
    assert luks_secrets(rig) == []
    rig.delete_volume(v.id)


def test_a_volume_type_asking_encryption_makes_encrypted_volumes(rig: Rig) -> None:
    """`encryption: <is> True` in a type's extra specs: its volumes are LUKS1 with a fresh key although
    the request does not ask; the backend must have the capability (file: yes)."""
    storage = rig.storage
    name = f"enc-type-{os.urandom(3).hex()}"
    vtype = storage.CreateVolumeType(
        spb.CreateVolumeTypeRequest(name=name, extra_specs={"encryption": "<is> True"}), timeout=10
    ).volume_type
    v = storage.CreateVolume(
        spb.CreateVolumeRequest(name=f"{name}-v", size_bytes=16 * MIB, volume_type=name), timeout=120
    ).volume
    rig.volume_ids.add(v.id)
    v = wait_available(rig, v.id)
    assert v.volume_type == name
    assert v.encryption.key_size_bits == 512
    assert v.encryption.key_ref
    with backing(rig, v.id).open("rb") as f:
        assert f.read(6) == LUKS_MAGIC
    rig.delete_volume(v.id)
    storage.DeleteVolumeType(spb.DeleteVolumeTypeRequest(volume_type=vtype.id), timeout=10)
