"""Periodic: runs one check every `interval` seconds on a thread of its own, until stopped.

The thread waits on a stop event (`threading.Event.wait(interval)`), never sleeps: `stop()` wakes it at
once and joins it within a bound. The wait is injected (`waiter`) so that tests drive the loop without
real time; the check itself is a plain method the tests call directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Waits up to `seconds` for the event; True when it was set (stop).
Waiter = Callable[[threading.Event, float], bool]


def event_wait(stop: threading.Event, seconds: float) -> bool:
    return stop.wait(seconds)


class Periodic:
    def __init__(
        self, name: str, interval: float, check: Callable[[], object], *, waiter: Waiter = event_wait
    ) -> None:
        if interval < 0:
            raise ValueError("interval must be 0 (disabled) or positive")
        self.name = name
        self.interval = interval
        self._check = check
        self._wait = waiter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Starts the thread; an interval of 0 disables the check (nothing is started)."""
        if self.interval == 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._wait(self._stop, self.interval):
            try:
                self._check()
            except Exception:  # the supervisor must outlive any one failed round
                log.exception("%s: check failed; next one in %.1fs", self.name, self.interval)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stops the thread and waits up to `timeout` seconds for the round in progress; True when gone."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("%s: still finishing a check after %.1fs", self.name, timeout)
            return False
        return True
