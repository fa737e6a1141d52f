"""Encrypted volumes at rest: LUKS1 headers written with `qemu-img`, keys from a key manager.

A new encrypted volume's backing device is `HEADER_BYTES` (2 MiB) larger than the volume: `qemu-img
create -f luks` writes a header-only LUKS1 image (aes-xts-plain64, sha256, one key slot opened by the
passphrase the key manager returned) into a private temporary directory, and its bytes are copied to the
start of the device. LUKS1 records no payload size, so the payload is the rest of the device: an extend
grows the device and QEMU's luks driver sees the new size. QEMU's payload starts at the header's
payload offset (2068480 bytes for 512-bit keys), so the guest sees a few KiB more than `size_bytes`.

The passphrase reaches qemu-img on its stdin (`--object secret,file=/dev/stdin`), never its argv or a
file. Snapshots and clones copy the header with the bytes, so they open with their source's key (the
key is shared, see `Volumes.delete`: it is destroyed with the last volume or snapshot that uses it).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from blockwire.errors import FailedPrecondition, InvalidArgument
from blockwire.model import LUKS_CIPHER, LUKS_KEY_SIZES, Encryption
from blockwire.runtime.executor import CommandFailed, Runner
from blockwire.secret import Secret
from storagesvc.keys.base import KeyManager
from storagesvc.model import MIB

log = logging.getLogger(__name__)

HEADER_BYTES = 2 * MIB
PBKDF_ITER_TIME_MS = 10
CPU_CLOCK_ERROR = "Unable to get accurate CPU usage"
CPU_CLOCK_ATTEMPTS = 5  # the passphrase is a random 256-bit key: key stretching buys nothing


def key_size(bits: int) -> int:
    bits = bits or 512
    if bits not in LUKS_KEY_SIZES:
        raise InvalidArgument("key_size_bits", "256 (AES-128-XTS) or 512 (AES-256-XTS)")
    return bits


class VolumeCrypt:
    """Creates keys and LUKS headers, and fetches keys for attachments."""

    def __init__(self, keys: KeyManager, runner: Runner, *, timeout: float = 120.0) -> None:
        self.keys = keys
        self.runner = runner
        self.timeout = timeout

    def new_key(self, bits: int) -> tuple[Encryption, Secret]:
        ref, passphrase = self.keys.create_key(bits)
        return Encryption(LUKS_CIPHER, bits, ref, None, HEADER_BYTES), passphrase

    def passphrase(self, e: Encryption) -> Secret:
        return self.keys.get_key(e.key_ref)

    def format(self, device_path: str, e: Encryption, passphrase: Secret) -> None:
        """Writes a LUKS1 header for `passphrase` at the start of `device_path` (a file or block device)."""
        with tempfile.TemporaryDirectory(prefix="bw-luks-") as tmp:
            os.chmod(tmp, 0o700)
            header = Path(tmp) / "header.luks"
            aes = "aes-256" if e.key_size_bits == 512 else "aes-128"
            opts = (
                f"key-secret=s0,cipher-alg={aes},cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256,"
                f"iter-time={PBKDF_ITER_TIME_MS}"
            )
            argv = ["qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s0,file=/dev/stdin"]
            for attempt in range(1, CPU_CLOCK_ATTEMPTS + 1):
                try:
                    self.runner.run(
                        [*argv, "-o", opts, str(header), "0"], stdin=passphrase, timeout=self.timeout
                    )
                    break
                except CommandFailed as exc:
                    # QEMU times a PBKDF2 pass by the thread's CPU clock; with tick-based accounting a
                    # fast pass can measure 0 ms and qemu-img gives up: a new run measures again
                    if CPU_CLOCK_ERROR in exc.stderr and attempt < CPU_CLOCK_ATTEMPTS:
                        log.info("qemu-img could not time PBKDF2 (attempt %d); running it again", attempt)
                        continue
                    raise FailedPrecondition(f"writing the LUKS header failed: {exc.message}") from exc
            data = header.read_bytes()
        if len(data) > e.header_bytes:
            raise FailedPrecondition(f"the LUKS header is {len(data)} bytes, more than {e.header_bytes}")
        fd = os.open(device_path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.debug("LUKS1 header (%d bytes, %s) written to %s", len(data), aes, device_path)
