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
from hostagent.connectors.base import SecretStore
from hostagent.model import Finding
from hostagent.virt.diskxml import DiskEncryption

log = logging.getLogger(__name__)

SECRET_TYPE = "volume"  # noqa: S105 - libvirt secret usage type, not a password
SECRET_PREFIX = "blockwire-luks/"  # noqa: S105 - the usage ids of our volume secrets start with it


def secret_usage(info: ConnectionInfo) -> str:
    """One secret per attachment (two domains of a multiattach volume never share one)."""
    return f"{SECRET_PREFIX}{info.volume_id}/{info.attachment_id or 'direct'}"


class VolumeKeys:
    def __init__(self, secrets: SecretStore) -> None:
        self.secrets = secrets

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

    def sweep(self, keep: list[ConnectionInfo]) -> list[str]:
        """Undefines our volume secrets that neither a journal record (`keep`) nor a domain refers to."""
        wanted = {secret_usage(i) for i in keep if i.encryption is not None}
        removed = []
        for usage in self.secrets.unused_secrets(SECRET_PREFIX, SECRET_TYPE):
            if usage not in wanted and self.secrets.undefine_secret(usage, SECRET_TYPE):
                removed.append(f"libvirt secret {usage}")
        return removed

    def audit(self, keep: list[ConnectionInfo]) -> list[Finding]:
        """Our volume secrets that neither a record (`keep`) nor a domain refers to (sweep's, listed)."""
        wanted = {secret_usage(i) for i in keep if i.encryption is not None}
        return [
            Finding(
                "libvirt_secret",
                usage,
                f"an encrypted volume's key ({SECRET_TYPE} secret) no attachment and no domain uses",
                fixable=True,
                volume_id=usage.removeprefix(SECRET_PREFIX).partition("/")[0],
            )
            for usage in self.secrets.unused_secrets(SECRET_PREFIX, SECRET_TYPE)
            if usage not in wanted
        ]

    def fix(self, finding: Finding) -> bool:
        """Undefines an orphaned volume secret of `audit`, if still no domain uses it."""
        if finding.kind != "libvirt_secret" or not finding.name.startswith(SECRET_PREFIX):
            return False
        if finding.name not in self.secrets.unused_secrets(SECRET_PREFIX, SECRET_TYPE):
            return False
        return self.secrets.undefine_secret(finding.name, SECRET_TYPE)
