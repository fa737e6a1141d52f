"""Failpoints: named places in the daemons where a crash (or an error) can be injected, for recovery tests.

A `Failpoints` object is injected into the code that has them (`HostAgent`, the storage service's
`Context`, `TgtExporter`); the default is `NO_FAILPOINTS`, which never fires. The daemons build theirs
from the environment variable ``BLOCKWIRE_FAILPOINTS`` at start (`Failpoints.from_environment`), never
from a config file:

    BLOCKWIRE_FAILPOINTS="agent.attach.after_journal=kill"
    BLOCKWIRE_FAILPOINTS="storage.export.after_target=kill,agent.detach.after_unplug=raise"

Actions: ``kill`` sends SIGKILL to this process (what a power cut or OOM kill does: no cleanup, no
atexit, no finally); ``raise`` raises `FailpointHit` (an exception no code expects, for unit tests).
``ACTION@N`` fires on the N-th hit only (``kill@2``).

`hit(name)` is a dictionary truth test when nothing is armed: it costs nothing in production. The
names are constants next to the code that calls `hit` (hostagent/api.py, storagesvc/exports.py,
storagesvc/targets/tgt.py), so tests import them instead of spelling strings. Nothing is process-wide:
two agents in one process (a test, an embedder) have their own.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

log = logging.getLogger(__name__)

ENV = "BLOCKWIRE_FAILPOINTS"
ACTIONS = ("kill", "raise")


class FailpointHit(Exception):
    """Raised by a failpoint armed with ``raise``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"failpoint {name}")
        self.name = name


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """ "a=kill,b=raise@2" -> {"a": ("kill", 0), "b": ("raise", 2)}; ValueError on a malformed entry."""
    armed: dict[str, tuple[str, int]] = {}
    for raw in spec.replace(";", ",").split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, action = entry.partition("=")
        action, _, nth = action.partition("@")
        if not sep or not name.strip() or action not in ACTIONS or (nth and not nth.isdigit()):
            raise ValueError(f"{ENV}: {entry!r} is not NAME=kill|raise[@N]")
        armed[name.strip()] = (action, int(nth) if nth else 0)
    return armed


class Failpoints:
    """Armed failpoints (name -> (action, N)) and their hit counts. Thread-safe."""

    def __init__(self, spec: str | Mapping[str, str] = "") -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, tuple[str, int]] = {}
        self._hits: dict[str, int] = {}
        if spec:
            self.arm(spec)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Failpoints:
        """What a daemon arms at start: `ENV` of its environment (ValueError when malformed)."""
        points = cls(environ.get(ENV, ""))
        if points._armed:
            log.warning("failpoints armed from %s: %s", ENV, ", ".join(sorted(points._armed)))
        return points

    def arm(self, spec: str | Mapping[str, str]) -> None:
        """Arms failpoints (replacing any armed before)."""
        text = spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in spec.items())
        parsed = parse(text)
        with self._lock:
            self._armed = parsed
            self._hits = {}

    def disarm(self) -> None:
        with self._lock:
            self._armed = {}
            self._hits = {}

    @contextmanager
    def armed(self, spec: str | Mapping[str, str]) -> Iterator[None]:
        """Arms for the duration of a block (unit tests)."""
        self.arm(spec)
        try:
            yield
        finally:
            self.disarm()

    def hit(self, name: str) -> None:
        """Fires the failpoint `name` when it is armed; otherwise does nothing."""
        if not self._armed:
            return
        with self._lock:
            entry = self._armed.get(name)
            if entry is None:
                return
            count = self._hits[name] = self._hits.get(name, 0) + 1
        action, nth = entry
        if nth and count != nth:
            return
        log.warning("failpoint %s: %s", name, action)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise FailpointHit(name)


class _Never(Failpoints):
    def arm(self, spec: str | Mapping[str, str]) -> None:
        raise TypeError("NO_FAILPOINTS is shared by everything built without failpoints: arm your own")


NO_FAILPOINTS: Final[Failpoints] = _Never()
"""The default: never fires, and refuses to be armed (give the owner a `Failpoints()` of its own)."""
