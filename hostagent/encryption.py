"""Encrypted volumes on the host: QEMU decrypts LUKS1 with a passphrase held in a private libvirt secret.

Per attachment, `VolumeKeys.define` makes a libvirt secret of usage type 'volume' (private: the value
cannot be read back through libvirt's API; ephemeral: never written to the host's disk) holding the
passphrase storage sent in CreateAttachment's answer, and returns the disk XML's
`<encryption format='luks' engine='qemu'><secret type='passphrase' uuid=.../></encryption>`. The same
element serves block, file and network disks, so every connector's volumes decrypt the same way.

The passphrase lives only in memory, in that libvirt secret and in QEMU: the journal stores connection
info without it (`ConnectionInfo.without_key`). Detach removes the secret (`remove`, from the agent's
disconnect step); reconcile sweeps secrets under our prefix that no record and no domain refers to.
"""

from __future__ import annotations

import logging

from blockwire.errors import FailedPrecondition
from blockwire.model import ConnectionInfo
from hostagent.connectors.base import PrivateSecrets, PrivateSecretsOwner, SecretStore
from hostagent.virt.diskxml import DiskEncryption

log = logging.getLogger(__name__)

SECRET_TYPE = "volume"  # noqa: S105 - libvirt secret usage type, not a password
SECRET_PREFIX = "blockwire-luks/"  # noqa: S105 - the usage ids of our volume secrets start with it


def secret_usage(info: ConnectionInfo) -> str:
    """One secret per attachment (two domains of a multiattach volume never share one)."""
    return f"{SECRET_PREFIX}{info.volume_id}/{info.attachment_id or 'direct'}"


class VolumeKeys(PrivateSecretsOwner):
    def __init__(self, secrets: SecretStore) -> None:
        self.secrets = secrets
        self._private = PrivateSecrets(secrets, SECRET_PREFIX, SECRET_TYPE, "an encrypted volume's key")

    @staticmethod
    def check(info: ConnectionInfo) -> None:
        """Before anything is connected: an encrypted volume needs its key in the connection info."""
        e = info.encryption
        if e is not None and e.passphrase is None:
            raise FailedPrecondition(
                f"volume {info.volume_id} is encrypted ({e.format}, {e.cipher}) but its connection info "
                "carries no key; attach it through the storage service (the key comes with the "
                "attachment), or pass the key in connection_info.encryption.passphrase"
            )

    def define(self, info: ConnectionInfo) -> DiskEncryption | None:
        """The disk's <encryption>, after defining the attachment's secret; None for a plain volume."""
        e = info.encryption
        if e is None:
            return None
        self.check(info)
        assert e.passphrase is not None
        uuid = self.secrets.define_secret(secret_usage(info), SECRET_TYPE, e.passphrase)
        log.debug("volume %s: LUKS passphrase secret %s defined", info.volume_id, secret_usage(info))
        return DiskEncryption(secret_uuid=uuid, format=e.format)

    def remove(self, info: ConnectionInfo) -> bool:
        """Undefines the attachment's secret; False when there was none (a repeat, a plain volume)."""
        if info.encryption is None:
            return False
        return self.secrets.undefine_secret(secret_usage(info), SECRET_TYPE)

    def _wanted(self, keep: list[ConnectionInfo]) -> set[str]:
        return {secret_usage(i) for i in keep if i.encryption is not None}
