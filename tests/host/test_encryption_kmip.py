"""Host tier, all real: encrypted volumes with their keys in a KMIP server (PyKMIP's software server,
started by the test under its temp dir with generated certificates, mutual TLS), through both daemons.

(a) An encrypted volume's key is created in the KMIP server (the catalog holds only its id); QEMU writes
    a pattern that is ciphertext at rest and decrypts with qemu-img given the key read from the server.
(b) The KMIP server down: creating an encrypted volume, attaching one and deleting one are UNAVAILABLE
    naming the server, and nothing is attached or half-done; once it is back, the attach works.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from hostagent.journal import read_record_file
from storagesvc.keys.base import KeysConfig
from tests.conftest import tier_unavailable
from tests.fakes.daemon_rig import Rig, define_domain, force_cleanup, remove_domain
from tests.fakes.kmip_server import KmipServer, pykmip_server
from tests.host.daemons import Started, Tgtd
from tests.host.test_encryption import (
    MIB,
    PATTERN,
    backing,
    code_of,
    create_encrypted,
    decrypt,
    has_pattern,
    luks_secrets,
)
from tests.rig import hmp_qemu_io


@pytest.fixture(scope="module")
def kmip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmipServer]:
    if pykmip_server() is None:
        tier_unavailable("host", "PyKMIP is not installed (pip install -e '.[kmip]'; scripts/setup does)")
    with KmipServer(tmp_path_factory.mktemp("kmip")).running() as server:
        yield server


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def rig(
    host_daemons: Started,
    tgtd: Tgtd,
    kmip: KmipServer,
    tmp_path_factory: pytest.TempPathFactory,
    virt: libvirt.virConnect,
) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("crypt-kmip")
    with Rig(work=work, tgtd=tgtd, virt=virt, storage_config=kmip.keys_toml()).running() as r:
        yield r


@pytest.fixture
def domain(rig: Rig) -> Iterator[str]:
    name = define_domain(rig.lv(), "bw-kmip")
    try:
        yield name
    finally:
        force_cleanup(rig, name)
        remove_domain(rig.lv(), name)


def kmip_key(kmip: KmipServer, key_ref: str) -> str:
    from storagesvc.keys.kmip import KmipKeys  # noqa: PLC0415 - PyKMIP is optional

    cfg = KeysConfig(
        kind="kmip",
        host="127.0.0.1",
        port=kmip.port,
        cert_file=str(kmip.client.cert),
        key_file=str(kmip.client.key),
        ca_file=str(kmip.ca),
    )
    return KmipKeys(cfg).get_key(key_ref).reveal()


def test_kmip_key_encrypts_what_qemu_writes(rig: Rig, kmip: KmipServer, domain: str, tmp_path: Path) -> None:
    v = create_encrypted(rig)
    assert v.encryption.key_ref.startswith("kmip:")
    key = kmip_key(kmip, v.encryption.key_ref)
    a = rig.attach(domain, v.id)
    out = hmp_qemu_io(domain, a.target_dev, f"write -P {PATTERN:#x} 0 64k")
    assert "wrote 65536/65536" in out, out
    out = hmp_qemu_io(domain, a.target_dev, f"read -P {PATTERN:#x} 0 64k")
    assert "Pattern verification failed" not in out, out
    assert bytes([PATTERN]) * 4096 not in backing(rig, v.id).read_bytes()
    plain = tmp_path / "plain.raw"
    decrypt(backing(rig, v.id), key, plain)
    assert has_pattern(plain)
    rig.detach(domain, v.id)
    assert luks_secrets(rig) == []
    for name in ("storage.log", "agent.log"):
        assert key not in (rig.work / name).read_text(errors="replace"), name
    rig.delete_volume(v.id)
    with pytest.raises(Exception, match="ITEM_NOT_FOUND"):
        kmip_key(kmip, v.encryption.key_ref)  # destroyed with its last volume


def test_kmip_server_down_is_unavailable_naming_it_and_nothing_is_attached(
    rig: Rig, kmip: KmipServer, domain: str
) -> None:
    v = create_encrypted(rig, size=8 * MIB)
    kmip.stop()
    try:
        err = code_of(
            lambda: rig.storage.CreateVolume(
                spb.CreateVolumeRequest(
                    name=f"enc-{uuid.uuid4().hex[:8]}", size_bytes=8 * MIB, backend="file", encrypted=True
                ),
                timeout=60,
            )
        )
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert f"KMIP server {kmip.address}" in (err.details() or "")

        err = code_of(
            lambda: rig.agent.AttachVolume(hpb.AttachVolumeRequest(domain=domain, volume_id=v.id), timeout=60)
        )
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert f"KMIP server {kmip.address}" in (err.details() or "")
        assert rig.live_disks(domain) == []
        assert luks_secrets(rig) == []
        # the agent cannot tell "storage refused" from "storage lost the answer" in an UNAVAILABLE: it
        # keeps its record (ERROR) for a detach or a repeat to settle; storage exported nothing
        records = [read_record_file(rig.state / "attachments" / r) for r in rig.journal()]
        assert [r["state"] for r in records] in ([], ["error"]), records
        assert rig.attachments(v.id) == []
        assert rig.volume(v.id).state == pb.VOLUME_STATE_AVAILABLE

        err = code_of(lambda: rig.storage.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=30))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert rig.volume(v.id).state == pb.VOLUME_STATE_AVAILABLE  # nothing half-done
    finally:
        kmip.start()
    rig.detach(domain, v.id)  # settles the agent's record
    assert rig.journal() == []
    rig.attach(domain, v.id)  # back: the key is still there
    assert len(rig.live_disks(domain)) == 1
    rig.detach(domain, v.id)
    rig.delete_volume(v.id)
