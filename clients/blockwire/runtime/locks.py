"""Narrow locks (STYLE.md rule 8): one per key (a volume, a target), never one for the whole host."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from blockwire.errors import Aborted


class KeyedLocks:
    """A lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def _ref(self, key: str) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
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
    def hold(self, key: str) -> Iterator[None]:
        """Waits for the key's lock."""
        lock = self._ref(key)
        try:
            with lock:
                yield
        finally:
            self._unref(key)

    @contextmanager
    def hold_or_abort(self, key: str, what: str) -> Iterator[None]:
        """Takes the key's lock or raises Aborted at once when another call holds it."""
        lock = self._ref(key)
        try:
            if not lock.acquire(blocking=False):
                raise Aborted(f"another call on {what} is in flight; retry with backoff")
            try:
                yield
            finally:
                lock.release()
        finally:
            self._unref(key)
