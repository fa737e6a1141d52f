"""Ceph RBD: through QEMU's librbd (mode "qemu", the default) or the kernel's rbd driver (mode "kernel").

The identity of an RBD volume is its image id (librbd's `image.id()`): an image deleted and re-created
under the same name has another one. Both modes verify it before the disk reaches a domain, and refuse
(IDENTITY: FAILED_PRECONDITION, nothing attached) an image whose id is not the announced `image_id`, or
a cluster whose fsid is not the announced `cluster_fsid`:

* qemu: librados on the host, as the attachment's cephx user, reads the image (`hostagent.host.ceph`,
  bounded by `timeout`: a cluster that does not answer is UNAVAILABLE, never a hang, and QEMU is never
  given an image on a cluster that is down). Then a private libvirt secret of usage type 'ceph' per
  attachment holds the key (removed at disconnect), and the disk is a network disk
  `<source protocol='rbd' name='pool/image'>` with the monitors as hosts.
* kernel: `rbd device map` (the key in a 0600 keyfile removed right after, never on argv), udev's
  /dev/rbdN, and the identity the kernel reports in /sys/bus/rbd/devices/N/{pool,name,image_id}.
  Unmap only a device whose sysfs identity is the attachment's and that no process holds open.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from blockwire.errors import FailedPrecondition, IdentityMismatch, InvalidArgument, NotFound, PermissionDenied
from blockwire.model import ConnectionInfo, RbdConnection
from blockwire.runtime.clock import Clock, Deadline
from blockwire.runtime.executor import CommandFailed, Runner
from blockwire.secret import Secret
from blockwire.validate import split_portal, validate_connection_info
from hostagent.connectors.base import PrivateSecrets, PrivateSecretsOwner, SecretStore, wait_device
from hostagent.host.ceph import CephAccess, CephProbe, RbdImage, mon_host
from hostagent.host.openers import Openers
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevDevice, UdevWaiter
from hostagent.model import ConnectorKind, Finding, HostDevice, NetworkTarget, SecretRef

log = logging.getLogger(__name__)

SECRET_TYPE = "ceph"  # noqa: S105 - libvirt secret usage type, not a password
SECRET_PREFIX = "blockwire/"  # noqa: S105 - the usage ids of our secrets start with it
DEFAULT_USER = "admin"
RBD_MODES = ("qemu", "kernel")


def rbd_of(info: ConnectionInfo) -> RbdConnection:
    """The RBD transport of connection info `validate_rbd` accepted (on entry, or before it was
    journaled: records are not checked again)."""
    t = info.transport
    if not isinstance(t, RbdConnection):
        raise InvalidArgument("connection_info", "the RBD connector needs an rbd transport")
    return t


def validate_rbd(info: ConnectionInfo) -> None:
    """Both RBD connectors' `validate`: the wire rules, an rbd transport, its identity and monitors."""
    t = rbd_of(validate_connection_info(info))
    if not t.image_id:
        raise InvalidArgument(
            "connection_info.rbd.image_id",
            "required: the image's id is the identity the host checks before attaching "
            "(storage announces it)",
        )
    if not t.monitors:
        raise InvalidArgument("connection_info.rbd.monitors", "at least one monitor address:port")


def access_of(t: RbdConnection) -> CephAccess:
    return CephAccess(monitors=tuple(t.monitors), user=t.user, key=t.key)


def verify_image(t: RbdConnection, found: RbdImage, where: str) -> None:
    """The image reached must be the one announced (its id, and the cluster's fsid when announced)."""
    if t.cluster_fsid and found.cluster_fsid.lower() != t.cluster_fsid.lower():
        raise IdentityMismatch(
            f"{where} is cluster {found.cluster_fsid}, but storage announced {t.cluster_fsid}: refused "
            "(another cluster answers at these monitors); nothing was attached"
        )
    if found.image_id != t.image_id:
        raise IdentityMismatch(
            f"image {t.pool}/{t.image} has id {found.image_id or '(none)'} but storage announced "
            f"{t.image_id}: refused (the image was re-created under the same name); nothing was attached"
        )


def secret_usage(info: ConnectionInfo) -> str:
    """The libvirt secret's usage id: one per attachment, so two attachments never share a secret."""
    t = rbd_of(info)
    return f"blockwire/{info.volume_id}/{info.attachment_id or t.image_id}"


class QemuRbdConnector(PrivateSecretsOwner):
    """RBD through QEMU's librbd: nothing is opened on the host; the disk is a libvirt network disk."""

    kind = ConnectorKind.RBD_QEMU

    def __init__(self, secrets: SecretStore, ceph: CephProbe, *, timeout: float = 15.0) -> None:
        self.secrets = secrets
        self._private = PrivateSecrets(secrets, SECRET_PREFIX, SECRET_TYPE, "a cephx key")
        self.ceph = ceph
        self.timeout = timeout

    def validate(self, info: ConnectionInfo) -> None:
        validate_rbd(info)

    def _image(self, t: RbdConnection) -> RbdImage:
        return self.ceph.image(access_of(t), t.pool, t.image, self.timeout)

    def connect(self, info: ConnectionInfo) -> HostDevice:
        t = rbd_of(info)
        found = self._image(t)
        verify_image(t, found, f"the Ceph cluster at {','.join(t.monitors)}")
        user = t.user or DEFAULT_USER
        auth = None
        if t.key is not None:
            self.secrets.define_secret(secret_usage(info), SECRET_TYPE, t.key)
            auth = SecretRef(user, secret_usage(info), SECRET_TYPE)
        log.debug("RBD image %s/%s (id %s) verified for QEMU", t.pool, t.image, found.image_id)
        return HostDevice(
            wwn=info.wwn,
            size_bytes=found.size_bytes,
            path_devices=tuple(t.monitors),
            network=NetworkTarget(
                protocol="rbd",
                name=f"{t.pool}/{t.image}",
                hosts=tuple(split_portal(m) for m in t.monitors),
                auth=auth,
            ),
        )

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        """Removes the attachment's secret (QEMU holds the key it read while the disk is open)."""
        rbd_of(info)
        self.secrets.undefine_secret(secret_usage(info), SECRET_TYPE)

    def _wanted(self, keep: list[ConnectionInfo]) -> set[str]:
        return {secret_usage(i) for i in keep if isinstance(i.transport, RbdConnection)}

    def extend(self, info: ConnectionInfo) -> int:
        """The image's size now (the api then tells QEMU with blockResize)."""
        t = rbd_of(info)
        found = self._image(t)
        verify_image(t, found, f"the Ceph cluster at {','.join(t.monitors)}")
        return found.size_bytes

    def paths(self, info: ConnectionInfo) -> list[str]:
        return list(rbd_of(info).monitors)

    def expected_paths(self, info: ConnectionInfo) -> int:
        return len(rbd_of(info).monitors)


# -- kernel (krbd) ------------------------------------------------------------------------------------
RBD_BUS = "bus/rbd/devices"
MAP_TIMEOUT = 60.0


class KernelRbdConnector:
    """RBD through the kernel's rbd driver: a host block device /dev/rbdN."""

    kind = ConnectorKind.RBD_KERNEL

    def __init__(
        self,
        runner: Runner,
        sysfs: Sysfs,
        udev: UdevWaiter,
        clock: Clock,
        *,
        openers: Openers,
        keyfile_dir: str,
        device_timeout: float = 30.0,
        timeout: float = 15.0,
    ) -> None:
        self.runner = runner
        self.sysfs = sysfs
        self.udev = udev
        self.clock = clock
        self.openers = openers
        self.keyfile_dir = keyfile_dir
        self.device_timeout = device_timeout
        self.timeout = timeout

    def validate(self, info: ConnectionInfo) -> None:
        validate_rbd(info)

    def _mapped(self, t: RbdConnection) -> list[str]:
        """The rbd device ids ("0") of the kernel's mappings of `t`'s image (its head, not a snapshot),
        whatever the id the kernel reports: the caller checks it."""
        found = []
        for dev_id in sorted(self.sysfs.listdir(RBD_BUS), key=lambda d: int(d) if d.isdigit() else 0):
            base = f"{RBD_BUS}/{dev_id}"
            if (
                self.sysfs.read(f"{base}/pool") == t.pool
                and self.sysfs.read(f"{base}/name") == t.image
                and self.sysfs.read(f"{base}/current_snap") in (None, "-")
            ):
                found.append(dev_id)
        return found

    def _verify_mapping(self, t: RbdConnection, dev_id: str) -> None:
        base = f"{RBD_BUS}/{dev_id}"
        image_id = self.sysfs.read(f"{base}/image_id") or ""
        if image_id != t.image_id:
            raise IdentityMismatch(
                f"/dev/rbd{dev_id} maps {t.pool}/{t.image} with id {image_id or '(none)'} but storage "
                f"announced {t.image_id}: refused (the image was re-created under the same name)"
            )
        fsid = self.sysfs.read(f"{base}/cluster_fsid") or ""
        if t.cluster_fsid and fsid and fsid.lower() != t.cluster_fsid.lower():
            raise IdentityMismatch(
                f"/dev/rbd{dev_id} is on cluster {fsid}, but storage announced {t.cluster_fsid}: refused"
            )

    def audit(self, keep: list[ConnectionInfo]) -> list[Finding]:
        """Kernel rbd mappings of images no record (`keep`) announces, by image id. Report only: a
        mapping may be another program's (`hostagent.doctor`)."""
        wanted = {i.transport.image_id for i in keep if isinstance(i.transport, RbdConnection)}
        found = []
        for dev_id in sorted(self.sysfs.listdir(RBD_BUS), key=lambda d: int(d) if d.isdigit() else 0):
            base = f"{RBD_BUS}/{dev_id}"
            image_id = self.sysfs.read(f"{base}/image_id") or ""
            if image_id in wanted:
                continue
            pool, name = self.sysfs.read(f"{base}/pool") or "?", self.sysfs.read(f"{base}/name") or "?"
            found.append(
                Finding(
                    "rbd_mapping",
                    f"/dev/rbd{dev_id}",
                    f"{pool}/{name} (image id {image_id or '-'}); if nothing uses it: "
                    f"rbd device unmap /dev/rbd{dev_id}",
                )
            )
        return found

    def fix(self, finding: Finding) -> bool:
        return False  # a mapping is never removed by the doctor: nothing proves it is blockwire's

    def _ours(self, t: RbdConnection) -> str:
        """The device id of the mapping of exactly the announced image, or ""."""
        for dev_id in self._mapped(t):
            if (self.sysfs.read(f"{RBD_BUS}/{dev_id}/image_id") or "") == t.image_id:
                return dev_id
        return ""

    def _keyfile(self, key: Secret) -> str:
        Path(self.keyfile_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, path = tempfile.mkstemp(prefix="rbd-key.", dir=self.keyfile_dir)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, key.reveal().encode())
        finally:
            os.close(fd)
        return path

    def _map(self, t: RbdConnection) -> None:
        argv: list[str | Secret] = [
            "rbd",
            "device",
            "map",
            f"{t.pool}/{t.image}",
            "--id",
            t.user or DEFAULT_USER,
            "-m",
            mon_host(
                tuple(t.monitors)
            ),  # each monitor with its messenger (librados's parse of a bare one differs)
            "--client_mount_timeout",
            str(int(self.timeout)),
            "--options",
            f"mount_timeout={int(self.timeout)}",
        ]
        keyfile = self._keyfile(t.key) if t.key is not None else ""
        try:
            if keyfile:
                argv += ["--keyfile", keyfile]
            try:
                self.runner.run(argv, timeout=self.timeout + MAP_TIMEOUT)
            except CommandFailed as exc:
                if "Permission denied" in exc.stderr or exc.returncode == 13:
                    raise PermissionDenied(
                        f"the Ceph cluster refused cephx user {t.user or DEFAULT_USER!r} mapping "
                        f"{t.pool}/{t.image}: wrong key, or missing caps"
                    ) from None
                raise
        finally:
            if keyfile:
                os.unlink(keyfile)

    def connect(self, info: ConnectionInfo) -> HostDevice:
        t = rbd_of(info)
        dev_id = self._ours(t)
        if not dev_id:
            others = self._mapped(t)
            self._map(t)
            new = [d for d in self._mapped(t) if d not in others]
            if not new:
                raise NotFound(f"rbd device map of {t.pool}/{t.image} made no device")
            dev_id = new[0]
            try:
                self._verify_mapping(t, dev_id)
            except IdentityMismatch:
                self._unmap(dev_id)
                raise
        name = f"rbd{dev_id}"

        def ready(dev: UdevDevice) -> bool:
            return dev.sys_name == name and bool(dev.size_bytes)

        dev = wait_device(
            self.udev, "block", ready, Deadline(self.clock, self.device_timeout), what=f"/dev/{name}"
        )
        log.debug("RBD image %s/%s (id %s) mapped at /dev/%s", t.pool, t.image, t.image_id, name)
        return HostDevice(
            path=dev.device_node or f"/dev/{name}",
            wwn=info.wwn,
            size_bytes=dev.size_bytes or 0,
            path_devices=(name,),
        )

    def _unmap(self, dev_id: str) -> None:
        self.runner.run(["rbd", "device", "unmap", f"/dev/rbd{dev_id}"], timeout=self.timeout + MAP_TIMEOUT)

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        """Unmaps the mapping of the announced image (never another image's mapping of the same name),
        unless a process holds it open."""
        t = rbd_of(info)
        dev_id = self._ours(t)
        if not dev_id:
            return
        node = f"/dev/rbd{dev_id}"
        users = self.openers.users([node]).get(node, [])
        if users:
            raise FailedPrecondition(
                f"{node} ({t.pool}/{t.image}) is held open by {', '.join(users)}; not unmapping it. "
                "Close it, then repeat"
            )
        self._unmap(dev_id)

    def extend(self, info: ConnectionInfo) -> int:
        """The size the kernel sees (krbd follows an image resize by itself)."""
        t = rbd_of(info)
        dev_id = self._ours(t)
        if not dev_id:
            raise NotFound(f"{t.pool}/{t.image} is not mapped on this host")
        size = self.sysfs.block_size_bytes(f"rbd{dev_id}")
        if size is None:
            raise NotFound(f"/dev/rbd{dev_id} is not present on this host")
        return size

    def paths(self, info: ConnectionInfo) -> list[str]:
        dev_id = self._ours(rbd_of(info))
        return [f"rbd{dev_id}"] if dev_id else []

    def expected_paths(self, info: ConnectionInfo) -> int:
        return 1
