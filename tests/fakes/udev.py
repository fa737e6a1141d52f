"""FakeUdev: a scripted udev. Devices exist in `present`; a trigger may add or remove some (`on_trigger`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from blockwire.errors import DeadlineExceeded
from blockwire.runtime.clock import Deadline
from hostagent.host.udev import Match, UdevDevice


@dataclass
class FakeUdev:
    present: dict[str, list[UdevDevice]] = field(default_factory=dict)
    # Called after a trigger ran: may change `present` (the kernel and udev reacting to it).
    on_trigger: list[Callable[[FakeUdev], None]] = field(default_factory=list)
    waits: list[str] = field(default_factory=list)
    # One wait at a time: the kernel's reaction to a trigger is atomic in this fake.
    lock: threading.RLock = field(default_factory=threading.RLock)

    def add(self, dev: UdevDevice) -> None:
        self.present.setdefault(dev.subsystem, []).append(dev)

    def remove(self, sys_name: str) -> None:
        for devs in self.present.values():
            devs[:] = [d for d in devs if d.sys_name != sys_name]

    def _after(self, trigger: Callable[[], None] | None) -> None:
        if trigger is not None:
            trigger()
            for react in list(self.on_trigger):
                react(self)

    def find(self, subsystem: str, match: Match) -> list[UdevDevice]:
        return [d for d in self.present.get(subsystem, []) if match(d)]

    def wait_for(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: Callable[[], None] | None = None,
        what: str = "device",
    ) -> UdevDevice:
        with self.lock:
            self.waits.append(what)
            self._after(trigger)
            found = self.find(subsystem, match)
        if not found:
            deadline.clock.sleep(deadline.remaining())  # a FakeClock: time passes, nothing came
            raise DeadlineExceeded(f"{what} did not appear within {deadline.seconds:g}s")
        return found[0]

    def wait_gone(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: Callable[[], None] | None = None,
        what: str = "device",
    ) -> None:
        with self.lock:
            self.waits.append(f"gone:{what}")
            self._after(trigger)
            left = self.find(subsystem, match)
        if left:
            raise DeadlineExceeded(f"{what} was not removed within {deadline.seconds:g}s")
