"""Local connector: a block device or file already on this host (loop devices, local LVs, images).

A block device is ready when udev has processed it and it has media (size > 0): connect waits for that
with a deadline, after looking at what already exists, so a device that appears after the call (an
`add` event, then a `change` when a loop device gets its backing file) is picked up at once.
"""

from __future__ import annotations

import logging
import os

from blockwire.errors import InvalidArgument, NotFound
from blockwire.model import ConnectionInfo, LocalConnection
from blockwire.runtime.clock import Clock, Deadline
from blockwire.validate import validate_connection_info
from hostagent.connectors.base import wait_device
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevDevice, UdevWaiter
from hostagent.identity import verify_wwn
from hostagent.model import ConnectorKind, HostDevice

log = logging.getLogger(__name__)


def _local(info: ConnectionInfo) -> LocalConnection:
    """The local transport of connection info `validate` accepted (on entry, or before it was journaled)."""
    if not isinstance(info.transport, LocalConnection):
        raise InvalidArgument("connection_info", "the local connector needs a local transport")
    return info.transport


class LocalConnector:
    kind = ConnectorKind.LOCAL

    def __init__(self, udev: UdevWaiter, sysfs: Sysfs, clock: Clock, *, device_timeout: float = 30.0) -> None:
        self.udev = udev
        self.sysfs = sysfs
        self.clock = clock
        self.device_timeout = device_timeout

    def _is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def validate(self, info: ConnectionInfo) -> None:
        _local(validate_connection_info(info))

    def connect(self, info: ConnectionInfo) -> HostDevice:
        path = _local(info).path
        if self._is_file(path):
            if info.wwn:
                raise InvalidArgument("connection_info.wwn", "a file has no WWN to verify; leave it empty")
            return HostDevice(path=path, size_bytes=os.path.getsize(path), is_file=True)
        if not path.startswith("/dev/"):
            raise NotFound(f"{path} is neither a regular file nor a device under /dev")

        def ready(dev: UdevDevice) -> bool:
            return (dev.device_node == path or path in dev.links) and bool(dev.size_bytes)

        dev = wait_device(
            self.udev,
            "block",
            ready,
            Deadline(self.clock, self.device_timeout),
            what=f"block device {path} with media",
        )
        verify_wwn(info.wwn, dev.wwn, path)
        log.debug("local device %s ready (%s, %s bytes)", path, dev.sys_name, dev.size_bytes)
        return HostDevice(path=path, wwn=dev.wwn, size_bytes=dev.size_bytes or 0)

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        """The device belongs to whoever made it: nothing to undo on the host."""
        _local(info)

    def extend(self, info: ConnectionInfo) -> int:
        path = _local(info).path
        if self._is_file(path):
            return os.path.getsize(path)
        name = os.path.basename(os.path.realpath(path))
        size = self.sysfs.block_size_bytes(name)
        if size is None:
            raise NotFound(f"{path} is not present on this host")
        return size

    def paths(self, info: ConnectionInfo) -> list[str]:
        path = _local(info).path
        return [path] if os.path.exists(path) else []

    def expected_paths(self, info: ConnectionInfo) -> int:
        return 1
