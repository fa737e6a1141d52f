"""End to end with the kernel's initiators: an encrypted volume (LUKS1, the embedded key manager) through
blockwire's own daemons and the `file` backend, exported by `tgt` (kernel iSCSI + multipath, iscsi_mode
"kernel") and by `nvmet` (the kernel's NVMe/TCP host driver).

AttachVolume -> kernel iSCSI logins -> a multipath map -> the map hot-plugged into a no-OS domain with
<encryption format='luks' engine='qemu'> -> a pattern QEMU writes (HMP qemu-io) reads back through QEMU,
is absent from the host's block device (ciphertext on the wire) and from the volume's file, and decrypts
with qemu-img given the key from the key manager -> DetachVolume -> no libvirt secret and nothing else
left. Over NVMe/TCP the same steps (`encrypted_round_trip`) with a namespace head instead of the map.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockwire.v1 import types_pb2 as pb
from storagesvc.keys.embedded import EmbeddedKeys
from tests.guest.inside import kernel, nvmet
from tests.guest.inside.conftest import Stack, start_stack, tgt_sections
from tests.guest.inside.test_e2e_nvme import nvmet_sections
from tests.host.daemons import Tgtd
from tests.rig import hmp_qemu_io

PATTERN = 0xA5


def keys_section(workdir: Path) -> str:
    return f'[keys]\nkind = "embedded"\nmaster_key_file = "{workdir}/master.key"\n'


@pytest.fixture(scope="module")
def crypt_stack(tgtd: Tgtd, libvirtd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack-crypt")
    stack = start_stack(workdir, tgt_sections(workdir, tgtd) + keys_section(workdir))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def nvme_crypt_stack(libvirtd: None) -> Iterator[Stack]:
    why = nvmet.available()
    if why:
        pytest.fail(f"NVMe/TCP is not available in the guest: {why}", pytrace=False)
    # On the root file system, not /tmp: nvmet opens a file backing with O_DIRECT, which 6.1's tmpfs refuses.
    workdir = Path(f"/var/tmp/bw-e2e-nvme-crypt-{uuid.uuid4().hex[:6]}")
    prefix = f"nqn.2026-01.io.blockwire.e{uuid.uuid4().hex[:8]}"
    stack = start_stack(workdir, nvmet_sections(workdir, prefix) + keys_section(workdir))
    try:
        assert pb.TRANSPORT_NVME_TCP in stack.agent.get_connector().transports
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def encrypted_round_trip(
    s: Stack, domain: str, name: str, tmp_path: Path, check_device: Callable[[str], None]
) -> None:
    """A new encrypted volume attached by AttachVolume -> the disk XML has <encryption format='luks'
    engine='qemu'> -> a pattern QEMU writes reads back through QEMU, is absent from the host's block
    device (ciphertext on the wire) and from the volume's file, and decrypts with qemu-img given the key
    from the key manager -> DetachVolume -> no libvirt secret, `check_device` of the transport's leftovers,
    the key in no log."""
    vol = s.storage.create_volume(name, 16 * kernel.MiB, encrypted=True)
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
        out = hmp_qemu_io(domain, att.target_dev, f"write -P {PATTERN:#x} 0 64k", timeout=120)
        assert "wrote 65536/65536" in out, out
        out = hmp_qemu_io(domain, att.target_dev, f"read -P {PATTERN:#x} 0 64k", timeout=120)
        assert "read 65536/65536" in out, out
        assert "Pattern verification failed" not in out, out

        block = b"".join(kernel.read_at(att.host_device, m) for m in range(4))  # header + first payload MiBs
        assert block[:6] == b"LUKS\xba\xbe"  # the host's device is the whole volume, header included
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
        check_device(att.host_device)
        for log in s.workdir.glob("*.log"):
            assert key not in log.read_text(errors="replace"), log
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)


def test_encrypted_volume_over_kernel_iscsi_is_ciphertext_on_the_device_and_at_rest(
    clean_host: None, crypt_stack: Stack, domain: str, tmp_path: Path
) -> None:
    def nothing_left(_device: str) -> None:
        assert kernel.leftovers() == {}

    encrypted_round_trip(crypt_stack, domain, f"e2e-enc-{uuid.uuid4().hex[:6]}", tmp_path, nothing_left)


def test_encrypted_volume_over_kernel_nvme_tcp_is_ciphertext_on_the_device_and_at_rest(
    clean_nvme: None, nvme_crypt_stack: Stack, domain: str, tmp_path: Path
) -> None:
    """The same over NVMe/TCP: the kernel's NVMe/TCP host driver, a namespace head hot-plugged as a block
    disk that QEMU decrypts (`clean_nvme` checks no controller, subsystem or namespace is left)."""

    def head_gone(device: str) -> None:
        assert not Path(device).exists(), device

    encrypted_round_trip(
        nvme_crypt_stack, domain, f"e2e-enc-nvme-{uuid.uuid4().hex[:6]}", tmp_path, head_gone
    )
