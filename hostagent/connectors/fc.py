"""Fibre Channel: targeted scans of the zoned target ports, the disk by its SCSI address, WWN check,
multipath. Initiator ports come from /sys/class/fc_host/host*/port_name; remote ports (and their
channel:target numbers) from /sys/class/fc_transport/target*/port_name.
"""

from __future__ import annotations

import logging

from blockwire.errors import FailedPrecondition, InvalidArgument
from blockwire.model import ConnectionInfo, FcConnection
from blockwire.runtime.clock import Clock
from blockwire.validate import normal_wwpn, validate_connection_info
from hostagent.connectors.scsi import ScsiDevices
from hostagent.host.openers import Openers
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevWaiter
from hostagent.model import ConnectorKind, HostDevice
from hostagent.tools.multipath import Multipath

log = logging.getLogger(__name__)


def fc_of(info: ConnectionInfo) -> FcConnection:
    """The FC transport of connection info `validate` accepted (on entry, or before it was journaled)."""
    t = info.transport
    if not isinstance(t, FcConnection):
        raise InvalidArgument("connection_info", "the FC connector needs an fc transport")
    return t


class FcConnector:
    kind = ConnectorKind.FC

    def __init__(
        self,
        sysfs: Sysfs,
        udev: UdevWaiter,
        multipath: Multipath,
        clock: Clock,
        *,
        openers: Openers,
        device_timeout: float = 30.0,
        use_multipath: bool = True,
        map_single_path: bool = False,
    ) -> None:
        self.sysfs = sysfs
        self.scsi = ScsiDevices(
            sysfs,
            udev,
            multipath,
            clock,
            openers=openers,
            device_timeout=device_timeout,
            use_multipath=use_multipath,
            map_single_path=map_single_path,
        )

    def validate(self, info: ConnectionInfo) -> None:
        fc_of(validate_connection_info(info))

    def _hosts(self) -> dict[str, int]:
        """Initiator WWPN -> SCSI host number."""
        out = {}
        for name in self.sysfs.listdir("class/fc_host"):
            wwpn = normal_wwpn(self.sysfs.read(f"class/fc_host/{name}/port_name") or "")
            if wwpn and name.startswith("host"):
                out[wwpn] = int(name[4:])
        return out

    def _targets(self, t: FcConnection) -> list[tuple[int, str, str]]:
        """(host, channel, target) of every remote port that is one of the announced target WWPNs and
        is zoned to an initiator port of this host (per initiator_target_map when given)."""
        wanted = {normal_wwpn(w) for w in t.target_wwpns}
        zoning = {normal_wwpn(i): {normal_wwpn(x) for x in ts} for i, ts in t.initiator_target_map.items()}
        hosts = self._hosts()
        found = []
        for name in self.sysfs.listdir("class/fc_transport"):
            wwpn = normal_wwpn(self.sysfs.read(f"class/fc_transport/{name}/port_name") or "")
            if wwpn not in wanted:
                continue
            host_s, channel, target = name.removeprefix("target").split(":")
            host = int(host_s)
            initiator = next((i for i, h in hosts.items() if h == host), "")
            if zoning and wwpn not in zoning.get(initiator, set()):
                continue
            found.append((host, channel, target))
        return found

    def connect(self, info: ConnectionInfo) -> HostDevice:
        t = fc_of(info)
        rports = self._targets(t)
        if not rports:
            raise FailedPrecondition(
                f"no FC port of this host sees the target ports {', '.join(t.target_wwpns)}; check the zoning"
            )
        devs = []
        before = set(self._devices(t))
        try:
            for host, channel, target in rports:
                devs.append(
                    self.scsi.wait_disk(
                        host,
                        t.lun,
                        trigger=lambda h=host, c=channel, tg=target: self.scsi.scan(h, t.lun, c, tg),  # type: ignore[misc]
                        what=f"FC LUN {t.lun} behind host{host} {channel}:{target}",
                    )
                )
            return self.scsi.assemble(info, sorted(set(devs)), len(rports))  # a path per zoned remote port
        except BaseException:
            # The volume's disks, and the ones this connect's scans brought; a disk at the LUN that was
            # there before with another identity (a reused LUN, connected for another volume) stays.
            after = self._devices(t)
            self.scsi.remove(info.wwn, after, force=True, made=set(after) - before)
            raise

    def _devices(self, t: FcConnection) -> list[str]:
        devs: set[str] = set()
        for host, channel, target in self._targets(t):
            for p in self.sysfs.glob(f"bus/scsi/devices/{host}:{channel}:{target}:{t.lun}/block/*"):
                devs.add(p.rsplit("/", 1)[1])
        return sorted(devs)

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        """Removes the volume's disks and map (its WWN's only; `ScsiDevices.remove`)."""
        self.scsi.remove(info.wwn, self._devices(fc_of(info)), force=force)

    def extend(self, info: ConnectionInfo) -> int:
        return self.scsi.rescan(self._devices(fc_of(info)), info.wwn)

    def paths(self, info: ConnectionInfo) -> list[str]:
        return [f"/dev/{d}" for d in self._devices(fc_of(info))]

    def expected_paths(self, info: ConnectionInfo) -> int:
        return 1  # how many disks the fabric gives is not announced: one is a working attachment
