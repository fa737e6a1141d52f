"""The agent's one config object (no globals), loaded from TOML (deploy/agent.example.toml)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from blockwire import validate
from blockwire.errors import InvalidArgument
from blockwire.limits import Limits
from blockwire.observability import MetricsConfig, TracingConfig
from blockwire.validate import split_portal

ISCSI_MODES = ("auto", "kernel", "qemu")
MULTIPATH_MODES = ("auto", "always", "never")
RBD_MODES = ("qemu", "kernel")


@dataclass(frozen=True)
class TlsConfig:
    """[tls]: TLS on the agent's TCP listener. Only admin certificates may call (README "Security")."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    require_client_cert: bool = True
    allow_insecure_tcp: bool = False


@dataclass(frozen=True)
class StorageTlsConfig:
    """[storage_tls]: how the agent reaches a storage service over TLS. The client certificate should
    carry SAN URI blockwire://agent/<this host's name>; empty ca_file means plaintext."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""  # the name to check the server's certificate against, when not the address's


def _check_host_name(value: str) -> None:
    """`host_name`: empty (the system's) or a host name as storage takes it."""
    if value:
        validate.host(value, "host_name")


_TABLES: dict[str, type] = {
    "tls": TlsConfig,
    "storage_tls": StorageTlsConfig,
    "limits": Limits,
    "metrics": MetricsConfig,
    "tracing": TracingConfig,
}


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str = "/var/lib/blockwire-agent"
    storage_address: str = (
        ""  # "unix:///run/blockwire/storage.sock" or "host:port"; empty: connection info only
    )
    storage_timeout: float = 30.0
    libvirt_uri: str = "qemu:///system"
    # this host's name for storage (Connector.host, the agent's TLS identity); empty: the system's host
    # name. Two agents on one machine (each with its own libvirtd) need two names.
    host_name: str = ""
    iscsi_mode: str = "auto"
    # kernel paths (iSCSI, FC, NVMe/TCP with native NVMe multipath off) on a host with multipathd: "auto"
    # maps volumes announced with two or more paths and uses a single-path volume's disk as it is;
    # "always" maps every volume (a path added later joins the map); "never" uses one path's disk (as
    # with Nova's volume_use_multipath = false)
    multipath: str = "auto"
    listen_unix: str = "/run/blockwire/agent.sock"
    listen_tcp: str = ""  # "127.0.0.1:50052"; empty: no TCP listener
    device_timeout: float = 30.0
    # Ceph RBD: "qemu" (QEMU's librbd opens the image: a libvirt network disk) or "kernel" (rbd device map,
    # a /dev/rbdN block disk; needs the kernel's rbd module). Either way the image id is verified first.
    rbd_mode: str = "qemu"
    # seconds the agent waits for a Ceph cluster (monitors, then the image) before an attach is UNAVAILABLE
    rbd_timeout: float = 15.0
    detach_timeout: float = 30.0
    login_timeout: float = 30.0
    # NVMe/TCP controller loss policy (README "NVMe/TCP"): seconds the kernel keeps reconnecting a lost
    # controller before it deletes it (-1: forever), seconds between reconnects, seconds after which I/O
    # on a lost path fails instead of waiting (-1: I/O waits until ctrl_loss_tmo; native multipath sends
    # it to another live path meanwhile)
    nvme_ctrl_loss_tmo: int = 1800
    nvme_reconnect_delay: int = 2
    nvme_fast_io_fail_tmo: int = -1
    path_check_interval: float = 5.0  # seconds between kernel iSCSI session checks; 0 disables them
    sysfs_root: str = "/sys"
    initiator_file: str = "/etc/iscsi/initiatorname.iscsi"
    hostnqn_file: str = "/etc/nvme/hostnqn"
    hostid_file: str = "/etc/nvme/hostid"
    reconcile_on_start: bool = True
    log_level: str = "INFO"
    grace_seconds: float = 10.0
    # seconds a call waits for a connection to libvirtd; one that does not answer in time is UNAVAILABLE
    libvirt_connect_timeout: float = 10.0
    tls: TlsConfig = field(default_factory=TlsConfig)
    storage_tls: StorageTlsConfig = field(default_factory=StorageTlsConfig)
    limits: Limits = field(default_factory=Limits)  # [limits]: concurrent calls per class (blockwire.limits)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # [metrics]: Prometheus endpoint
    tracing: TracingConfig = field(default_factory=TracingConfig)  # [tracing]: where spans go

    def __post_init__(self) -> None:
        for name, allowed in (
            ("iscsi_mode", ISCSI_MODES),
            ("rbd_mode", RBD_MODES),
            ("multipath", MULTIPATH_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise InvalidArgument(name, f"must be one of {', '.join(allowed)}")
        if not self.listen_unix and not self.listen_tcp:
            raise InvalidArgument("listen_unix", "set listen_unix or listen_tcp (or both)")
        _check_host_name(self.host_name)
        for name in (
            "storage_timeout",
            "device_timeout",
            "detach_timeout",
            "login_timeout",
            "libvirt_connect_timeout",
            "rbd_timeout",
        ):
            if getattr(self, name) <= 0:
                raise InvalidArgument(name, "must be positive")
        self._check_nvme()
        if not self.path_check_interval >= 0:
            raise InvalidArgument("path_check_interval", "seconds, 0 or more (0 disables the checks)")
        if bool(self.tls.cert_file) != bool(self.tls.key_file):
            raise InvalidArgument("tls", "cert_file and key_file go together")
        if self.tls.cert_file and self.tls.require_client_cert and not self.tls.client_ca_file:
            raise InvalidArgument("tls.client_ca_file", "required with require_client_cert")
        if self.listen_tcp and not self.tls.cert_file and not self.tls.allow_insecure_tcp:
            raise InvalidArgument(
                "listen_tcp", "TCP needs [tls] cert_file and key_file, or [tls] allow_insecure_tcp = true"
            )
        if bool(self.storage_tls.cert_file) != bool(self.storage_tls.key_file):
            raise InvalidArgument("storage_tls", "cert_file and key_file go together")
        if self.metrics.listen:
            split_portal(self.metrics.listen, "metrics.listen")
        if self.tracing.check():
            raise InvalidArgument("tracing.exporter", self.tracing.check())

    def _check_nvme(self) -> None:
        if self.nvme_ctrl_loss_tmo < -1 or self.nvme_ctrl_loss_tmo == 0:
            raise InvalidArgument("nvme_ctrl_loss_tmo", "seconds, at least 1, or -1 for forever")
        if self.nvme_reconnect_delay < 1:
            raise InvalidArgument("nvme_reconnect_delay", "seconds, at least 1")
        if self.nvme_fast_io_fail_tmo < -1:
            raise InvalidArgument("nvme_fast_io_fail_tmo", "seconds, 0 or more, or -1 for off")
        if -1 < self.nvme_ctrl_loss_tmo < self.nvme_reconnect_delay:
            raise InvalidArgument("nvme_ctrl_loss_tmo", "must be at least nvme_reconnect_delay")


def config_from_mapping(data: dict[str, Any]) -> AgentConfig:
    known = {f.name: f for f in fields(AgentConfig)}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        value = raw
        if key not in known:
            raise InvalidArgument(key, f"unknown config key (known: {', '.join(sorted(known))})")
        if key in _TABLES:
            values[key] = _table(key, raw)
            continue
        default = known[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise InvalidArgument(key, "must be true or false")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise InvalidArgument(key, f"must be a {type(default).__name__}")
        values[key] = value
    return AgentConfig(**values)


def _table(name: str, raw: Any) -> Any:
    cls = _TABLES[name]
    if not isinstance(raw, dict):
        raise InvalidArgument(name, "must be a table ([" + name + "])")
    defaults = cls()
    known = {f.name for f in fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise InvalidArgument(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
        if type(value) is not type(getattr(defaults, key)):
            raise InvalidArgument(f"{name}.{key}", f"must be a {type(getattr(defaults, key)).__name__}")
    return cls(**raw)


def load_config(path: str | Path) -> AgentConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument("config", f"{path}: {exc}") from exc
    return config_from_mapping(data)
