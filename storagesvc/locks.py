"""Per-volume (and per-name) locks of the storage service (STYLE.md rule 8): calls on one volume are
serialized, calls on different volumes run in parallel."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from blockwire.errors import Aborted


class KeyedLocks:
    """One lock per key (volume id, or a name being created), made on first use and dropped when
    nobody holds or waits for it, so ids that callers make up (random, or of volumes that do not exist)
    leave nothing behind. A caller waits up to `timeout` seconds, then gets ABORTED."""

    def __init__(self, timeout: float) -> None:
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

    @contextlib.contextmanager
    def hold(self, key: str, what: str) -> Iterator[None]:
        lock = self._ref(key)
        try:
            if not lock.acquire(timeout=self.timeout):
                raise Aborted(f"another call on {what} is in flight; retry with backoff")
            try:
                yield
            finally:
                lock.release()
        finally:
            self._unref(key)
