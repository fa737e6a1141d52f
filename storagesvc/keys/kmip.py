"""The KMIP key manager (PyKMIP's client, `pip install blockwire[kmip]`): each volume key is an AES
symmetric key created and kept by a KMIP server; the catalog stores its unique identifier only
(`kmip:<uid>`). The storage service authenticates with a client certificate (mutual TLS).

Each call opens its own connection (PyKMIP's client is not thread-safe); a server that does not answer
is UNAVAILABLE naming it.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from kmip.core import enums
from kmip.core import exceptions as kexc
from kmip.pie import exceptions as pexc
from kmip.pie.client import ProxyKmipClient

from blockwire.errors import FailedPrecondition, Unavailable
from blockwire.secret import Secret
from storagesvc.keys.base import KeysConfig, passphrase_of

log = logging.getLogger(__name__)

PREFIX = "kmip:"


class KmipKeys:
    def __init__(self, cfg: KeysConfig) -> None:
        self.cfg = cfg
        self.name = f"KMIP server {cfg.host}:{cfg.port}"

    def _client(self) -> Any:
        return ProxyKmipClient(
            hostname=self.cfg.host,
            port=self.cfg.port,
            cert=self.cfg.cert_file,
            key=self.cfg.key_file,
            ca=self.cfg.ca_file,
            config_file="/dev/null",
        )

    def _call(self, what: str, fn: Any) -> Any:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(self.cfg.timeout)
        try:
            client = self._client()
            try:
                client.open()
            except (OSError, ssl.SSLError, pexc.ClientConnectionFailure, kexc.KmipError) as exc:
                raise Unavailable(f"{self.name} is unreachable while {what}: {type(exc).__name__}") from None
            try:
                return fn(client)
            except pexc.KmipOperationFailure as exc:
                raise FailedPrecondition(f"{self.name} refused {what}: {exc.reason}") from None
            except (OSError, ssl.SSLError, kexc.KmipError) as exc:
                raise Unavailable(f"{self.name} failed while {what}: {type(exc).__name__}") from None
            finally:
                client.close()
        finally:
            socket.setdefaulttimeout(old)

    def check(self) -> None:
        self._call("checking it", lambda c: None)

    def create_key(self, bits: int) -> tuple[str, Secret]:
        def work(c: Any) -> tuple[str, Secret]:
            uid = c.create(enums.CryptographicAlgorithm.AES, 256, name="blockwire volume key")
            key = c.get(uid)
            return PREFIX + str(uid), passphrase_of(bytes(key.value))

        result: tuple[str, Secret] = self._call("creating a volume key", work)
        log.info("%s: volume key %s created", self.name, result[0])
        return result

    def get_key(self, key_ref: str) -> Secret:
        if not key_ref.startswith(PREFIX):
            raise FailedPrecondition(f"key {key_ref[:24]}... is not a key of the {self.name}")
        uid = key_ref[len(PREFIX) :]

        def work(c: Any) -> Secret:
            return passphrase_of(bytes(c.get(uid).value))

        secret: Secret = self._call(f"reading volume key {key_ref}", work)
        return secret

    def delete_key(self, key_ref: str) -> None:
        if not key_ref.startswith(PREFIX):
            return
        uid = key_ref[len(PREFIX) :]
        try:
            self._call(f"destroying volume key {key_ref}", lambda c: c.destroy(uid))
        except FailedPrecondition as exc:
            log.warning("%s", exc.message)  # gone already, or not destroyable: nothing more to do here
