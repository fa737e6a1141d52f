"""What a connect made usable -> the disk's libvirt <source>: one pure function, no I/O.

Connectors describe their result transport-neutrally (`hostagent.model.HostDevice`: a host block device,
a regular file, or a `NetworkTarget` QEMU opens itself); only this module knows how libvirt spells it.
"""

from __future__ import annotations

from hostagent.model import HostDevice
from hostagent.virt.diskxml import Auth, BlockSource, FileSource, NetHost, NetworkSource, Source


def disk_source(device: HostDevice) -> Source:
    """The <source> of a disk opening `device`."""
    net = device.network
    if net is not None:
        auth = net.auth
        return NetworkSource(
            protocol=net.protocol,
            name=net.name,
            hosts=tuple(NetHost(host, port) for host, port in net.hosts),
            initiator_iqn=net.initiator_iqn,
            auth=Auth(auth.username, auth.secret_type, usage=auth.usage) if auth is not None else None,
        )
    return FileSource(device.path) if device.is_file else BlockSource(device.path)
