"""The key manager interface and its configuration ([keys] in the storage config)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Protocol

from blockwire.secret import Secret

KEY_KINDS = ("embedded", "kmip")


@dataclass(frozen=True)
class KeysConfig:
    """[keys]: the key manager of encrypted volumes.

    * kind = "embedded" (default): `master_key_file` (default `<catalog dir>/master.key`, created 0600 with
      a random 256-bit key when missing; keep it out of catalog backups);
    * kind = "kmip": `host`, `port` (5696), `cert_file`/`key_file` (the client certificate), `ca_file`
      (the server's CA), `timeout` seconds per call.
    """

    kind: str = "embedded"
    master_key_file: str = ""
    host: str = ""
    port: int = 5696
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    timeout: float = 10.0


class KeyManager(Protocol):
    """Creates, returns and destroys volume keys. A key is returned as the LUKS passphrase (a `Secret`);
    the catalog stores only the `key_ref` (a wrapped key or a server-side id). Raises Unavailable naming
    the key manager when it cannot be reached, FailedPrecondition when a key is gone or does not unwrap."""

    #: What messages call it: "embedded key manager", "KMIP server 127.0.0.1:5696".
    name: str

    def create_key(self, bits: int) -> tuple[str, Secret]:
        """A fresh random key of `bits` bits: (key_ref, passphrase)."""
        ...

    def get_key(self, key_ref: str) -> Secret: ...

    def delete_key(self, key_ref: str) -> None:
        """Destroys the key; a key already gone is OK."""
        ...

    def check(self) -> None:
        """Raises Unavailable when the key manager cannot be used now."""
        ...


def passphrase_of(key: bytes) -> Secret:
    """The LUKS passphrase of raw key bytes: base64url, ASCII on one line (libvirt and QEMU secret values
    are taken verbatim)."""
    return Secret(base64.urlsafe_b64encode(key).decode().rstrip("="))
