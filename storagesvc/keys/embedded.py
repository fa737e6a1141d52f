"""The embedded key manager: each volume's random key is wrapped (AES-256-GCM) with a master key kept in
a 0600 file outside the catalog, and the wrapped key is the `key_ref` the catalog stores. Someone with the
catalog alone (a backup, a PostgreSQL dump) cannot unwrap it; someone with the storage host's root can.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blockwire.errors import FailedPrecondition, Unavailable
from blockwire.secret import Secret
from storagesvc.keys.base import passphrase_of

PREFIX = "embedded:v1:"
_AAD = b"blockwire volume key v1"
MASTER_BYTES = 32


def _aesgcm(key: bytes) -> AESGCM:
    return AESGCM(key)


class EmbeddedKeys:
    name = "embedded key manager"

    def __init__(self, master_key_file: str | Path) -> None:
        self.path = Path(master_key_file)
        self._master: bytes | None = None

    def _load(self) -> bytes:
        if self._master is not None:
            return self._master
        try:
            if not self.path.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                try:
                    os.write(fd, secrets.token_bytes(MASTER_BYTES))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            st = self.path.stat()
            if st.st_mode & 0o077:
                raise Unavailable(
                    f"{self.name}: {self.path} is readable by others "
                    f"(mode {st.st_mode & 0o777:o}); chmod 600 it"
                )
            data = self.path.read_bytes()
        except FileExistsError:  # created by a concurrent call
            data = self.path.read_bytes()
        except OSError as exc:
            raise Unavailable(f"{self.name}: cannot read the master key {self.path}: {exc.strerror}") from exc
        if len(data) != MASTER_BYTES:
            raise Unavailable(f"{self.name}: {self.path} is not a {MASTER_BYTES}-byte master key")
        self._master = data
        return data

    def check(self) -> None:
        self._load()

    def create_key(self, bits: int) -> tuple[str, Secret]:
        key = secrets.token_bytes(32)  # the passphrase's entropy; LUKS makes its own master key
        nonce = secrets.token_bytes(12)
        wrapped = _aesgcm(self._load()).encrypt(nonce, key, _AAD)
        ref = PREFIX + base64.urlsafe_b64encode(nonce + wrapped).decode()
        return ref, passphrase_of(key)

    def get_key(self, key_ref: str) -> Secret:
        if not key_ref.startswith(PREFIX):
            raise FailedPrecondition(f"key {key_ref[:24]}... is not a key of the {self.name}")
        try:
            blob = base64.urlsafe_b64decode(key_ref[len(PREFIX) :])
        except (binascii.Error, ValueError):
            raise FailedPrecondition(f"{self.name}: the volume's wrapped key is corrupt") from None
        try:
            key = _aesgcm(self._load()).decrypt(blob[:12], blob[12:], _AAD)
        except (InvalidTag, ValueError):
            raise FailedPrecondition(
                f"{self.name}: the volume's key does not unwrap with the master key {self.path} "
                "(another service's key, or the master key was replaced)"
            ) from None
        return passphrase_of(key)

    def delete_key(self, key_ref: str) -> None:
        """Nothing to do: the wrapped key lives only in the catalog row that is being deleted."""
