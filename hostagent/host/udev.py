"""Waiting on udev (STYLE.md rule 4): a device is ready when udev says so, never after a fixed sleep.

Every wait follows the same order, so that no event can be missed:
1. subscribe to the process's event feed of the subsystem (source 'udev': events after udev's rules ran
   and its database is written),
2. run the trigger (the login, the scan, the map creation) if any,
3. look at what already exists (enumeration of the udev database),
4. wait for a matching event until the deadline.

One feed per (source, subsystem) and process: one netlink monitor and one thread that describes each
event once and hands it to every wait subscribed at that moment. A monitor per wait made N waits at once
(a boot storm, 32 volumes attached together) describe each of the N volumes' events N times: under load
that quadratic work, not the kernel or udev, was most of a batch's udev wait. A feed can hand a wait an
event that was already in its socket when the wait subscribed: an "add" that matches is therefore read
again from the device's current state before it is returned, and a removal counts only with a kernel
sequence number (SEQNUM) above the one at subscription (/sys/kernel/uevent_seqnum).

A removal is the exception: `wait_gone` listens to the kernel's own events (source 'kernel'). A device is
gone when the kernel removed it (its sysfs entry and its /dev node, which devtmpfs drops, are gone at
that event); udev's removal of its links comes after and cannot be overtaken: udev runs the events of
one device path in order, so a later device of the same name is processed only after it. Waiting for
udev's side of a removal made a batch of detaches queue behind udev's whole backlog (32 NVMe/TCP
namespaces at once under TCG: 17.9 s of udev wait per volume against the raw tools' sysfs check);
os-brick likewise waits for the kernel's removal (the /dev node gone), not for udev.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

from blockwire.errors import DeadlineExceeded, Unavailable
from blockwire.runtime.clock import Deadline

log = logging.getLogger(__name__)

_POLL_SLICE = 0.5  # seconds; only bounds how often the deadline is re-checked, events wake us at once


@dataclass(frozen=True)
class UdevDevice:
    """A device as udev describes it. `action` is "" for a device found by enumeration."""

    sys_name: str
    sys_path: str = ""
    subsystem: str = "block"
    device_node: str = ""
    action: str = ""
    properties: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    links: tuple[str, ...] = ()
    size_bytes: int | None = None

    @property
    def wwn(self) -> str:
        """The SCSI identity udev derived (ID_WWN_WITH_EXTENSION / ID_SERIAL), normalized by the caller."""
        return self.properties.get("ID_WWN_WITH_EXTENSION", "") or self.properties.get("ID_WWN", "")


Match = Callable[[UdevDevice], bool]


class UdevWaiter(Protocol):
    """What connectors are given to wait for devices."""

    def wait_for(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: Callable[[], None] | None = None,
        what: str = "device",
    ) -> UdevDevice:
        """The first device (existing or announced) that matches; DeadlineExceeded otherwise."""
        ...

    def wait_gone(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: Callable[[], None] | None = None,
        what: str = "device",
    ) -> None:
        """Returns once no device matches (each matching one was removed); DeadlineExceeded otherwise."""
        ...

    def find(self, subsystem: str, match: Match) -> list[UdevDevice]:
        """Devices that match now (no wait)."""
        ...


def _size(dev: Any) -> int | None:
    try:
        raw = dev.attributes.get("size")
    except (KeyError, OSError):
        return None
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return int(text.strip()) * 512 if text.strip().isdigit() else None


class _Properties(Mapping[str, str]):
    """A device's udev properties, read on first use. A wait describes every event of its subsystem and
    every device it enumerates (32 attaches at once: each of 32 waits sees the events of all 32 volumes),
    and most are told apart by name alone; copying each one's whole property list cost more than all
    the rest of the description. Read-only, like the copy it replaces."""

    __slots__ = ("_dev", "_read")

    def __init__(self, dev: Any) -> None:
        self._dev = dev
        self._read: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._read is None:
            self._read = dict(self._dev.properties)
        return self._read

    def __getitem__(self, key: str) -> str:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def _describe(dev: Any, action: str, *, copy: bool = False) -> UdevDevice:
    """`copy`: the properties copied now (a description other threads read), else read on first use."""
    return UdevDevice(
        sys_name=dev.sys_name,
        sys_path=dev.sys_path,
        subsystem=dev.subsystem or "",
        device_node=dev.device_node or "",
        action=action,
        properties=MappingProxyType(dict(dev.properties)) if copy else _Properties(dev),
        links=tuple(sorted(dev.device_links)),
        size_bytes=_size(dev) if action != "remove" else None,
    )


def _seqnum(dev: UdevDevice) -> int:
    raw = dev.properties.get("SEQNUM", "")
    return int(raw) if raw.isdigit() else 0


def _kernel_seqnum() -> int:
    """The sequence number of the kernel's last uevent (0 when it cannot be read)."""
    try:
        with open("/sys/kernel/uevent_seqnum") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class _Feed:
    """One netlink monitor of (source, subsystem) for the whole process and the thread that reads it:
    each event is described once (its properties copied: the description is shared between threads)
    and put into the queue of every wait subscribed when it is read."""

    def __init__(self, monitor: Any, name: str) -> None:
        self._monitor = monitor
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue[UdevDevice]] = []
        threading.Thread(target=self._run, name=name, daemon=True).start()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[queue.SimpleQueue[UdevDevice]]:
        q: queue.SimpleQueue[UdevDevice] = queue.SimpleQueue()
        with self._lock:
            self._queues.append(q)
        try:
            yield q
        finally:
            with self._lock:
                self._queues.remove(q)

    def _run(self) -> None:
        while True:
            try:
                dev = self._monitor.poll()
                if dev is None:
                    continue
                with self._lock:
                    queues = list(self._queues)
                if not queues:
                    continue
                desc = _describe(dev, dev.action or "", copy=True)
            except Exception:  # an event lost: the waits look at the real state again (their re-checks)
                log.exception("reading a udev event failed")
                continue
            for q in queues:
                q.put(desc)


def _next_event(events: queue.SimpleQueue[UdevDevice], deadline: Deadline) -> UdevDevice | None:
    """The next event, or None after at most _POLL_SLICE (so the caller re-checks its deadline)."""
    try:
        return events.get(timeout=min(_POLL_SLICE, max(deadline.remaining(), 0.001)))
    except queue.Empty:
        return None


class PyudevWaiter:
    """The real UdevWaiter: pyudev's netlink monitor and udev database."""

    def __init__(self) -> None:
        import pyudev  # noqa: PLC0415 - imported on first use: unit tests never need it

        self._pyudev = pyudev
        self._context = pyudev.Context()

        self._feeds: dict[tuple[str, str], _Feed] = {}
        self._feeds_lock = threading.Lock()

    @contextlib.contextmanager
    def _watching(
        self, subsystem: str, trigger: Callable[[], None] | None, source: str = "udev"
    ) -> Iterator[queue.SimpleQueue[UdevDevice]]:
        """Events of `subsystem` from now on, with `trigger` run only once subscribed (none is missed)."""
        with self._feed(subsystem, source).subscribe() as events:
            if trigger is not None:
                trigger()
            yield events

    def _feed(self, subsystem: str, source: str) -> _Feed:
        with self._feeds_lock:
            feed = self._feeds.get((source, subsystem))
            if feed is None:
                feed = _Feed(self._monitor(subsystem, source), f"udev-{source}-{subsystem}")
                self._feeds[(source, subsystem)] = feed
            return feed

    def _current(self, sys_path: str) -> UdevDevice | None:
        """The device at `sys_path` as it is now, if it is there and udev has processed it."""
        try:
            dev = self._pyudev.Devices.from_sys_path(self._context, sys_path)
        except self._pyudev.DeviceNotFoundError:
            return None
        return _describe(dev, "") if dev.is_initialized else None

    def _monitor(self, subsystem: str, source: str = "udev") -> Any:
        try:
            monitor = self._pyudev.Monitor.from_netlink(self._context, source=source)
            monitor.filter_by(subsystem=subsystem)
            monitor.start()
        except OSError as exc:
            raise Unavailable(
                f"cannot listen to udev events: {exc.strerror} (is systemd-udevd running?)"
            ) from exc
        return monitor

    def find(self, subsystem: str, match: Match, *, initialized: bool = True) -> list[UdevDevice]:
        found = []
        for dev in self._context.list_devices(subsystem=subsystem):
            if initialized and not dev.is_initialized:
                continue
            desc = _describe(dev, "")
            if match(desc):
                found.append(desc)
        return found

    def wait_for(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: Callable[[], None] | None = None,
        what: str = "device",
    ) -> UdevDevice:
        with self._watching(subsystem, trigger) as events:
            existing = self.find(subsystem, match)
            if existing:
                log.debug("%s already present: %s", what, existing[0].sys_name)
                return existing[0]
            while not deadline.expired():
                desc = _next_event(events, deadline)
                if desc is None or desc.action == "remove" or not match(desc):
                    continue
                now = self._current(desc.sys_path)  # not an older event of a device since gone
                if now is not None and match(now):
                    log.debug("%s appeared: %s %s", what, desc.action, now.sys_name)
                    return replace(now, action=desc.action)
        raise DeadlineExceeded(f"{what} did not appear within {deadline.seconds:g}s")

    def wait_gone(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: Callable[[], None] | None = None,
        what: str = "device",
    ) -> None:
        def present() -> set[str]:  # in sysfs, whether or not udev has processed it yet
            return {d.sys_path for d in self.find(subsystem, match, initialized=False)}

        with self._feed(subsystem, "kernel").subscribe() as events:
            after = _kernel_seqnum()  # a removal counts only if the kernel made it after this
            if trigger is not None:
                trigger()
            remaining = present()
            while remaining and not deadline.expired():
                dev = _next_event(events, deadline)
                if dev is not None and dev.action == "remove" and _seqnum(dev) > after:
                    remaining.discard(dev.sys_path)
                if dev is None:
                    # A device may have gone between enumeration and the monitor's first event.
                    remaining = present()
        if remaining:
            raise DeadlineExceeded(f"{what} was not removed within {deadline.seconds:g}s")
