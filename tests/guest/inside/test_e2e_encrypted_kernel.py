"""End to end with the kernel initiator (iscsi_mode "kernel"): an encrypted volume (LUKS1, the embedded key
manager) through blockwire's own daemons, the `file` backend and the `tgt` exporter.

AttachVolume -> kernel iSCSI logins -> a multipath map -> the map hot-plugged into a no-OS domain with
<encryption format='luks' engine='qemu'> -> a pattern QEMU writes (HMP qemu-io) reads back through QEMU,
is absent from the host's block device (ciphertext on the wire) and from the volume's file, and decrypts
with qemu-img given the key from the key manager -> DetachVolume -> no libvirt secret and nothing else left.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storagesvc.keys.embedded import EmbeddedKeys
from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack, start_stack, tgt_sections
from tests.host.daemons import Tgtd

PATTERN = 0xA5


@pytest.fixture(scope="module")
def crypt_stack(tgtd: Tgtd, libvirtd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack-crypt")
    keys = f'[keys]\nkind = "embedded"\nmaster_key_file = "{workdir}/master.key"\n'
    stack = start_stack(workdir, tgt_sections(workdir, tgtd) + keys)
    yield stack
    stack.stop()


def qemu_io(domain: str, target_dev: str, command: str) -> str:
    """HMP qemu-io on the disk; its output lands in the domain's QEMU log: returns the lines it added."""
    xml = kernel.domain_xml(domain)
    alias = xml.split(f"<target dev='{target_dev}'")[1].split("<alias name='")[1].split("'")[0]
    log = Path(f"/var/log/libvirt/qemu/{domain}.log")
    size = log.stat().st_size
    kernel.virsh("qemu-monitor-command", domain, "--hmp", f'qemu-io -d {alias} "{command}"', timeout=120)
    with open(log, "rb") as f:
        f.seek(size)
        return f.read().decode(errors="replace")


def test_encrypted_volume_over_kernel_iscsi_is_ciphertext_on_the_device_and_at_rest(
    clean_host: None, crypt_stack: Stack, domain: str, tmp_path: Path
) -> None:
    s = crypt_stack
    vol = s.storage.create_volume(f"e2e-enc-{uuid.uuid4().hex[:6]}", 16 * kernel.MiB, encrypted=True)
    vol = s.storage.wait_volume(vol.id, timeout=120)
    assert vol.encryption.key_ref.startswith("embedded:")
    key = EmbeddedKeys(s.workdir / "master.key").get_key(vol.encryption.key_ref).reveal()
    attached = False
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        attached = True
        assert att.host_device.startswith("/dev/")
        xml = kernel.domain_xml(domain)
        assert "<encryption format='luks' engine='qemu'>" in xml
        assert key not in xml
        out = qemu_io(domain, att.target_dev, f"write -P {PATTERN:#x} 0 64k")
        assert "wrote 65536/65536" in out, out
        out = qemu_io(domain, att.target_dev, f"read -P {PATTERN:#x} 0 64k")
        assert "read 65536/65536" in out, out
        assert "Pattern verification failed" not in out, out

        block = b"".join(kernel.read_at(att.host_device, m) for m in range(4))  # header + first payload MiBs
        assert bytes([PATTERN]) * 4096 not in block  # the host's device (and the wire) see ciphertext
        f = s.volume_file(vol.id)
        assert bytes([PATTERN]) * 4096 not in f.read_bytes()
        plain = tmp_path / "plain.raw"
        subprocess.run(
            ["qemu-img", "convert", "--object", "secret,id=s0,file=/dev/stdin", "--image-opts",
             f"driver=luks,key-secret=s0,file.filename={f}", "-O", "raw", str(plain)],
            input=key.encode(), check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with open(plain, "rb") as p:
            assert p.read(65536) == bytes([PATTERN]) * 65536

        s.agent.detach_volume(domain, vol.id)
        attached = False
        secrets = kernel.virsh("secret-list").stdout
        assert "blockwire-luks/" not in secrets, secrets
        kernel.settle()
        assert kernel.leftovers() == {}
        for log in s.workdir.glob("*.log"):
            assert key not in log.read_text(errors="replace"), log
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)
