"""os-brick's connector calls, answered by blockwire's connectors: a virt manager written against os-brick
switches by changing one import.

    # before                                          # after
    from os_brick.initiator import connector          from hostagent.brick import connector

    props = connector.get_connector_properties("sudo", my_ip, multipath=True, enforce_multipath=False)
    conn = connector.InitiatorConnector.factory("ISCSI", "sudo", use_multipath=True)
    device = conn.connect_volume(connection_info["data"])    # {'type': 'block', 'path': ..., 'scsi_wwn': ...}
    conn.extend_volume(connection_info["data"])              # the size the host now sees, in bytes
    conn.get_volume_paths(connection_info["data"])
    conn.disconnect_volume(connection_info["data"], device, force=False)

The connection properties are Cinder's `data` (read by `blockwire.cinder`, every key checked); the calls
go to `HostAgent.connect_volume` and friends, so blockwire's rules hold: no host-wide lock, events not
sleeps, a refusal to remove a device a domain or process holds, and the WWN check whenever the properties
carry one (`scsi_wwn`, as blockwire's storage would announce it; Cinder's never do, which os-brick accepts
silently and this facade accepts with a warning in the log). The WWN connect_volume found is kept in the
agent's state dir, and disconnect_volume removes only devices with it, also when the caller passes no
device info (as Nova does): after a LUN reuse another volume's device at the same address stays.

`connector` is built on first use from the agent's TOML (`$BLOCKWIRE_AGENT_CONFIG`, else
/etc/blockwire/agent.toml; no storage service: the caller holds the connection info). os-brick's
module-level calls leave no place to inject an agent, hence this one lazily built default (the rest of
blockwire injects); an embedder that has its own agent uses `Brick(agent)` instead, which has the same
two attributes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockwire.cinder import connection_info_from_cinder
from blockwire.errors import BlockwireError, FailedPrecondition, InvalidArgument
from blockwire.model import ConnectionInfo, IscsiConnection, RbdConnection
from hostagent.api import HostAgent
from hostagent.identity import wwn_from_wwid

log = logging.getLogger(__name__)

# os-brick's protocol names (os_brick.initiator) -> Cinder's driver_volume_type.
ISCSI = "ISCSI"
FIBRE_CHANNEL = "FIBRE_CHANNEL"
RBD = "RBD"
NVMEOF = "NVMEOF"
_DRIVER_TYPES = {ISCSI: "iscsi", FIBRE_CHANNEL: "fibre_channel", RBD: "rbd", NVMEOF: "nvmeof"}
DEFAULT_CONFIG = "/etc/blockwire/agent.toml"


class BrickConnector:
    """One protocol's os-brick connector: `connect_volume`, `disconnect_volume`, `extend_volume`,
    `get_volume_paths`, taking Cinder's connection properties."""

    def __init__(self, agent: HostAgent, protocol: str, use_multipath: bool) -> None:
        self.agent = agent
        self.identities = _Identities(agent.journal.dir.parent / "brick")
        self.protocol = protocol
        self.driver_volume_type = _DRIVER_TYPES[protocol]
        self.use_multipath = use_multipath

    def info(self, connection_properties: Mapping[str, Any]) -> ConnectionInfo:
        """The typed connection info of os-brick's connection properties (Cinder's `data`; `scsi_wwn`, and
        Nova's `device_path` note, are read too)."""
        props = dict(connection_properties)
        wwn = str(props.pop("scsi_wwn", "") or "")
        props.pop("device_path", None)  # Nova's note of connect_volume's path: the identity decides, not it
        info = connection_info_from_cinder({"driver_volume_type": self.driver_volume_type, "data": props})
        return replace(info, wwn=wwn_from_wwid(wwn)) if wwn else info

    def connect_volume(self, connection_properties: Mapping[str, Any]) -> dict[str, Any]:
        """Connects and returns os-brick's device info: {'type': 'block', 'path': ..., 'scsi_wwn': ...}
        (and 'multipath_id' for a multipath map). A repeat returns the same device."""
        info = self.info(connection_properties)
        if not info.wwn and not info.serial:
            log.warning(
                "connection properties of %s carry no LUN identity; connecting unverified", info.volume_id
            )
        device = self.agent.connect_volume(info, allow_unverified_identity=True)
        if device.network is not None:
            self.agent.disconnect_volume(info)
            raise FailedPrecondition(
                "this host attaches through QEMU's own initiator (no host device); os-brick's "
                'connect_volume needs one: set iscsi_mode = "kernel" in the agent\'s config'
            )
        result: dict[str, Any] = {"type": "file" if device.is_file else "block", "path": device.path}
        if device.wwn:
            result["scsi_wwn"] = device.wwn
            self.identities.put(info, device.wwn)
        if device.path.startswith("/dev/dm-") or device.path.startswith("/dev/mapper/"):
            result["multipath_id"] = device.wwn
        return result

    def disconnect_volume(
        self,
        connection_properties: Mapping[str, Any],
        device_info: Mapping[str, Any] | None,
        force: bool = False,
        ignore_errors: bool = False,
    ) -> None:
        """Removes what connect_volume made. `force` also removes a device that is still open (never one a
        domain holds); `ignore_errors` logs a failure instead of raising it, as os-brick's does."""
        try:
            info = self.info(connection_properties)
            wwn = (
                info.wwn
                or wwn_from_wwid(str((device_info or {}).get("scsi_wwn") or ""))
                or self.identities.get(info)
            )
            self.agent.disconnect_volume(replace(info, wwn=wwn), force=force)
            self.identities.drop(info)
        except BlockwireError as exc:
            if not ignore_errors or isinstance(exc, InvalidArgument):
                raise
            log.warning(
                "disconnect of %s failed, ignored as asked: %s", connection_properties.get("volume_id"), exc
            )

    def extend_volume(self, connection_properties: Mapping[str, Any]) -> int:
        """Rescans after the volume grew; the size the host now sees, in bytes."""
        return self.agent.extend_connection(self.info(connection_properties))

    def get_volume_paths(self, connection_properties: Mapping[str, Any]) -> list[str]:
        return self.agent.connection_paths(self.info(connection_properties))


class _Identities:
    """The WWN each connect_volume found, by what it connected (kept in the agent's state dir, so that it
    outlives a restart of the caller): disconnect_volume removes only devices with that identity, also
    when the caller passes no device info (Nova passes None). Without an identity no device would be
    removed at all (`ScsiDevices.remove`: never guess after a LUN reuse)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, info: ConnectionInfo) -> Path:
        t = info.transport
        where = (
            sorted(f"{p.portal}/{p.target_iqn}/{p.lun}" for p in t.paths)
            if isinstance(t, IscsiConnection)
            else [repr(replace(t, key=None) if isinstance(t, RbdConnection) else t)]
        )
        digest = hashlib.sha256(json.dumps([info.volume_id, where]).encode()).hexdigest()[:32]
        return self.dir / f"{digest}.wwn"

    def put(self, info: ConnectionInfo, wwn: str) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(info)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(wwn)
        os.replace(tmp, path)

    def get(self, info: ConnectionInfo) -> str:
        try:
            return self._path(info).read_text().strip()
        except FileNotFoundError:
            return ""

    def drop(self, info: ConnectionInfo) -> None:
        self._path(info).unlink(missing_ok=True)


class _Factory:
    def __init__(self, brick: Brick) -> None:
        self._brick = brick

    def factory(
        self,
        protocol: str,
        root_helper: str | None = None,
        driver: object = None,
        use_multipath: bool = False,
        device_scan_attempts: int = 3,
        *args: object,
        **kwargs: object,
    ) -> BrickConnector:
        """os-brick's `InitiatorConnector.factory`. `root_helper`, `driver`, `device_scan_attempts` are
        accepted and unused: the agent runs its tools itself and waits on udev events with a deadline."""
        name = protocol.upper()
        if name not in _DRIVER_TYPES:
            raise InvalidArgument("protocol", f"{protocol!r}: one of {', '.join(_DRIVER_TYPES)}")
        return BrickConnector(self._brick.agent, name, use_multipath)


class Brick:
    """os-brick's `connector` module over one HostAgent: `get_connector_properties` and
    `InitiatorConnector.factory`."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent
        self.InitiatorConnector = _Factory(self)

    def get_connector_properties(  # noqa: PLR0917 - os-brick's positional signature
        self,
        root_helper: str | None = None,
        my_ip: str | None = None,
        multipath: bool = False,
        enforce_multipath: bool = False,
        host: str | None = None,
        execute: object = None,
    ) -> dict[str, Any]:
        """This host's initiators in os-brick's keys. `enforce_multipath` with a host that cannot build
        multipath maps is FAILED_PRECONDITION, as os-brick refuses it."""
        c = self.agent.connector
        if multipath and enforce_multipath and not c.multipath:
            raise FailedPrecondition(
                "multipath is enforced but this host cannot build multipath maps (multipathd)"
            )
        props: dict[str, Any] = {
            "platform": c.platform,
            "os_type": "linux",
            "ip": my_ip or (c.ips[0] if c.ips else ""),
            "host": host or c.host,
            "multipath": bool(multipath and c.multipath),
            "enforce_multipath": enforce_multipath,
            "do_local_attach": False,
        }
        if c.initiator_iqn:
            props["initiator"] = c.initiator_iqn
        if c.wwpns:
            props["wwpns"], props["wwnns"] = list(c.wwpns), list(c.wwnns)
        if c.nvme_host_nqn:
            props["nqn"] = c.nvme_host_nqn
        if c.nvme_host_id:
            props["nvme_hostid"] = props["uuid"] = c.nvme_host_id
        return props


class _DefaultBrick:
    """`connector`: a Brick over an agent built from the agent's TOML on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._brick: Brick | None = None

    def _get(self) -> Brick:
        with self._lock:
            if self._brick is None:
                from hostagent.config import load_config  # noqa: PLC0415 - only when used
                from hostagent.wiring import build_agent  # noqa: PLC0415

                path = os.environ.get("BLOCKWIRE_AGENT_CONFIG", DEFAULT_CONFIG)
                agent, _ = build_agent(load_config(path), storage=None)
                self._brick = Brick(agent)
            return self._brick

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)


connector: Any = _DefaultBrick()
