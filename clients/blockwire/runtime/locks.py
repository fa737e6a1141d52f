"""Narrow locks (STYLE.md rule 8): one per key (a volume, a target, a domain), never one for the whole
host or service. One class for both daemons.

A key's lock is made on first use and dropped when nobody holds or waits for it, so keys that callers
make up (random ids, ids of volumes that do not exist) leave nothing behind. Three ways to take one:

* `hold(key)`: waits, up to the `timeout` given at construction (then ABORTED naming `what`), or for as
  long as it takes when there is none;
* `hold_or_abort(key, what)`: ABORTED at once when another call holds it (the agent's rule: a second
  call on a volume in flight is refused, the caller retries with backoff).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from blockwire.errors import Aborted


class KeyedLocks:
    """A lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, holders + waiters)

    def __len__(self) -> int:
        """Keys held or waited for now."""
        with self._guard:
            return len(self._locks)

    def _ref(self, key: str) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
            return lock

    def _unref(self, key: str) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    @contextmanager
    def _held(self, key: str, what: str, *, blocking: bool, timeout: float) -> Iterator[None]:
        lock = self._ref(key)
        try:
            if not lock.acquire(blocking=blocking, timeout=timeout):
                raise Aborted(f"another call on {what or key} is in flight; retry with backoff")
            try:
                yield
            finally:
                lock.release()
        finally:
            self._unref(key)

    def hold(self, key: str, what: str = "") -> AbstractContextManager[None]:
        """Waits for the key's lock: up to `timeout` seconds, then Aborted; with no timeout, until free."""
        return self._held(key, what, blocking=True, timeout=-1 if self.timeout is None else self.timeout)

    def hold_or_abort(self, key: str, what: str) -> AbstractContextManager[None]:
        """Takes the key's lock or raises Aborted at once when another call holds it."""
        return self._held(key, what, blocking=False, timeout=-1)
