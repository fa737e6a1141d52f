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
from blockwire.observability import MetricsConfig, TracingConfig
from storagesvc.keys.base import KEY_KINDS, KeysConfig
from storagesvc.scheduler import WEIGHERS

BACKEND_KINDS = ("file", "lvm-thin", "rbd")
RBD_HOST_USERS = ("backend", "per-host")
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


CATALOG_KINDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class CatalogConfig:
    """[catalog]: where the records live (README "Catalog on PostgreSQL")."""

    kind: str = "sqlite"  # or "postgresql": shared by every storage process pointing at it
    path: str = ""  # sqlite: the file ("": [service] catalog_path)
    dsn: str = ""  # postgresql: a libpq connection string or URI, WITHOUT the password
    password_file: str = ""  # postgresql: a file holding the role's password (mode 0600)
    pool_min_size: int = 1  # postgresql: connections kept open for statements
    pool_max_size: int = 8  # postgresql: at most this many statements at once
    lock_connections: int = 16  # postgresql: volume locks held at once (one connection each)
    connect_timeout: float = 5.0  # postgresql: seconds to reach the server, then UNAVAILABLE


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str
    exporter: str = ""  # file, lvm-thin (rbd has none: hosts open the images themselves)
    path: str = ""  # file
    vg: str = ""  # lvm-thin
    pool: str = ""  # lvm-thin: the thin pool; rbd: the Ceph pool
    oversubscription_ratio: float = 1.0
    # rbd (README "Ceph RBD backend")
    conf: str = ""  # a ceph.conf to read (mon_host, ...); or `monitors`
    monitors: tuple[str, ...] = ()  # "host:port" (msgr v1); announced to hosts
    data_pool: str = ""  # an erasure-coded data pool for the images' data
    user: str = "admin"  # cephx user, without "client."
    keyring: str = ""  # a keyring file with [client.<user>] key = ...
    key_file: str = ""  # or a file holding just the key
    connect_timeout: float = 10.0  # seconds for the monitors to answer (then UNAVAILABLE)
    op_timeout: float = 30.0  # seconds for each OSD operation
    host_users: str = "backend"  # "backend": hosts get one user; "per-host": client.<prefix>.<host>
    host_user_prefix: str = "blockwire"
    host_user: str = ""  # host_users = "backend": the user hosts get ("": `user`)
    host_key_file: str = ""  # its key (a keyring or a key file)
    capacity_bytes: int = 0  # provisioning cap; 0: the pool's size from the cluster (needs a ceph-mgr)
    scratch_dir: str = ""  # qcow2 images are converted to raw here before their import
    # the scheduler (README "Volume types, QoS specs and the scheduler")
    availability_zone: str = ""
    capabilities: Mapping[str, str] = field(default_factory=dict, hash=False)  # added to the kind's own


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
class NodeConfig:
    """[node]: this process is one storage node of several sharing one catalog (README "Several
    storage nodes"). Absent: a single-node service, nothing registered, nothing forwarded."""

    name: str
    address: str  # "host:port" other nodes reach this node's TLS listener on (one of [server] listen)
    cert_file: str  # client certificate for calls to other nodes (SAN URI blockwire://storage-node/<name>)
    key_file: str
    ca_file: str  # the CA that signed the other nodes' server certificates
    heartbeat_interval: float = 2.0
    down_after: float = 10.0  # seconds without a heartbeat after which the node is down
    forward_timeout: float = 120.0  # a forwarded call's deadline when its caller set none


@dataclass(frozen=True)
class SchedulerConfig:
    """[scheduler]: where CreateVolume puts a volume that names no backend (storagesvc.scheduler)."""

    max_attempts: int = 3  # backends tried, in rank order, before a create fails
    weigher: str = "free_capacity"  # or "volume_count"
    default_volume_type: str = ""  # the type of a volume created without one ("": none)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    backends: tuple[BackendConfig, ...] = ()
    exporters: Mapping[str, ExporterConfig] = field(default_factory=dict, hash=False)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: Limits = field(default_factory=Limits)  # [limits]: concurrent calls per class (blockwire.limits)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # [metrics]: Prometheus endpoint
    tracing: TracingConfig = field(default_factory=TracingConfig)  # [tracing]: where spans go
    keys: KeysConfig = field(default_factory=KeysConfig)  # [keys]: key manager of encrypted volumes
    node: NodeConfig | None = None  # [node]: one of several storage nodes (None: a single node)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)  # [catalog]: SQLite or PostgreSQL
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @property
    def catalog_path(self) -> str:
        """The SQLite file: [catalog] path, else [service] catalog_path."""
        return self.catalog.path or self.service.catalog_path


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
    t = _take(table, f"backends[{i}]", _fields(BackendConfig))
    if "monitors" in t:
        t["monitors"] = tuple(t["monitors"])
    caps = t.get("capabilities", {})
    if not isinstance(caps, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (str, bool, int, float)) for k, v in caps.items()
    ):
        raise ConfigError(f"[[backends]] {t.get('name')}: capabilities is a table of names to values")
    t["capabilities"] = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in caps.items()}
    b = BackendConfig(**t)
    if not b.oversubscription_ratio >= 1.0:
        raise ConfigError(f"[[backends]] {b.name}: oversubscription_ratio is 1.0 or more")
    if b.kind not in BACKEND_KINDS:
        raise ConfigError(f"[[backends]] {b.name}: kind is one of {', '.join(BACKEND_KINDS)}")
    if b.kind == "rbd":
        _rbd_backend(b)
        return b
    if b.exporter not in exporters:
        raise ConfigError(f"[[backends]] {b.name}: exporter {b.exporter!r} is not defined under [exporters]")
    if b.kind == "file" and not b.path:
        raise ConfigError(f"[[backends]] {b.name}: a file backend needs path")
    if b.kind == "lvm-thin" and not (b.vg and b.pool):
        raise ConfigError(f"[[backends]] {b.name}: an lvm-thin backend needs vg and pool")
    return b


def _rbd_backend(b: BackendConfig) -> None:  # noqa: PLR0912 - one check per key
    where = f"[[backends]] {b.name}"
    if b.exporter:
        raise ConfigError(f"{where}: an rbd backend has no exporter (hosts open the images directly)")
    if not b.pool:
        raise ConfigError(f"{where}: an rbd backend needs pool (the Ceph pool)")
    if not (b.conf or b.monitors):
        raise ConfigError(f"{where}: an rbd backend needs conf (a ceph.conf) or monitors")
    if not (b.keyring or b.key_file):
        raise ConfigError(f"{where}: an rbd backend needs keyring or key_file (the key of client.{b.user})")
    if b.keyring and b.key_file:
        raise ConfigError(f"{where}: keyring or key_file, not both")
    if b.host_users not in RBD_HOST_USERS:
        raise ConfigError(f"{where} host_users: one of {', '.join(RBD_HOST_USERS)}")
    if bool(b.host_user) != bool(b.host_key_file):
        raise ConfigError(f"{where}: host_user and host_key_file go together")
    if not (b.connect_timeout > 0 and b.op_timeout > 0):
        raise ConfigError(f"{where}: connect_timeout and op_timeout are seconds, more than 0")
    if b.capacity_bytes < 0:
        raise ConfigError(f"{where} capacity_bytes: 0 (from the cluster) or more")
    try:
        for i, m in enumerate(b.monitors):
            validate.portal(m, f"backends.{b.name}.monitors[{i}]")
    except InvalidArgument as exc:
        raise ConfigError(exc.message) from None
    for what, value in (("pool", b.pool), ("data_pool", b.data_pool), ("user", b.user)):
        if value and not validate.RBD_NAME_RE.fullmatch(value):
            raise ConfigError(f"{where} {what}: {value!r} is not 1-128 characters of [A-Za-z0-9._-]")


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


def _observability(top: Mapping[str, Any]) -> tuple[MetricsConfig, TracingConfig]:
    """[metrics] and [tracing]."""
    metrics = MetricsConfig(**_take(top.get("metrics", {}), "metrics", _fields(MetricsConfig)))
    if metrics.listen:
        try:
            validate.split_portal(metrics.listen, "metrics.listen")
        except InvalidArgument as exc:
            raise ConfigError(exc.message) from None
    tracing = TracingConfig(**_take(top.get("tracing", {}), "tracing", _fields(TracingConfig)))
    if tracing.check():
        raise ConfigError(tracing.check())
    return metrics, tracing


def parse(data: Mapping[str, Any]) -> Config:
    tables = (
        "server",
        "service",
        "backends",
        "exporters",
        "tls",
        "limits",
        "metrics",
        "tracing",
        "keys",
        "catalog",
        "node",
        "scheduler",
    )
    top = _take(data, "top level", tables)
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
    metrics, tracing = _observability(top)
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
        server=srv,
        service=service,
        backends=tuple(backends),
        exporters=exporters,
        tls=tls,
        limits=limits,
        metrics=metrics,
        tracing=tracing,
        keys=_keys(top.get("keys", {})),
        node=_node(top["node"], srv, tls) if "node" in top else None,
        catalog=_catalog(top.get("catalog", {})),
        scheduler=_scheduler(top.get("scheduler", {})),
    )


def _node(table: Mapping[str, Any], srv: ServerConfig, tls: TlsConfig) -> NodeConfig:
    t = _take(table, "node", _fields(NodeConfig))
    for key in ("name", "address", "cert_file", "key_file", "ca_file"):
        if not t.get(key):
            raise ConfigError(f'[node] {key}: required (README "Several storage nodes")')
    node = NodeConfig(**t)
    try:
        validate.name(node.name, "node.name")
        validate.split_portal(node.address, "node.address")
    except InvalidArgument as exc:
        raise ConfigError(exc.message) from None
    if not (0 < node.heartbeat_interval < node.down_after):
        raise ConfigError("[node] heartbeat_interval: seconds, more than 0 and less than down_after")
    if node.forward_timeout <= 0:
        raise ConfigError("[node] forward_timeout: seconds, more than 0")
    if not srv.listen or not tls.cert_file or not tls.client_ca_file or not tls.require_client_cert:
        raise ConfigError(
            "[node]: other nodes call this one over mutual TLS: set [server] listen and [tls] cert_file, "
            "key_file, client_ca_file with require_client_cert = true"
        )
    return node


def _catalog(table: Mapping[str, Any]) -> CatalogConfig:
    c = CatalogConfig(**_take(table, "catalog", _fields(CatalogConfig)))
    if c.kind not in CATALOG_KINDS:
        raise ConfigError(f"[catalog] kind: one of {', '.join(CATALOG_KINDS)}")
    if c.kind == "sqlite":
        if c.dsn or c.password_file:
            raise ConfigError('[catalog] dsn and password_file are for kind = "postgresql"')
        return c
    if c.path:
        raise ConfigError('[catalog] path is for kind = "sqlite" (postgresql: dsn)')
    if not c.dsn:
        raise ConfigError(
            '[catalog] kind = "postgresql" needs dsn (e.g. "host=db1 port=5432 user=bw dbname=bw")'
        )
    if not (1 <= c.pool_min_size <= c.pool_max_size) or c.lock_connections < 1:
        raise ConfigError("[catalog] 1 <= pool_min_size <= pool_max_size, and lock_connections >= 1")
    if not c.connect_timeout > 0:
        raise ConfigError("[catalog] connect_timeout: seconds, more than 0")
    try:
        from storagesvc.catalog.postgres import dsn_has_password  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ConfigError(
            '[catalog] kind = "postgresql" needs psycopg: pip install "blockwire[postgresql]"'
        ) from None
    try:
        has_password = dsn_has_password(c.dsn)
    except Exception:  # noqa: BLE001 - psycopg's parse error; never echo the dsn (it may hold a secret)
        raise ConfigError("[catalog] dsn: not a libpq connection string or postgresql:// URI") from None
    if has_password:
        raise ConfigError(
            "[catalog] dsn: holds a password (it would reach logs and errors); put it in password_file"
        )
    return c


def _scheduler(table: Mapping[str, Any]) -> SchedulerConfig:
    s = SchedulerConfig(**_take(table, "scheduler", _fields(SchedulerConfig)))
    if not (isinstance(s.max_attempts, int) and 1 <= s.max_attempts <= 100):
        raise ConfigError("[scheduler] max_attempts: 1 to 100 backends")
    if s.weigher not in WEIGHERS:
        raise ConfigError(f"[scheduler] weigher: one of {', '.join(WEIGHERS)}")
    if s.default_volume_type:
        try:
            validate.name(s.default_volume_type, "scheduler.default_volume_type")
        except InvalidArgument as exc:
            raise ConfigError(exc.message) from None
    return s


def _keys(table: Mapping[str, Any]) -> KeysConfig:
    k = KeysConfig(**_take(table, "keys", _fields(KeysConfig)))
    if k.kind not in KEY_KINDS:
        raise ConfigError(f"[keys] kind: one of {', '.join(KEY_KINDS)}")
    if k.kind == "kmip" and not (k.host and k.cert_file and k.key_file and k.ca_file):
        raise ConfigError('[keys] kind = "kmip" needs host, cert_file, key_file and ca_file')
    return k


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
