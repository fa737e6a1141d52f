"""The agent's one config object (no globals), loaded from TOML (deploy/agent.example.toml)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from blockwire.errors import InvalidArgument

ISCSI_MODES = ("auto", "kernel", "qemu")


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str = "/var/lib/blockwire-agent"
    storage_address: str = (
        ""  # "unix:///run/blockwire/storage.sock" or "host:port"; empty: connection info only
    )
    storage_timeout: float = 30.0
    libvirt_uri: str = "qemu:///system"
    iscsi_mode: str = "auto"
    listen_unix: str = "/run/blockwire/agent.sock"
    listen_tcp: str = ""  # "127.0.0.1:50052"; empty: no TCP listener
    device_timeout: float = 30.0
    detach_timeout: float = 30.0
    login_timeout: float = 30.0
    sysfs_root: str = "/sys"
    initiator_file: str = "/etc/iscsi/initiatorname.iscsi"
    hostnqn_file: str = "/etc/nvme/hostnqn"
    hostid_file: str = "/etc/nvme/hostid"
    reconcile_on_start: bool = True
    log_level: str = "INFO"
    grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.iscsi_mode not in ISCSI_MODES:
            raise InvalidArgument("iscsi_mode", f"must be one of {', '.join(ISCSI_MODES)}")
        if not self.listen_unix and not self.listen_tcp:
            raise InvalidArgument("listen_unix", "set listen_unix or listen_tcp (or both)")
        for name in ("storage_timeout", "device_timeout", "detach_timeout", "login_timeout"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(name, "must be positive")


def config_from_mapping(data: dict[str, Any]) -> AgentConfig:
    known = {f.name: f for f in fields(AgentConfig)}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        value = raw
        if key not in known:
            raise InvalidArgument(key, f"unknown config key (known: {', '.join(sorted(known))})")
        default = known[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise InvalidArgument(key, "must be true or false")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise InvalidArgument(key, f"must be a {type(default).__name__}")
        values[key] = value
    return AgentConfig(**values)


def load_config(path: str | Path) -> AgentConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument("config", f"{path}: {exc}") from exc
    return config_from_mapping(data)
