"""The storage service's configuration: one frozen object, read from TOML (deploy/storage.example.toml
documents every key). No globals: the daemon loads it and passes it on."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockwire import validate
from blockwire.errors import InvalidArgument
from blockwire.limits import Limits

BACKEND_KINDS = ("file", "lvm-thin")
EXPORTER_KINDS = ("tgt", "lio", "nvmet")


@dataclass(frozen=True)
class ServerConfig:
    unix_socket: str = "/run/blockwire/storage.sock"
    listen: tuple[str, ...] = ()  # "host:port" TCP addresses
    workers: int = 0  # deprecated and ignored: threads follow [limits]; the daemon warns when it is set
    log_format: str = "json"  # or "kv"
    log_level: str = "INFO"
    grace_seconds: float = 10.0
    unix_socket_mode: int = 0o660  # who can reach the socket is admin: keep it root:blockwire-admin


@dataclass(frozen=True)
class TlsConfig:
    """[tls]: TLS and client certificates on the TCP listeners (see README "Security")."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # the CA that signs agent and admin client certificates
    require_client_cert: bool = True
    allow_insecure_tcp: bool = False  # plaintext TCP listeners; every caller is then an admin


@dataclass(frozen=True)
class ServiceConfig:
    catalog_path: str = "/var/lib/blockwire/storage.db"
    catalog_synchronous: str = "full"  # "normal": faster, can lose acknowledged writes on power loss
    default_backend: str = ""
    iqn_prefix: str = "iqn.2026-01.io.blockwire"
    naa_oui: str = "001405"
    mutual_chap: bool = False
    lock_timeout: float = 30.0
    copy_workers: int = 2
    export_check_interval: float = 2.0  # seconds between export checks (ExportSupervisor); 0 disables


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str
    exporter: str
    path: str = ""  # file
    vg: str = ""  # lvm-thin
    pool: str = ""  # lvm-thin
    oversubscription_ratio: float = 1.0


@dataclass(frozen=True)
class ExporterConfig:
    kind: str
    portals: tuple[str, ...]
    control_port: int = 0  # tgt
    tgtadm: str = "tgtadm"  # tgt
    command_timeout: float = 30.0
    # nvmet (storagesvc/targets/nvmet.py): subsystems are "<nqn_prefix>:<volume id>"; portals are the
    # TCP addresses of its ports (one port each, one path each); DH-HMAC-CHAP per host NQN, the secrets
    # derived from the seed in dhchap_key_file (made on first start, mode 0600).
    nqn_prefix: str = "nqn.2026-01.io.blockwire"
    dhchap: bool = True
    dhchap_bidirectional: bool = True
    dhchap_key_file: str = "/var/lib/blockwire/nvmet-dhchap.key"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    backends: tuple[BackendConfig, ...] = ()
    exporters: Mapping[str, ExporterConfig] = field(default_factory=dict, hash=False)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: Limits = field(default_factory=Limits)  # [limits]: concurrent calls per class (blockwire.limits)


class ConfigError(Exception):
    """The configuration file is wrong; the message names the key."""


def _take(table: Mapping[str, Any], where: str, known: tuple[str, ...]) -> dict[str, Any]:
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {', '.join(sorted(unknown))}")
    return dict(table)


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _exporters(tables: Mapping[str, Any]) -> dict[str, ExporterConfig]:
    exporters: dict[str, ExporterConfig] = {}
    for name, table in tables.items():
        t = _take(table, f"exporters.{name}", _fields(ExporterConfig))
        t.setdefault("kind", name)
        t["portals"] = tuple(t.get("portals", ()))
        exp = ExporterConfig(**t)
        if exp.kind not in EXPORTER_KINDS:
            raise ConfigError(f"[exporters.{name}] kind: one of {', '.join(EXPORTER_KINDS)}")
        if not exp.portals:
            raise ConfigError(f"[exporters.{name}] portals: at least one address:port")
        for i, p in enumerate(exp.portals):
            try:
                validate.portal(p, f"exporters.{name}.portals[{i}]")
            except InvalidArgument as exc:
                raise ConfigError(exc.message) from None
        if exp.kind == "nvmet":
            _nqn_prefix(exp.nqn_prefix, f"exporters.{name}.nqn_prefix")
        exporters[name] = exp
    return exporters


def _nqn_prefix(prefix: str, field: str) -> None:
    """The subsystem NQNs "<prefix>:<volume id>" must be NVMe names of at most 223 characters."""
    try:
        validate.nqn(f"{prefix}:{'0' * 32}", field)
    except InvalidArgument:
        raise ConfigError(
            f"[{field.rsplit('.', 1)[0]}] nqn_prefix: {prefix!r} does not make NVMe names "
            "(nqn.YYYY-MM.reverse.domain, at most 190 characters)"
        ) from None


def _backend(i: int, table: Mapping[str, Any], exporters: Mapping[str, ExporterConfig]) -> BackendConfig:
    b = BackendConfig(**_take(table, f"backends[{i}]", _fields(BackendConfig)))
    if b.kind not in BACKEND_KINDS:
        raise ConfigError(f"[[backends]] {b.name}: kind is one of {', '.join(BACKEND_KINDS)}")
    if b.exporter not in exporters:
        raise ConfigError(f"[[backends]] {b.name}: exporter {b.exporter!r} is not defined under [exporters]")
    if b.kind == "file" and not b.path:
        raise ConfigError(f"[[backends]] {b.name}: a file backend needs path")
    if b.kind == "lvm-thin" and not (b.vg and b.pool):
        raise ConfigError(f"[[backends]] {b.name}: an lvm-thin backend needs vg and pool")
    return b


def _naa_oui(value: str, field: str) -> str:
    """The IEEE company id in every WWN this storage announces (storagesvc.identity)."""
    if len(value) != 6 or not all(c in "0123456789abcdef" for c in value):
        raise InvalidArgument(
            field, f"{validate.quote(value)} is not 6 lower-case hex digits (an IEEE company id)"
        )
    return value


def _service(table: Mapping[str, Any]) -> ServiceConfig:
    service = ServiceConfig(**_take(table, "service", _fields(ServiceConfig)))
    if service.catalog_synchronous not in ("full", "normal"):
        raise ConfigError(
            '[service] catalog_synchronous: "full" (every acknowledged write survives a power loss) '
            'or "normal" (faster; the last acknowledged writes can be lost)'
        )
    if not service.export_check_interval >= 0:
        raise ConfigError("[service] export_check_interval: seconds, 0 or more (0 disables the checks)")
    try:
        validate.iqn(service.iqn_prefix, "service.iqn_prefix")
        _naa_oui(service.naa_oui, "service.naa_oui")
    except InvalidArgument as exc:
        raise ConfigError(exc.message) from None
    return service


def parse(data: Mapping[str, Any]) -> Config:
    top = _take(data, "top level", ("server", "service", "backends", "exporters", "tls", "limits"))
    server = _take(top.get("server", {}), "server", _fields(ServerConfig))
    if "listen" in server:
        server["listen"] = tuple(server["listen"])
    srv = ServerConfig(**server)
    if srv.log_format not in ("json", "kv"):
        raise ConfigError("[server] log_format: json or kv")
    if srv.unix_socket_mode & 0o007:
        raise ConfigError("[server] unix_socket_mode: no access for others (the socket is admin access)")
    tls = TlsConfig(**_take(top.get("tls", {}), "tls", _fields(TlsConfig)))
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError("[tls] cert_file and key_file go together")
    if tls.cert_file and tls.require_client_cert and not tls.client_ca_file:
        raise ConfigError("[tls] require_client_cert needs client_ca_file")
    if srv.listen and not tls.cert_file and not tls.allow_insecure_tcp:
        raise ConfigError(
            "[server] listen: TCP needs [tls] cert_file and key_file, or [tls] allow_insecure_tcp = true"
        )
    try:
        limits = Limits(**_take(top.get("limits", {}), "limits", _fields(Limits)))
    except InvalidArgument as exc:
        raise ConfigError(exc.message) from None
    service = _service(top.get("service", {}))
    exporters = _exporters(top.get("exporters", {}))
    backends = [_backend(i, t, exporters) for i, t in enumerate(top.get("backends", []))]
    if not backends:
        raise ConfigError("[[backends]]: at least one backend")
    if len({b.name for b in backends}) != len(backends):
        raise ConfigError("[[backends]]: names must be unique")
    if service.default_backend and service.default_backend not in {b.name for b in backends}:
        raise ConfigError(f"[service] default_backend {service.default_backend!r} is not a backend")
    return Config(
        server=srv, service=service, backends=tuple(backends), exporters=exporters, tls=tls, limits=limits
    )


def load(path: str | Path) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return parse(data)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
