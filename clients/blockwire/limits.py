"""How many calls a daemon's gRPC server runs at once: the `[limits]` table of both daemons' configs.

Calls come in three classes, each with its own bound (`blockwire.server.serving` enforces them):

* **stream**: server streams (WatchEvents, WatchVolume; also Health/Watch and reflection). An idle
  stream holds a thread for as long as its client keeps it open.
* **long**: the calls that do real work and may wait for a long time (attach, detach, extend, connect,
  disconnect on the agent; volume, snapshot and export work on storage). Each daemon names its own.
* **quick**: every other call (gets, lists, GetConnector, CompleteAttachment ...).

Past its class's bound a call is refused at once with RESOURCE_EXHAUSTED, whose message names the bound
and its value, and whose trailing metadata `LIMIT_METADATA` carries the bound's key: nothing queues, and
one class can never take the threads another needs. The server has `threads` threads (the three bounds
plus `RESERVE`) and never takes more calls in flight than that (gRPC's maximum_concurrent_rpcs), so an
admitted call always has a thread and grpc.health.v1 Health/Check, which no class bound refuses, always
finds one. Grpc-free, so that the daemons' config modules can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

from blockwire.errors import InvalidArgument

RESERVE: Final = 8
"""Threads beyond the class bounds: for Health/Check and for answering refused calls."""

MAX_BOUND: Final = 1024
"""The largest value a bound may have (each admitted call may hold a thread)."""

LIMIT_METADATA: Final = "blockwire-limit"
"""Trailing metadata key of a refusal by a class bound; the value is the bound's key ("max_streams")."""

GRPC_LIMIT_DETAILS: Final = "Concurrent RPC limit exceeded!"
"""What gRPC itself answers past maximum_concurrent_rpcs (the final guard, `Limits.threads`)."""


@dataclass(frozen=True)
class Limits:
    """[limits]: bounds of concurrent calls per class. The defaults take the attach benchmark's 32
    concurrent attaches (plus a progress stream each) with room to spare."""

    max_streams: int = 64
    max_long_calls: int = 64
    max_quick_calls: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BOUND:
                raise InvalidArgument(f"limits.{f.name}", f"a number of calls from 1 to {MAX_BOUND}")

    @property
    def threads(self) -> int:
        """Threads of the server, and its bound of calls in flight: the class bounds plus `RESERVE`."""
        return self.max_streams + self.max_long_calls + self.max_quick_calls + RESERVE
