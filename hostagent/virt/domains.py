"""libvirt: the ONLY module that imports it (STYLE.md rule 2). Implements `Hypervisor`.

* attach: attachDeviceFlags with AFFECT_LIVE, plus AFFECT_CONFIG when asked and the domain is
  persistent (transient domains reject CONFIG); target names are allocated under a per-domain lock from
  the live (and persistent) XML, so concurrent attaches never collide.
* detach: detachDeviceFlags under the per-domain lock, then, with the lock released, wait for
  VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED (or REMOVAL_FAILED) for the disk's alias, with a deadline: other
  attaches and detaches on the domain go on meanwhile (a disk being removed is still in the live XML, so
  its target name is not given out again until it is gone). Events come from libvirt's default event
  loop, run by one thread.
* connection: `libvirt.open` runs in a helper thread, one at a time; callers wait for it at most
  `connect_timeout` seconds from when it began, then get Unavailable, so a hung libvirtd cannot hold the
  agent's threads.
* libvirt errors are mapped to the blockwire error tree here, and nowhere else.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import libvirt
from lxml import etree

from blockwire.errors import (
    BlockwireError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from blockwire.runtime.clock import Clock, Deadline, SystemClock
from blockwire.runtime.locks import KeyedLocks
from blockwire.secret import Secret
from hostagent.model import Bus
from hostagent.virt.diskxml import (
    DiskSpec,
    LiveDisk,
    disk_element,
    disk_xml,
    next_drive_address,
    next_target_dev,
    parse_domain_disks,
)
from hostagent.virt.hypervisor import DomainInfo

log = logging.getLogger(__name__)

_SECRET_USAGE = {
    "iscsi": libvirt.VIR_SECRET_USAGE_TYPE_ISCSI,
    "ceph": libvirt.VIR_SECRET_USAGE_TYPE_CEPH,
    "volume": libvirt.VIR_SECRET_USAGE_TYPE_VOLUME,
}
# The <usage> child naming the secret, by usage type; a 'volume' secret (a LUKS passphrase) is ephemeral:
# libvirt keeps it in memory only, never in /etc/libvirt/secrets.
_USAGE_TAG = {"iscsi": "target", "ceph": "name", "volume": "volume"}
_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    getattr(libvirt, "VIR_ERR_AUTH_UNAVAILABLE", -1),
}

# Why a domain paused for a live migration: arriving (the destination's QEMU waits for the state),
# leaving (the source's last copy), or post-copy.
_MIGRATION_PAUSES = frozenset(
    {
        libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
        libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
        getattr(libvirt, "VIR_DOMAIN_PAUSED_POSTCOPY", -1),
    }
)

# libvirt's default event implementation is process-wide by libvirt's design: it may be registered
# once per process. This guard is the only process-wide state of the agent.
_event_impl_lock = threading.Lock()
_event_impl_started = False


def _start_event_loop() -> None:
    global _event_impl_started  # noqa: PLW0603 - see the comment above
    with _event_impl_lock:
        if _event_impl_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; errors reach us as exceptions instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError:
                    log.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_impl_started = True


def map_libvirt_error(exc: libvirt.libvirtError, what: str) -> BlockwireError:  # noqa: PLR0911
    """The blockwire error for a libvirtError; the message says what failed and libvirt's reason."""
    code = exc.get_error_code()
    text = str(exc.get_error_message() or exc)
    message = f"{what}: {text}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFound(message)
    if code == libvirt.VIR_ERR_NO_SECRET:
        return NotFound(message)
    if "Authentication failure" in text or "(513)" in text or code == libvirt.VIR_ERR_AUTH_FAILED:
        return PermissionDenied(f"{message} (check the CHAP credentials and the target's ACL)")
    if "cannot unlock any keyslot" in text:  # QEMU's luks driver: the passphrase opens no key slot
        return PermissionDenied(
            f"{message} (the encrypted volume's key is wrong: it opens none of its LUKS key slots)"
        )
    if "Target not found" in text or "(515)" in text:
        return NotFound(f"{message} (the target is not exported to this host)")
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return DeadlineExceeded(message)
    if code in _CONNECTION_ERRORS:
        return Unavailable(f"{message} (is libvirtd running?)")
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return FailedPrecondition(message)
    return FailedPrecondition(message)


def _raise(exc: libvirt.libvirtError, what: str) -> NoReturn:
    raise map_libvirt_error(exc, what) from exc


@dataclass(eq=False)
class _Opening:
    """One `libvirt.open` in its helper thread; `done` is set when it returned (conn or error)."""

    started: float
    done: threading.Event = field(default_factory=threading.Event)
    conn: Any = None
    error: str = ""


@dataclass(eq=False)
class _Waiter:
    """A detach waiting for DEVICE_REMOVED or DEVICE_REMOVAL_FAILED of one alias."""

    done: threading.Event = field(default_factory=threading.Event)
    outcomes: list[str] = field(default_factory=list)


class LibvirtHypervisor:
    """The real Hypervisor on a libvirt connection (`qemu:///system` by default).

    `opener` (libvirt.open) and `start_events` (libvirt's default event loop) are injected for tests."""

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        connect_timeout: float = 10.0,
        opener: Callable[[str], Any] = libvirt.open,
        start_events: Callable[[], None] = _start_event_loop,
        clock: Clock | None = None,
    ) -> None:
        self.uri = uri
        self.connect_timeout = connect_timeout
        self._opener = opener
        self._start_events = start_events
        self._clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()  # guards _conn, _opening and _callback_ids; never held for a call
        self._conn: Any = None
        self._opening: _Opening | None = None
        self._domain_locks = KeyedLocks()
        self._waiters: dict[tuple[str, str], list[_Waiter]] = {}
        self._waiters_lock = threading.Lock()
        self._callback_ids: list[int] = []

    # -- connection and events --------------------------------------------------------------------
    def _connection(self) -> Any:
        """The open connection, or a new one. At most one `libvirt.open` runs (in a helper thread);
        every caller waits for it until `connect_timeout` seconds after it began, then gets Unavailable
        naming the URI and the bound (a caller that comes later does not wait longer)."""
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            opening = self._opening
            if opening is None:
                self._start_events()
                opening = self._opening = _Opening(self._clock.monotonic())
                threading.Thread(target=self._open, args=(opening,), name="libvirt-open", daemon=True).start()
        left = opening.started + self.connect_timeout - self._clock.monotonic()
        if not opening.done.wait(max(0.0, left)):
            waited = self._clock.monotonic() - opening.started
            raise Unavailable(
                f"cannot connect to libvirt at {self.uri}: no answer for {waited:.1f}s, past the bound "
                f"of {self.connect_timeout:g}s (libvirt_connect_timeout); is libvirtd hung? Check it with "
                f"`virsh -c {self.uri} version`, restart it, and retry"
            )
        if opening.conn is None:
            raise Unavailable(opening.error)
        return opening.conn

    def _open(self, opening: _Opening) -> None:
        """The helper thread of `_connection`: opens, sets keepalive, registers the event callbacks."""
        conn: Any = None
        ids: list[int] = []
        try:
            conn = self._opener(self.uri)
            conn.setKeepAlive(5, 3)
            ids = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed, None
                ),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, self._on_removal_failed, None
                ),
            ]
        except Exception as exc:  # every failure must reach the waiting callers
            if not isinstance(exc, libvirt.libvirtError):
                log.exception("opening libvirt at %s failed", self.uri)
            opening.error = f"cannot connect to libvirt at {self.uri}: {exc} (is libvirtd running?)"
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
            conn = None
        with self._lock:
            current = self._opening is opening
            if current:
                self._opening = None
                if conn is not None:
                    self._conn = conn
                    self._callback_ids = ids
        if conn is not None and not current:  # close() ran meanwhile: nobody owns this connection
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            conn = None
            opening.error = f"the libvirt connection to {self.uri} was closed while it was being opened"
        opening.conn = conn
        opening.done.set()

    def close(self) -> None:
        with self._lock:
            self._opening = None  # an open still running closes what it gets
            if self._conn is not None:
                for cid in self._callback_ids:
                    try:
                        self._conn.domainEventDeregisterAny(cid)
                    except libvirt.libvirtError:
                        log.debug("deregistering event callback %d failed", cid)
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    log.debug("closing the libvirt connection failed")
                self._conn = None

    def _signal(self, dom: Any, alias: str, outcome: str) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters.get((dom.UUIDString(), alias), ()))
        for waiter in waiters:
            waiter.outcomes.append(outcome)
            waiter.done.set()

    def _on_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        log.debug("DEVICE_REMOVED %s %s", dom.name(), alias)
        self._signal(dom, alias, "removed")

    def _on_removal_failed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        log.debug("DEVICE_REMOVAL_FAILED %s %s", dom.name(), alias)
        self._signal(dom, alias, "failed")

    # -- domains ----------------------------------------------------------------------------------
    def _domain(self, domain: str) -> Any:
        conn = self._connection()
        try:
            try:
                return conn.lookupByName(domain)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                try:
                    uuidlib.UUID(domain)
                except ValueError:
                    raise exc from None
                return conn.lookupByUUIDString(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"domain {domain!r} does not exist on this host") from exc
            _raise(exc, f"looking up domain {domain!r}")

    def lookup(self, domain: str) -> DomainInfo:
        dom = self._domain(domain)
        try:
            state, reason = dom.state()
            migrating = state == libvirt.VIR_DOMAIN_PAUSED and reason in _MIGRATION_PAUSES
            return DomainInfo(
                dom.name(), dom.UUIDString(), bool(dom.isPersistent()), bool(dom.isActive()), migrating
            )
        except libvirt.libvirtError as exc:
            _raise(exc, f"reading domain {domain!r}")

    def _xml(self, dom: Any, inactive: bool = False) -> str:
        try:
            return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))
        except libvirt.libvirtError as exc:
            _raise(exc, f"reading the XML of domain {dom.name()!r}")

    def disks(self, domain: str, *, inactive: bool = False) -> list[LiveDisk]:
        return parse_domain_disks(self._xml(self._domain(domain), inactive=inactive))

    def running_disks(self) -> dict[str, list[LiveDisk]]:
        conn = self._connection()
        try:
            doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            _raise(exc, "listing the running domains")
        found: dict[str, list[LiveDisk]] = {}
        for dom in doms:
            try:
                found[dom.name()] = parse_domain_disks(str(dom.XMLDesc(0)))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    _raise(exc, "reading a running domain's XML")
                # it stopped since the listing: it holds nothing now
        return found

    def defined_disks(self) -> dict[str, list[LiveDisk]]:
        """The disks of every domain of the host, running (live XML) or only defined (its definition), by
        domain name: who holds or will open what."""
        conn = self._connection()
        try:
            doms = conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            _raise(exc, "listing the domains")
        found: dict[str, list[LiveDisk]] = {}
        for dom in doms:
            try:
                xmls = [str(dom.XMLDesc(0))]
                if dom.isPersistent():
                    xmls.append(str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
                found[dom.name()] = [d for xml in xmls for d in parse_domain_disks(xml)]
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    _raise(exc, "reading a domain's XML")
        return found

    def attach_disk(
        self,
        domain: str,
        build: Callable[[str], DiskSpec],
        *,
        bus: Bus,
        preferred_target: str = "",
        persistent: bool = False,
        cold: bool = False,
    ) -> DiskSpec:
        dom = self._domain(domain)
        with self._domain_locks.hold(dom.UUIDString()):
            if cold:
                return self._attach_cold(dom, build, bus=bus, preferred_target=preferred_target)
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
            xmls = [self._xml(dom)]
            if persistent and dom.isPersistent():
                flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
                xmls.append(self._xml(dom, inactive=True))
            used = {d.spec.target_dev for xml in xmls for d in parse_domain_disks(xml)}
            spec = build(next_target_dev(bus, used, preferred_target))
            if spec.bus is Bus.SCSI and spec.address is None:
                spec = replace(spec, address=next_drive_address(*xmls))
            xml = disk_xml(spec)
            log.debug("attaching to %s: %s", dom.name(), xml)
            try:
                dom.attachDeviceFlags(xml, flags)
            except libvirt.libvirtError as exc:
                _raise(exc, f"attaching {spec.target_dev} to domain {dom.name()!r}")
            return spec

    def _attach_cold(
        self, dom: Any, build: Callable[[str], DiskSpec], *, bus: Bus, preferred_target: str
    ) -> DiskSpec:
        """Writes the disk into a shut-off domain's definition (AFFECT_CONFIG only). A disk with a boot
        order goes in by redefining the domain with the definition's <os><boot dev=.../> elements removed:
        libvirt refuses per-device boot orders beside them (and adds <boot dev='hd'/> to every definition
        that has no device boot order). Called under the domain's lock."""
        name = dom.name()
        try:
            active, persistent = bool(dom.isActive()), bool(dom.isPersistent())
        except libvirt.libvirtError as exc:
            _raise(exc, f"reading domain {name!r}")
        if active or not persistent:
            raise FailedPrecondition(
                f"domain {name!r} is {'running' if active else 'not defined'} now, not shut off; "
                "repeat the attach (a running domain gets the disk hot-plugged)"
            )
        config = self._xml(dom, inactive=True)
        used = {d.spec.target_dev for d in parse_domain_disks(config)}
        spec = build(next_target_dev(bus, used, preferred_target))
        if spec.bus is Bus.SCSI and spec.address is None:
            spec = replace(spec, address=next_drive_address(config))
        log.debug("writing into the definition of %s: %s", name, disk_xml(spec))
        try:
            if not spec.boot_order:
                dom.attachDeviceFlags(disk_xml(spec), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                return spec
            # SECURE: the definition is written back whole, with its passwords (graphics, ...).
            root = etree.fromstring(
                str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)).encode()
            )
            taken = [b.get("order") for b in root.iterfind("devices/*/boot")]
            if str(spec.boot_order) in taken:
                raise FailedPrecondition(
                    f"boot order {spec.boot_order} is already given to another device of domain {name!r}; "
                    "ask another one"
                )
            os_el = root.find("os")
            if os_el is not None:
                for boot in os_el.findall("boot"):
                    os_el.remove(boot)
            devices = root.find("devices")
            if devices is None:
                devices = etree.SubElement(root, "devices")
            devices.append(disk_element(spec))
            dom.connect().defineXML(etree.tostring(root, encoding="unicode"))
        except libvirt.libvirtError as exc:
            _raise(exc, f"writing {spec.target_dev} into the definition of domain {name!r}")
        return spec

    def detach_disk(self, domain: str, target_dev: str, deadline: Deadline) -> bool:
        dom = self._domain(domain)
        if not dom.isActive():  # shut off: only its definition has disks (a transient one is gone)
            return self._detach_config(dom, target_dev)
        uuid = dom.UUIDString()
        with self._domain_locks.hold(uuid):
            live = _disk_elements(self._xml(dom))
            config = _disk_elements(self._xml(dom, inactive=True)) if dom.isPersistent() else {}
            if target_dev not in live:
                if target_dev in config:
                    self._detach(dom, config[target_dev], libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                    return True
                return False
            element = live[target_dev]
            alias_el = element.find("alias")
            alias = alias_el.get("name", "") if alias_el is not None else ""
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
            if target_dev in config:
                flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
            key = (uuid, alias)
            waiter = _Waiter()
            with self._waiters_lock:
                self._waiters.setdefault(key, []).append(waiter)
            try:
                self._detach(dom, element, flags)
            except BaseException:
                self._drop_waiter(key, waiter)
                raise
        # The domain lock is free while the guest releases the disk: the disk stays in the live XML
        # until DEVICE_REMOVED, so an attach meanwhile never takes its target name.
        try:
            waiter.done.wait(deadline.remaining())
        finally:
            self._drop_waiter(key, waiter)
        if waiter.outcomes and waiter.outcomes[-1] == "failed":
            raise FailedPrecondition(f"domain {dom.name()!r} refused to release {target_dev}")
        if target_dev in _disk_elements(self._xml(dom)):
            raise DeadlineExceeded(
                f"domain {dom.name()!r} did not release {target_dev} within {deadline.seconds:g}s; "
                "repeat the detach to finish it"
            )
        return True

    def _drop_waiter(self, key: tuple[str, str], waiter: _Waiter) -> None:
        with self._waiters_lock:
            waiters = self._waiters.get(key, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(key, None)

    def _detach_config(self, dom: Any, target_dev: str) -> bool:
        config = _disk_elements(self._xml(dom, inactive=True))
        if target_dev not in config:
            return False
        self._detach(dom, config[target_dev], libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        return True

    def _detach(self, dom: Any, element: etree._Element, flags: int) -> None:
        xml = etree.tostring(element, encoding="unicode")
        try:
            dom.detachDeviceFlags(xml, flags)
        except libvirt.libvirtError as exc:
            _raise(exc, f"detaching a disk from domain {dom.name()!r}")

    def block_resize(self, domain: str, target_dev: str, size_bytes: int) -> None:
        dom = self._domain(domain)
        try:
            dom.blockResize(target_dev, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        except libvirt.libvirtError as exc:
            _raise(exc, f"resizing {target_dev} of domain {dom.name()!r}")

    # -- live migration ---------------------------------------------------------------------------
    def migratable_xml(self, domain: str) -> str:
        dom = self._domain(domain)
        try:
            return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
        except libvirt.libvirtError as exc:
            _raise(exc, f"reading the XML of domain {dom.name()!r}")

    def migrate(self, domain: str, destination_uri: str, destination_xml: str) -> None:
        dom = self._domain(domain)
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        try:
            dom.migrateToURI3(destination_uri, {libvirt.VIR_MIGRATE_PARAM_DEST_XML: destination_xml}, flags)
        except libvirt.libvirtError as exc:
            _raise(exc, f"migrating domain {domain!r} to {destination_uri}")

    # -- secrets ----------------------------------------------------------------------------------
    def _secret(self, usage: str, secret_type: str) -> Any:
        conn = self._connection()
        try:
            return conn.secretLookupByUsage(_SECRET_USAGE[secret_type], usage)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return None
            _raise(exc, f"looking up secret {usage!r}")

    def define_secret(self, usage: str, secret_type: str, value: Secret) -> str:
        conn = self._connection()
        secret = self._secret(usage, secret_type)
        try:
            if secret is None:
                ephemeral = "yes" if secret_type == "volume" else "no"  # noqa: S105 - a usage type
                root = etree.Element("secret", ephemeral=ephemeral, private="yes")
                etree.SubElement(root, "description").text = "blockwire attachment credential"
                usage_el = etree.SubElement(root, "usage", type=secret_type)
                etree.SubElement(usage_el, _USAGE_TAG[secret_type]).text = usage
                secret = conn.secretDefineXML(etree.tostring(root, encoding="unicode"))
            # a ceph secret holds the key's bytes (libvirt gives QEMU their base64, which librados reads)
            raw = base64.b64decode(value.reveal()) if secret_type == "ceph" else value.reveal().encode()  # noqa: S105
            secret.setValue(raw)
            return str(secret.UUIDString())
        except libvirt.libvirtError as exc:
            _raise(exc, f"defining secret {usage!r}")

    def undefine_secret(self, usage: str, secret_type: str) -> bool:
        secret = self._secret(usage, secret_type)
        if secret is None:
            return False
        try:
            secret.undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return False
            _raise(exc, f"removing secret {usage!r}")
        return True

    def secret_exists(self, usage: str, secret_type: str) -> bool:
        return self._secret(usage, secret_type) is not None

    def unused_secrets(self, prefix: str, secret_type: str) -> list[str]:
        """Usage ids of secrets of `secret_type` under `prefix` that no domain's XML (live or persistent)
        refers to: what a crash between defining a secret and hot-plugging its disk could leave."""
        conn = self._connection()
        try:
            uuids = {
                str(s.usageID()): str(s.UUIDString())
                for s in conn.listAllSecrets(0)
                if s.usageType() == _SECRET_USAGE[secret_type] and str(s.usageID() or "").startswith(prefix)
            }
            used: set[str] = set()
            used_uuids: set[str] = set()
            for dom in conn.listAllDomains(0):
                xmls = [self._xml(dom)]
                if dom.isPersistent():
                    xmls.append(self._xml(dom, inactive=True))
                for xml in xmls:
                    root = etree.fromstring(xml.encode())
                    used.update(e.get("usage", "") for e in root.iterfind("devices/disk/source/auth/secret"))
                    for path in ("devices/disk/encryption/secret", "devices/disk/source/encryption/secret"):
                        used_uuids.update(e.get("uuid", "") for e in root.iterfind(path))
        except libvirt.libvirtError as exc:
            _raise(exc, "listing secrets and domains")
        return sorted(u for u, uuid in uuids.items() if u not in used and uuid not in used_uuids)


def _disk_elements(domain_xml: str) -> dict[str, etree._Element]:
    root = etree.fromstring(domain_xml.encode())
    found: dict[str, etree._Element] = {}
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            found[target.get("dev", "")] = disk
    return found
