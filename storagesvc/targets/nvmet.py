"""The `nvmet` exporter: the kernel's NVMe target over TCP, driven through configfs
(``/sys/kernel/config/nvmet``) directly, as the `lio` exporter drives LIO; no nvmetcli.

Layout it makes (and `remove_target` takes away again):

* one subsystem per volume, ``subsystems/<nqn_prefix>:<volume id>`` (`storagesvc.identity`), with
  ``attr_allow_any_host`` 0 (never 1: only listed hosts connect) and ``attr_serial`` the volume's serial;
* its namespace 1 on the volume's device or file (``device_path``), announcing the volume's NGUID and
  UUID (``device_nguid``, ``device_uuid``; `storagesvc.identity` says how they are derived), enabled;
* one TCP port per configured address (``ports/<id>`` with ``addr_trtype`` tcp, ``addr_traddr``,
  ``addr_trsvcid``); the subsystem is linked into each (``ports/<id>/subsystems/<nqn>``), so a host
  connecting to every address gets one controller per port: several paths, which the host's native
  NVMe multipath joins under one namespace head. Each port reports its own ANA state for ANA group 1
  (``ports/<id>/ana_groups/1/ana_state``, set to ``optimized``), the group the namespaces are in: every
  port is a separate path with its own state, and an operator can move one port's paths to
  ``inaccessible`` or ``non-optimized`` alone. Ports are found by their address (trtype, traddr,
  trsvcid), whatever their id; a missing one is made with the lowest free id. Ports are shared by every
  subsystem on that address and stay when the last subsystem goes (the kernel stops listening on a port
  with no subsystem);
* per admitted host: ``hosts/<host nqn>`` with its DH-HMAC-CHAP keys, linked from the subsystem's
  ``allowed_hosts``. The kernel keeps one key per host NQN for every subsystem, so the secrets are per
  host, not per export: both are derived from a random 32-byte seed kept in `dhchap_key_file` (created
  mode 0600 on first use) with HMAC-SHA256 over the host NQN, so they are stable across restarts and
  exports without being stored in the catalog, and differ for every host. The host secret goes to
  ``dhchap_key``, the controller secret (bidirectional authentication) to ``dhchap_ctrl_key``. A host
  entry goes with the last subsystem that admits it.

Secrets are written to configfs files, never onto a command line, and never logged. A kernel built
without NVMe target authentication (``CONFIG_NVME_TARGET_AUTH``: host entries have no ``dhchap_key``)
cannot authenticate hosts: with `dhchap` on, `start` refuses with FAILED_PRECONDITION and says to set
``dhchap = false``; nothing is exported unauthenticated by surprise.

A file on a file system without O_DIRECT (tmpfs) is served with ``buffered_io`` 1 (the target opens
files with O_DIRECT by default and fails with EINVAL otherwise).

Read-only exports are refused: the kernel target (6.1) has no write protection per namespace or host.
Growing is one write to the namespace's ``revalidate_size``: the target re-reads the size of the device
or file and tells connected hosts (namespace attribute changed); files grow too, unlike LIO fileio.

Every method is idempotent, like the other exporters. Configfs writes go through `Configfs`, so the
unit tier runs this module on a temporary directory that imitates configfs (tests/fakes/nvmet.py).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import secrets
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from blockwire.errors import BlockwireError, FailedPrecondition, Unavailable
from blockwire.secret import Secret
from blockwire.validate import split_portal
from storagesvc import identity
from storagesvc.targets.base import LunState, TargetSpec, TargetState

log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config/nvmet")
DEFAULT_KEY_FILE = "/var/lib/blockwire/nvmet-dhchap.key"
ANA_GROUP = "1"
SEED_BYTES = 32
#: Where the auth probe host lives for an instant while `start` checks the kernel.
PROBE_HOST = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000-blockwire-probe"


class Configfs:
    """The writes the exporter makes on configfs. Reads use plain `Path`s. Configfs makes an item's
    attributes and default groups on mkdir and removes them with rmdir; a stand-in
    (tests/fakes/nvmet.py) imitates that on a temporary directory."""

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        path.rmdir()

    def link(self, link: Path, target: Path) -> None:
        link.symlink_to(target)

    def unlink(self, link: Path) -> None:
        link.unlink()

    def write(self, path: Path, value: str) -> None:
        # One write(2) per attribute: configfs stores what a single write gives it.
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None


def dhchap_secret(key: bytes) -> Secret:
    """A DH-HMAC-CHAP secret in the representation nvme-cli and the kernel take (NVMe base
    specification 8.13.5.8): ``DHHC-1:00:`` + base64(key + CRC-32 of key, little endian) + ``:``;
    00: the key is used as it is (no transformation)."""
    crc = zlib.crc32(key).to_bytes(4, "little")
    return Secret(f"DHHC-1:00:{base64.b64encode(key + crc).decode()}:")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _direct_io_ok(path: str) -> bool:
    """Whether the target can open the volume's file with O_DIRECT, as it does by default; a file on a
    file system without it (tmpfs) is served through the page cache instead (``buffered_io``)."""
    if not os.path.isfile(path):
        return True  # block devices: always direct
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def _nguid_of(text: str) -> str:
    """configfs shows an NGUID like a UUID ("%pUb"); the 32 hex digits, lower case."""
    return text.replace("-", "").replace(":", "").lower()


class NvmetExporter:
    kind = "nvmet"
    lun = identity.NVME_NAMESPACE_ID

    def __init__(
        self,
        portals: Sequence[str],
        *,
        nqn_prefix: str,
        dhchap: bool = True,
        dhchap_bidirectional: bool = True,
        dhchap_key_file: str | Path = DEFAULT_KEY_FILE,
        root: Path = CONFIGFS,
        configfs: Configfs | None = None,
    ) -> None:
        self.portals = tuple(portals)
        self.nqn_prefix = nqn_prefix
        self.dhchap = dhchap
        self.dhchap_bidirectional = dhchap_bidirectional
        self.key_file = Path(dhchap_key_file)
        self.root = root
        self.fs = configfs or Configfs()
        self._ports: dict[str, Path] = {}  # portal -> ports/<id>
        self._hosts = threading.Lock()  # host entries are shared by every subsystem that admits them
        self._seed: bytes | None = None

    # -- paths

    def _subsys(self, nqn: str) -> Path:
        return self.root / "subsystems" / nqn

    def _host(self, host_nqn: str) -> Path:
        return self.root / "hosts" / host_nqn

    def _namespace(self, nqn: str) -> Path:
        return self._subsys(nqn) / "namespaces" / str(self.lun)

    @contextlib.contextmanager
    def _configfs(self, what: str) -> Iterator[None]:
        """configfs errors as UNAVAILABLE, with the path and the kernel's reason (never a value)."""
        try:
            yield
        except BlockwireError:
            raise
        except OSError as exc:
            where = exc.filename or self.root
            raise Unavailable(f"nvmet: {what}: {where}: {exc.strerror or exc}") from exc

    # -- start, health

    def start(self) -> None:
        if not (self.root / "subsystems").is_dir():
            raise Unavailable(
                f"the NVMe target is not available: {self.root} is missing (mount configfs at "
                "/sys/kernel/config, modprobe nvmet nvmet-tcp)"
            )
        with self._configfs("preparing the ports"):
            self._ensure_ports()
            if self.dhchap:
                self._check_auth()
                self._load_seed()

    def healthy(self) -> bool:
        return (self.root / "subsystems").is_dir()

    def _ensure_ports(self) -> dict[str, Path]:
        ports_dir = self.root / "ports"
        for portal in self.portals:
            port = self._find_port(portal)
            if port is None:
                port = self._make_port(portal)
            ana = port / "ana_groups" / ANA_GROUP / "ana_state"
            if ana.exists() and _read(ana) != "optimized":
                self.fs.write(ana, "optimized")
            self._ports[portal] = port
        assert ports_dir.is_dir()
        return self._ports

    def _find_port(self, portal: str) -> Path | None:
        ip, port = split_portal(portal)
        for p in sorted((self.root / "ports").iterdir(), key=lambda x: x.name):
            if (_read(p / "addr_trtype"), _read(p / "addr_traddr"), _read(p / "addr_trsvcid")) == (
                "tcp",
                ip,
                str(port),
            ):
                return p
        return None

    def _make_port(self, portal: str) -> Path:
        ip, port_number = split_portal(portal)
        used = {p.name for p in (self.root / "ports").iterdir()}
        port_id = next(str(i) for i in range(1, 65536) if str(i) not in used)
        port = self.root / "ports" / port_id
        self.fs.mkdir(port)
        try:
            self.fs.write(port / "addr_trtype", "tcp")
            self.fs.write(port / "addr_adrfam", "ipv6" if ":" in ip else "ipv4")
            self.fs.write(port / "addr_traddr", ip)
            self.fs.write(port / "addr_trsvcid", str(port_number))
        except BaseException:
            self.fs.rmdir(port)
            raise
        log.info("nvmet port %s on tcp %s", port_id, portal)
        return port

    def _check_auth(self) -> None:
        """Whether this kernel's target can authenticate hosts (host entries have ``dhchap_key``)."""
        hosts = sorted((self.root / "hosts").iterdir())
        if hosts:
            supported = (hosts[0] / "dhchap_key").exists()
        else:
            probe = self._host(PROBE_HOST)
            self.fs.mkdir(probe)
            try:
                supported = (probe / "dhchap_key").exists()
            finally:
                self.fs.rmdir(probe)
        if not supported:
            raise FailedPrecondition(
                "this kernel's NVMe target cannot authenticate hosts (no DH-HMAC-CHAP: "
                "CONFIG_NVME_TARGET_AUTH is off); set dhchap = false for the nvmet exporter to export "
                "without authentication (hosts are still admitted by host NQN only)"
            )

    # -- DH-HMAC-CHAP secrets

    def _load_seed(self) -> bytes:
        if self._seed is not None:
            return self._seed
        try:
            seed = bytes.fromhex(self.key_file.read_text().strip())
        except FileNotFoundError:
            seed = secrets.token_bytes(SEED_BYTES)
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(seed.hex() + "\n")
            log.info("nvmet: made the DH-HMAC-CHAP seed %s", self.key_file)
        except ValueError:
            raise FailedPrecondition(
                f"nvmet: {self.key_file} is not a hex DH-HMAC-CHAP seed; restore it, or remove it to "
                "make a new one (hosts then need new connection info)"
            ) from None
        if len(seed) < SEED_BYTES:
            raise FailedPrecondition(f"nvmet: {self.key_file} holds fewer than {SEED_BYTES} bytes")
        self._seed = seed
        return seed

    def host_secrets(self, host_nqn: str) -> tuple[Secret | None, Secret | None]:
        if not self.dhchap:
            return None, None
        with self._configfs("reading the DH-HMAC-CHAP seed"):
            seed = self._load_seed()
        host = dhchap_secret(hmac.new(seed, b"host\0" + host_nqn.encode(), hashlib.sha256).digest())
        if not self.dhchap_bidirectional:
            return host, None
        ctrl = dhchap_secret(hmac.new(seed, b"ctrl\0" + host_nqn.encode(), hashlib.sha256).digest())
        return host, ctrl

    # -- targets

    def ensure_target(self, spec: TargetSpec) -> None:
        if spec.readonly:
            raise FailedPrecondition(
                "the nvmet exporter cannot export read-only (the kernel NVMe target has no write "
                "protection); attach read-write or use an iSCSI exporter"
            )
        nqn = spec.target_iqn
        sub = self._subsys(nqn)
        with self._configfs(f"exporting {nqn}"), contextlib.ExitStack() as undo:
            ports = self._ports or self._ensure_ports()
            if not sub.is_dir():
                self.fs.mkdir(sub)
                undo.callback(self.remove_target, nqn)
            if _read(sub / "attr_allow_any_host") != "0":
                self.fs.write(sub / "attr_allow_any_host", "0")
            self._set_serial(sub, spec.serial)
            self._ensure_namespace(nqn, spec)
            for port in ports.values():
                link = port / "subsystems" / nqn
                if not link.is_symlink():
                    self.fs.link(link, sub)
            undo.pop_all()
        log.info("nvmet subsystem %s exports %s", nqn, spec.device_path)

    def _set_serial(self, sub: Path, serial: str) -> None:
        if _read(sub / "attr_serial") == serial:
            return
        try:
            self.fs.write(sub / "attr_serial", serial)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # The kernel fixes the serial once a host has identified the controller.
            log.warning("nvmet subsystem %s keeps serial %s (%s)", sub.name, _read(sub / "attr_serial"), exc)

    def _ensure_namespace(self, nqn: str, spec: TargetSpec) -> None:
        ns = self._namespace(nqn)
        if ns.is_dir():
            wrong = self._namespace_state(nqn, ports=False).differs(spec)
            if not wrong:
                return
            if _read(ns / "enable") == "1":
                log.warning("nvmet subsystem %s: %s; putting it right", nqn, wrong)
                self.fs.write(ns / "enable", "0")
        else:
            self.fs.mkdir(ns)
        self.fs.write(ns / "device_path", spec.device_path)
        buffered = "0" if _direct_io_ok(spec.device_path) else "1"
        if (ns / "buffered_io").exists() and _read(ns / "buffered_io") != buffered:
            self.fs.write(ns / "buffered_io", buffered)
        self.fs.write(ns / "device_nguid", spec.nguid)
        self.fs.write(ns / "device_uuid", spec.uuid)
        if (ns / "ana_grpid").exists() and _read(ns / "ana_grpid") != ANA_GROUP:
            self.fs.write(ns / "ana_grpid", ANA_GROUP)
        self.fs.write(ns / "enable", "1")

    def remove_target(self, target_iqn: str) -> None:
        nqn = target_iqn
        sub = self._subsys(nqn)
        with self._configfs(f"removing {nqn}"):
            for port in sorted((self.root / "ports").iterdir()):
                link = port / "subsystems" / nqn
                if link.is_symlink():
                    self.fs.unlink(link)
            if not sub.is_dir():
                return
            with self._hosts:
                hosts = sorted(p.name for p in (sub / "allowed_hosts").iterdir())
                for h in hosts:
                    self.fs.unlink(sub / "allowed_hosts" / h)
                for ns in sorted((sub / "namespaces").iterdir()):
                    if _read(ns / "enable") == "1":
                        self.fs.write(ns / "enable", "0")
                    self.fs.rmdir(ns)
                self.fs.rmdir(sub)
                for h in hosts:
                    self._drop_host_if_unused(h)
        log.info("nvmet subsystem %s removed", nqn)

    def allow(self, spec: TargetSpec, initiator_iqn: str) -> None:
        """Admits the host NQN `initiator_iqn` (with its DH-HMAC-CHAP keys when `dhchap` is on)."""
        nqn, host_nqn = spec.target_iqn, initiator_iqn
        sub = self._subsys(nqn)
        if not sub.is_dir():
            raise Unavailable(f"subsystem {nqn} is gone from nvmet; export checks rebuild it: retry")
        host_secret, ctrl_secret = self.host_secrets(host_nqn)
        with self._configfs(f"admitting {host_nqn} to {nqn}"), self._hosts:
            host = self._host(host_nqn)
            made = False
            if not host.is_dir():
                self.fs.mkdir(host)
                made = True
            try:
                if host_secret is not None:
                    if not (host / "dhchap_key").exists():
                        raise FailedPrecondition(
                            "this kernel's NVMe target has no DH-HMAC-CHAP (CONFIG_NVME_TARGET_AUTH); "
                            "set dhchap = false for the nvmet exporter"
                        )
                    self._write_secret(host / "dhchap_key", host_secret)
                if ctrl_secret is not None and (host / "dhchap_ctrl_key").exists():
                    self._write_secret(host / "dhchap_ctrl_key", ctrl_secret)
                link = sub / "allowed_hosts" / host_nqn
                if not link.is_symlink():
                    self.fs.link(link, host)
            except BaseException:
                if made:
                    self._drop_host_if_unused(host_nqn)
                raise

    def _write_secret(self, path: Path, secret: Secret) -> None:
        if _read(path) != secret.reveal():
            self.fs.write(path, secret.reveal())

    def deny(self, target_iqn: str, initiator_iqn: str) -> None:
        link = self._subsys(target_iqn) / "allowed_hosts" / initiator_iqn
        with self._configfs(f"removing {initiator_iqn} from {target_iqn}"), self._hosts:
            if link.is_symlink():
                self.fs.unlink(link)
            self._drop_host_if_unused(initiator_iqn)

    def _drop_host_if_unused(self, host_nqn: str) -> None:
        """Removes ``hosts/<host_nqn>`` unless a subsystem (ours or not) still admits it; under `_hosts`."""
        host = self._host(host_nqn)
        if not host.is_dir():
            return
        for sub in (self.root / "subsystems").iterdir():
            if (sub / "allowed_hosts" / host_nqn).is_symlink():
                return
        self.fs.rmdir(host)

    def resize(self, spec: TargetSpec) -> None:
        """The target re-reads the size of the device or file and tells the connected hosts."""
        ns = self._namespace(spec.target_iqn)
        with self._configfs(f"resizing {spec.target_iqn}"):
            if _read(ns / "enable") != "1":
                raise Unavailable(
                    f"subsystem {spec.target_iqn} has no enabled namespace; export checks rebuild it: retry"
                )
            self.fs.write(ns / "revalidate_size", "1")

    def list_targets(self, prefix: str) -> list[TargetState]:
        """Subsystems whose NQN starts with `prefix`, with their allowed hosts and namespace 1. The
        namespace counts as offline when it is disabled or its subsystem is missing from a port."""
        out = []
        with self._configfs("listing subsystems"):
            for sub in sorted((self.root / "subsystems").iterdir()):
                if not sub.name.startswith(prefix):
                    continue
                hosts = tuple(sorted(p.name for p in (sub / "allowed_hosts").iterdir()))
                ns = self._namespace(sub.name)
                out.append(
                    TargetState(sub.name, hosts, self._namespace_state(sub.name) if ns.is_dir() else None)
                )
        return out

    def _namespace_state(self, nqn: str, *, ports: bool = True) -> LunState:
        """Namespace 1 of `nqn`; online: enabled and (with `ports`) linked into every port."""
        ns = self._namespace(nqn)
        linked = not ports or all((p / "subsystems" / nqn).is_symlink() for p in self._ports.values())
        return LunState(
            lun=self.lun,
            device_path=_read(ns / "device_path"),
            wwn="",
            serial=_read(self._subsys(nqn) / "attr_serial"),
            online=_read(ns / "enable") == "1" and linked,
            readonly=None,
            nguid=_nguid_of(_read(ns / "device_nguid")),
            uuid=_read(ns / "device_uuid").lower(),
        )
