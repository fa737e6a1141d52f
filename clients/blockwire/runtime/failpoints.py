"""Failpoints: named places in the daemons where a crash (or an error) can be injected, for recovery tests.

Armed ONLY by the environment variable ``BLOCKWIRE_FAILPOINTS``, read once when this module is first
imported (at daemon start), never by a config file:

    BLOCKWIRE_FAILPOINTS="agent.attach.after_journal=kill"
    BLOCKWIRE_FAILPOINTS="storage.export.after_target=kill,agent.detach.after_unplug=raise"

Actions: ``kill`` sends SIGKILL to this process (what a power cut or OOM kill does: no cleanup, no
atexit, no finally); ``raise`` raises `FailpointHit` (an exception no code expects, for unit tests).
``ACTION@N`` fires on the N-th hit only (``kill@2``).

`hit(name)` is a dictionary truth test when nothing is armed: it costs nothing in production. The
names are constants next to the code that calls `hit` (hostagent/api.py, storagesvc/service.py,
storagesvc/targets/tgt.py), so tests import them instead of spelling strings.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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


_lock = threading.Lock()
_armed: dict[str, tuple[str, int]] = {}
_hits: dict[str, int] = {}


def arm(spec: str | Mapping[str, str]) -> None:
    """Arms failpoints (replacing any armed before). The daemons never call this; tests may."""
    text = spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in spec.items())
    parsed = parse(text)
    with _lock:
        _armed.clear()
        _armed.update(parsed)
        _hits.clear()


def disarm() -> None:
    with _lock:
        _armed.clear()
        _hits.clear()


@contextmanager
def armed(spec: str | Mapping[str, str]) -> Iterator[None]:
    """Arms for the duration of a block (unit tests)."""
    arm(spec)
    try:
        yield
    finally:
        disarm()


def hit(name: str) -> None:
    """Fires the failpoint `name` when it is armed; otherwise does nothing."""
    if not _armed:
        return
    with _lock:
        entry = _armed.get(name)
        if entry is None:
            return
        count = _hits[name] = _hits.get(name, 0) + 1
    action, nth = entry
    if nth and count != nth:
        return
    log.warning("failpoint %s: %s", name, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FailpointHit(name)


def _from_environment() -> None:
    spec = os.environ.get(ENV, "")
    if spec:
        arm(spec)
        log.warning("failpoints armed from %s: %s", ENV, ", ".join(sorted(_armed)))


_from_environment()
