"""iSCSI through QEMU's own initiator (libiscsi): no host block device; the disk is a libvirt network disk.

Used on hosts without a kernel iSCSI initiator (no /sys/module/iscsi_tcp), or when configured. CHAP goes
through a private libvirt secret (usage type iscsi) defined at connect and undefined at disconnect; the
disk's <source><initiator> carries the initiator name the target's ACL admits. Before QEMU is given the
LUN, a `LunReader` (libiscsi in process, or its iscsi-inq tool) reads its VPD page 0x83 with the same
credentials: a wrong password is refused here (PERMISSION_DENIED), and a LUN whose WWN is not the
announced one is never attached.
"""

from __future__ import annotations

import logging

from blockwire.errors import FailedPrecondition, IdentityMismatch, Unavailable
from blockwire.model import ConnectionInfo, IscsiConnection
from blockwire.validate import split_portal
from hostagent.connectors.base import (
    PrivateSecrets,
    PrivateSecretsOwner,
    SecretStore,
    iscsi_of,
    validate_iscsi,
)
from hostagent.identity import normalize_wwn, verify_wwn
from hostagent.model import ConnectorKind, HostDevice, NetworkTarget, SecretRef
from hostagent.tools.libiscsi import Lun, LunReader

log = logging.getLogger(__name__)

SECRET_TYPE = "iscsi"  # noqa: S105 - libvirt secret usage type, not a password
SECRET_PREFIX = "blockwire/"  # noqa: S105 - the usage ids of our secrets start with it


def secret_usage(info: ConnectionInfo) -> str:
    """The libvirt secret's usage id: one per attachment, so two attachments never share a secret."""
    t = iscsi_of(info)
    owner = info.attachment_id or f"{t.paths[0].target_iqn}/{t.paths[0].lun}"
    return f"blockwire/{info.volume_id}/{owner}"


class QemuIscsiConnector(PrivateSecretsOwner):
    kind = ConnectorKind.ISCSI_QEMU

    def __init__(self, secrets: SecretStore, libiscsi: LunReader, *, initiator_iqn: str) -> None:
        self.secrets = secrets
        self._private = PrivateSecrets(secrets, SECRET_PREFIX, SECRET_TYPE, "an iSCSI CHAP secret")
        self.libiscsi = libiscsi
        self.initiator_iqn = initiator_iqn

    def _initiator(self, t: IscsiConnection) -> str:
        return t.initiator_iqn or self.initiator_iqn

    def validate(self, info: ConnectionInfo) -> None:
        validate_iscsi(info)

    def connect(self, info: ConnectionInfo) -> HostDevice:
        t = iscsi_of(info)
        if t.mutual_chap is not None:
            raise FailedPrecondition(
                'QEMU\'s iSCSI initiator cannot do mutual CHAP; configure iscsi_mode = "kernel" on a host '
                "with a kernel initiator, or export without mutual CHAP"
            )
        errors: list[str] = []
        for path in t.paths:  # QEMU opens one portal: the first that answers with the right LUN
            host, port = split_portal(path.portal)
            try:
                lun = Lun(host, port, path.target_iqn, path.lun)
                found = self.libiscsi.identities(lun, t.chap, self._initiator(t))
            except Unavailable as exc:
                errors.append(exc.message)
                continue
            self._verify(info, lun, found, t)
            if t.chap is not None:
                self.secrets.define_secret(secret_usage(info), SECRET_TYPE, t.chap.password)
            log.debug("LUN %s/%d on %s verified for QEMU", path.target_iqn, path.lun, path.portal)
            auth = SecretRef(t.chap.username, secret_usage(info), SECRET_TYPE) if t.chap is not None else None
            return HostDevice(
                wwn=normalize_wwn(info.wwn),
                size_bytes=info.size_bytes,
                path_devices=(path.portal,),
                network=NetworkTarget(
                    protocol="iscsi",
                    name=f"{path.target_iqn}/{path.lun}",
                    hosts=((host, port),),
                    initiator_iqn=self._initiator(t),
                    auth=auth,
                ),
            )
        raise Unavailable(f"no portal of the LUN answered: {'; '.join(errors)}")

    def _verify(self, info: ConnectionInfo, lun: Lun, found: list[str], t: IscsiConnection) -> None:
        """The LUN must carry the announced WWN. The in-process reader reads binary NAA designators in hex;
        iscsi-inq prints them as raw text (cut at the first NUL byte), so when no readable designator has
        the WWN, the LUN's VPD 0x80 serial must equal the announced serial; when neither matches, the LUN
        is refused."""
        if not info.wwn and not info.serial:
            log.warning("connection info of %s announces no identity; not verified", info.volume_id)
            return
        if info.wwn and any(normalize_wwn(w) == normalize_wwn(info.wwn) for w in found):
            return
        if info.serial:
            serial = self.libiscsi.serial(lun, t.chap, self._initiator(t))
            if serial != info.serial:
                raise IdentityMismatch(
                    f"{lun.target_iqn}/{lun.lun} has serial {serial or '(none)'} but storage announced "
                    f"{info.serial}: refused (the LUN may have been reused); nothing was attached"
                )
            return
        verify_wwn(info.wwn, found[0] if found else "", f"{lun.target_iqn}/{lun.lun}")

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        t = iscsi_of(info)
        if t.chap is not None or self.secrets.secret_exists(secret_usage(info), SECRET_TYPE):
            self.secrets.undefine_secret(secret_usage(info), SECRET_TYPE)

    def _wanted(self, keep: list[ConnectionInfo]) -> set[str]:
        return {
            secret_usage(i) for i in keep if isinstance(i.transport, IscsiConnection) and i.transport.paths
        }

    def extend(self, info: ConnectionInfo) -> int:
        t = iscsi_of(info)
        p = t.paths[0]
        host, port = split_portal(p.portal)
        return self.libiscsi.size(Lun(host, port, p.target_iqn, p.lun), t.chap, self._initiator(t))

    def paths(self, info: ConnectionInfo) -> list[str]:
        return [p.portal for p in iscsi_of(info).paths]

    def expected_paths(self, info: ConnectionInfo) -> int:
        return 1  # QEMU opens one portal
