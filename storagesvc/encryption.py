"""Encrypted volumes at rest: LUKS1 headers (cryptsetup or qemu-img), keys from a key manager.

A new encrypted volume's backing device is `HEADER_BYTES` (2 MiB) larger than the volume. Where
cryptsetup is installed (Debian `cryptsetup-bin`), `cryptsetup luksFormat --type luks1` formats the
device in place (aes-xts-plain64, sha256, one key slot opened by the passphrase the key manager returned,
payload at exactly 2 MiB); otherwise `qemu-img create -f luks` writes a header-only LUKS1 image into a
private temporary directory and its bytes are copied to the start of the device (qemu-img benchmarks
its PBKDF first: seconds per volume; QEMU's payload then starts at 2068480 bytes for 512-bit keys, so
the guest sees a few KiB more than `size_bytes`). LUKS1 records no payload size, so the payload is the
rest of the device: an extend grows the device and QEMU's luks driver sees the new size.

An RBD image is not a file the service opens: `header` makes the same LUKS1 header in a private
temporary file and the rbd backend writes its bytes at offset 0 of the image through librbd (no
mapping, no `rbd:` target on a command line). RBD snapshots and clones are copy-on-write children that
share the header, hence the key, with their parent; an extend grows the image past the header.

The passphrase reaches either tool on its stdin (`--key-file -`, `--object secret,file=/dev/stdin`),
never its argv or a file. Snapshots and clones copy the header with the bytes, so they open with their
source's key (the key is shared: it is destroyed with the last volume or snapshot that uses it).
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
# The passphrase is a random 256-bit key: key stretching buys nothing, and QEMU runs the PBKDF at every open.
PBKDF_ITER_TIME_MS = 10  # qemu-img
PBKDF_ITERATIONS = 1000  # cryptsetup (its minimum)
CPU_CLOCK_ERROR = "Unable to get accurate CPU usage"  # qemu-img timing its PBKDF (see `_qemu_img`)
CPU_CLOCK_ATTEMPTS = 5


def key_size(bits: int) -> int:
    bits = bits or 512
    if bits not in LUKS_KEY_SIZES:
        raise InvalidArgument("key_size_bits", "256 (AES-128-XTS) or 512 (AES-256-XTS)")
    return bits


class VolumeCrypt:
    """Creates keys and LUKS headers, and fetches keys for attachments."""

    def __init__(
        self, keys: KeyManager, runner: Runner, *, cryptsetup: bool = False, timeout: float = 120.0
    ) -> None:
        self.keys = keys
        self.runner = runner
        self.cryptsetup = cryptsetup  # format with cryptsetup (fast) rather than qemu-img
        self.timeout = timeout

    def new_key(self, bits: int) -> tuple[Encryption, Secret]:
        ref, passphrase = self.keys.create_key(bits)
        return Encryption(LUKS_CIPHER, bits, ref, None, HEADER_BYTES), passphrase

    def passphrase(self, e: Encryption) -> Secret:
        return self.keys.get_key(e.key_ref)

    def format(self, device_path: str, e: Encryption, passphrase: Secret) -> None:
        """Writes a LUKS1 header for `passphrase` at the start of `device_path` (a file or block device)."""
        if self.cryptsetup:
            self._cryptsetup(device_path, e, passphrase)
        else:
            _write_at_start(device_path, self._qemu_img(e, passphrase))

    def header(self, e: Encryption, passphrase: Secret) -> bytes:
        """A LUKS1 header for `passphrase` as bytes (at most `e.header_bytes`), for a volume the service
        cannot open as a file (an RBD image: the backend writes them at offset 0 through librbd). Made in
        a private (0700) temporary directory that is removed at once; the header holds the volume key
        only wrapped by the passphrase, as it does on the volume."""
        if not self.cryptsetup:
            return self._qemu_img(e, passphrase)
        with tempfile.TemporaryDirectory(prefix="bw-luks-") as tmp:
            os.chmod(tmp, 0o700)
            dev = Path(tmp) / "header.luks"
            with open(dev, "wb") as f:  # sparse; one data sector past the header so cryptsetup is content
                f.truncate(e.header_bytes + 4096)
            self._cryptsetup(str(dev), e, passphrase)
            with open(dev, "rb") as f:
                return f.read(e.header_bytes)

    def _cryptsetup(self, device_path: str, e: Encryption, passphrase: Secret) -> None:
        """`cryptsetup luksFormat --type luks1` in place, the passphrase on stdin (`--key-file -`); no
        PBKDF benchmark (fixed iterations), payload at 2 MiB exactly."""
        argv = [
            "cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--cipher", LUKS_CIPHER,
            "--key-size", str(e.key_size_bits), "--hash", "sha256",
            "--pbkdf-force-iterations", str(PBKDF_ITERATIONS), "--align-payload", str(e.header_bytes // 512),
            "--key-file", "-", device_path,
        ]  # fmt: skip
        try:
            self.runner.run(argv, stdin=passphrase, timeout=self.timeout)
        except CommandFailed as exc:
            raise FailedPrecondition(f"writing the LUKS header failed: {exc.message}") from exc
        log.debug("LUKS1 header (cryptsetup, %d-bit key) written to %s", e.key_size_bits, device_path)

    def _qemu_img(self, e: Encryption, passphrase: Secret) -> bytes:
        """Without cryptsetup: a header-only image from `qemu-img create -f luks` (which benchmarks its
        PBKDF first: seconds), to be copied to the start of the device."""
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
        log.debug("LUKS1 header (%d bytes, %s) made by qemu-img", len(data), aes)
        return data


def _write_at_start(device_path: str, data: bytes) -> None:
    fd = os.open(device_path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.debug("LUKS1 header (%d bytes) written to %s", len(data), device_path)
