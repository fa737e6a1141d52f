"""Host tier, all real: encrypted RBD volumes through both daemons (blockwire-storage with its rbd backend on
the throwaway Ceph cluster and the embedded key manager; blockwire-agent, rbd_mode qemu, with libvirtd and
QEMU's librbd and luks drivers), logging at DEBUG.

The storage service writes a LUKS1 header at offset 0 of the RBD image (through librbd, README
"Encryption"); the agent's network disk carries `<encryption format='luks' engine='qemu'>` with a private
volume secret. A pattern written through QEMU reads back through QEMU, is absent from the image read with
librbd (ciphertext at rest and on the wire), and decrypts with qemu-img given the key from the key
manager; a snapshot and a copy-on-write clone (which share the key) decrypt too; an extend while
attached keeps the header valid and grows the domain's disk by the payload; detach leaves no secret;
the key is in no log, listing, catalog, journal or argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from storagesvc.keys.embedded import EmbeddedKeys
from tests.ceph import CephCluster
from tests.host.daemons import Started
from tests.host.rbd_rig import RbdAgent, ceph_secrets, disk_size, librbd_read, running_domain
from tests.host.test_encryption import LUKS_MAGIC, PATTERN, decrypt, has_pattern
from tests.host.test_rbd_storage import running, settled, write_config
from tests.rig import Daemon, hmp_qemu_io

MIB = 1 << 20


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, host_daemons: Started, ceph_cluster: CephCluster
) -> Iterator[tuple[Daemon, RbdAgent, str, Path]]:
    """blockwire-storage (rbd backend on a pool of its own, embedded key manager) and blockwire-agent
    (rbd_mode qemu) that asks it for attachments; the master key file's path."""
    pool = f"bw-{uuid.uuid4().hex[:8]}"
    ceph_cluster.create_pool(pool)
    storage_user = ceph_cluster.create_user(f"storage-{pool}", pool)
    tmp = tmp_path_factory.mktemp("rbd-crypt")
    master = tmp / "keys" / "master.key"
    config = write_config(tmp, ceph_cluster, storage_user, pool=pool)
    with config.open("a") as f:
        f.write(f'\n[keys]\nkind = "embedded"\nmaster_key_file = "{master}"\n')
    with running(config) as storage:
        agent = RbdAgent(tmp / "agent", extra=f'storage_address = "unix://{tmp}/storage.sock"')
        agent.work.mkdir()
        agent.start()
        try:
            yield storage, agent, pool, master
        finally:
            agent.stop()


def luks_secrets(virt: libvirt.virConnect, volume_id: str) -> list[str]:
    return [
        str(s.usageID())
        for s in virt.listAllSecrets(0)
        if str(s.usageID() or "").startswith(f"blockwire-luks/{volume_id}/")
    ]


def image_file(cluster: CephCluster, pool: str, image: str, size: int, out: Path) -> Path:
    """The whole image as librbd reads it (as client.admin, not through QEMU), in a file."""
    out.write_bytes(librbd_read(cluster, pool, image, 0, size))
    return out


def image_size(cluster: CephCluster, pool: str, image: str) -> int:
    return int(json.loads(cluster.cli("rbd", "info", f"{pool}/{image}", "--format", "json"))["size"])


def no_key_in_any_argv(key: str) -> None:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), f"pid {pid}"


def test_an_encrypted_rbd_volume_is_ciphertext_in_ceph_and_readable_through_qemu(
    stack: tuple[Daemon, RbdAgent, str, Path],
    ceph_cluster: CephCluster,
    virt: libvirt.virConnect,
    tmp_path: Path,
) -> None:
    storage, agent, pool, master = stack
    s = storage_pb2_grpc.StorageServiceStub(storage.channel)
    req = spb.CreateVolumeRequest(name=f"enc-{uuid.uuid4().hex[:6]}", size_bytes=16 * MIB, encrypted=True)
    v = s.CreateVolume(req, timeout=120).volume
    assert s.CreateVolume(req, timeout=60).volume.id == v.id  # a repeat returns it
    assert v.encryption.key_ref.startswith("embedded:")
    assert (v.encryption.cipher, v.encryption.key_size_bits) == ("aes-xts-plain64", 512)
    assert not v.encryption.passphrase
    key = EmbeddedKeys(master).get_key(v.encryption.key_ref).reveal()
    image = f"volume-{v.id}"
    backing = 16 * MIB + v.encryption.header_bytes
    assert librbd_read(ceph_cluster, pool, image, 0, 6) == LUKS_MAGIC

    with running_domain(virt, "bw-rbdcrypt") as dom:
        a = agent.stub.AttachVolume(
            hpb.AttachVolumeRequest(domain=dom, volume_id=v.id), timeout=60
        ).attachment
        assert a.connection_info.WhichOneof("transport") == "rbd"
        assert not a.connection_info.encryption.passphrase  # the agent never returns it
        xml = virt.lookupByName(dom).XMLDesc(0)
        assert f"protocol='rbd' name='{pool}/{image}'" in xml
        assert "<encryption format='luks' engine='qemu'>" in xml
        assert key not in xml
        assert luks_secrets(virt, v.id) == [f"blockwire-luks/{v.id}/{a.connection_info.attachment_id}"]
        assert ceph_secrets(virt, v.id) != []

        out = hmp_qemu_io(dom, a.target_dev, f"write -P {PATTERN:#x} 0 64k")
        assert "wrote 65536/65536" in out, out
        out = hmp_qemu_io(dom, a.target_dev, f"read -P {PATTERN:#x} 0 64k")
        assert "read 65536/65536" in out, out
        assert "Pattern verification failed" not in out, out

        # in Ceph: ciphertext only (where the plaintext would land, after the header, it is not there)
        raw = image_file(ceph_cluster, pool, image, backing, tmp_path / "image.raw")
        assert bytes([PATTERN]) * 4096 not in raw.read_bytes()
        plain = tmp_path / "plain.raw"
        decrypt(raw, key, plain)
        assert has_pattern(plain)

        # the key: nowhere but in CreateAttachment's answer
        (listed,) = s.ListAttachments(spb.ListAttachmentsRequest(volume_id=v.id), timeout=10).attachments
        sa = s.GetAttachment(spb.GetAttachmentRequest(attachment_id=listed.id), timeout=10).attachment
        assert sa.connection_info.encryption.key_ref == v.encryption.key_ref
        assert not sa.connection_info.encryption.passphrase
        journal = [p.read_text() for p in (agent.state / "attachments").glob("*.json")]
        assert journal
        assert all(key not in j for j in journal)
        no_key_in_any_argv(key)

        # a snapshot and a clone (copy-on-write children of the image) decrypt with the same key
        snap = s.CreateSnapshot(spb.CreateSnapshotRequest(volume_id=v.id, name=f"s-{v.id[:8]}"), timeout=60)
        copies = [
            s.CreateVolume(
                spb.CreateVolumeRequest(name=f"fs-{v.id[:8]}", source_snapshot_id=snap.snapshot.id),
                timeout=60,
            ).volume,
            s.CreateVolume(
                spb.CreateVolumeRequest(name=f"cl-{v.id[:8]}", source_volume_id=v.id), timeout=60
            ).volume,
        ]
        for copy in copies:
            c = settled(storage, copy.id)
            assert c.encryption.key_ref == v.encryption.key_ref  # a copy shares its source's key
            got = image_file(ceph_cluster, pool, f"volume-{c.id}", backing, tmp_path / f"{c.id}.raw")
            assert bytes([PATTERN]) * 4096 not in got.read_bytes()
            decrypt(got, key, tmp_path / f"{c.id}.plain")
            assert has_pattern(tmp_path / f"{c.id}.plain")

        # extend while attached: the image grows past the header, the domain's disk by the payload only
        s.ExtendVolume(spb.ExtendVolumeRequest(volume_id=v.id, new_size_bytes=32 * MIB), timeout=60)
        grow = hpb.HostAgentServiceExtendVolumeRequest(volume_id=v.id, new_size_bytes=32 * MIB)
        agent.stub.ExtendVolume(grow, timeout=30)
        assert disk_size(virt, dom, a.target_dev) == 32 * MIB
        assert image_size(ceph_cluster, pool, image) == 32 * MIB + v.encryption.header_bytes
        out = hmp_qemu_io(dom, a.target_dev, f"write -P {PATTERN:#x} 31M 64k")
        assert "wrote 65536/65536" in out, out
        out = hmp_qemu_io(dom, a.target_dev, f"read -P {PATTERN:#x} 0 64k")
        assert "Pattern verification failed" not in out, out
        assert "read 65536/65536" in out, out

        agent.detach(dom, v.id)
        agent.detach(dom, v.id)  # a repeat is OK
        assert luks_secrets(virt, v.id) == []
        assert ceph_secrets(virt, v.id) == []
        assert agent.journal() == []

    # after the extend, the header is still valid and the payload is the new size
    grown = image_file(
        ceph_cluster, pool, image, 32 * MIB + v.encryption.header_bytes, tmp_path / "grown.raw"
    )
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "--object", "secret,id=s0,file=/dev/stdin", "--image-opts",
         f"driver=luks,key-secret=s0,file.filename={grown}"],
        input=key, check=True, capture_output=True, timeout=60, text=True,
    ).stdout  # fmt: skip
    assert json.loads(info)["virtual-size"] == 32 * MIB
    decrypt(grown, key, plain)
    assert has_pattern(plain)
    with open(plain, "rb") as f:
        f.seek(31 * MIB)
        assert f.read(65536) == bytes([PATTERN]) * 65536

    for copy in copies:
        s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=copy.id), timeout=60)
    s.DeleteSnapshot(spb.DeleteSnapshotRequest(snapshot_id=snap.snapshot.id), timeout=60)
    s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=60)

    # no key material in either daemon's log (DEBUG), nor in the catalog
    for d in (storage, agent.proc):
        assert d is not None
        assert key not in d.log.read_text(errors="replace"), f"the volume key is in {d.log}"
    for db in storage.config.parent.glob("catalog.db*"):
        assert key.encode() not in db.read_bytes(), db


def test_a_wrong_or_missing_key_for_an_rbd_volume_attaches_nothing(
    stack: tuple[Daemon, RbdAgent, str, Path], virt: libvirt.virConnect
) -> None:
    """The connection info storage announced, given to the agent with the key removed (FAILED_PRECONDITION
    before anything is connected) or replaced (PERMISSION_DENIED when QEMU opens the header): no disk, no
    secret of either kind, no journal record; the wrong key in no log."""
    storage, agent, _pool, _master = stack
    s = storage_pb2_grpc.StorageServiceStub(storage.channel)
    req = spb.CreateVolumeRequest(name=f"wk-{uuid.uuid4().hex[:6]}", size_bytes=8 * MIB, encrypted=True)
    v = s.CreateVolume(req, timeout=120).volume
    connector = agent.stub.GetConnector(hpb.GetConnectorRequest(), timeout=10).connector
    with running_domain(virt, "bw-rbdcrypt") as dom:
        sa = s.CreateAttachment(
            spb.CreateAttachmentRequest(volume_id=v.id, connector=connector, domain=dom), timeout=30
        ).attachment
        try:
            key = sa.connection_info.encryption.passphrase
            assert key
            wrong = "B" * len(key)
            for passphrase, code, needle in (
                ("", grpc.StatusCode.FAILED_PRECONDITION, "carries no key"),
                (wrong, grpc.StatusCode.PERMISSION_DENIED, "key is wrong"),
            ):
                given = pb.ConnectionInfo()
                given.CopyFrom(sa.connection_info)
                given.encryption.passphrase = passphrase
                with pytest.raises(grpc.RpcError) as err:
                    agent.attach(dom, given)
                assert err.value.code() == code, err.value.details()
                assert needle in (err.value.details() or "")
                assert "protocol='rbd'" not in virt.lookupByName(dom).XMLDesc(0)
                assert luks_secrets(virt, v.id) == []
                assert ceph_secrets(virt, v.id) == []
                assert agent.journal() == []
            assert agent.proc is not None
            for d in (storage, agent.proc):
                assert wrong not in d.log.read_text(errors="replace"), d.log
        finally:
            s.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=sa.id), timeout=30)
    s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=60)
