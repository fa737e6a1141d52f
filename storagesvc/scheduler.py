"""Placement of a new volume: which backends may take it, best first.

This is the minimal scheduler of the multi-node service (filters: node up, explicit backend,
availability zone, capacity with the over-subscription ratio, capabilities against extra specs;
weighers: most room in whole GiB (so backends on the same filesystem, whose free bytes differ by a few
blocks from one heartbeat to the next, count as equal), then fewest volumes, then name). `rank` is
deterministic: the same candidates and request give the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from blockwire.errors import FailedPrecondition, ResourceExhausted

GIB = 1 << 30


@dataclass(frozen=True)
class BackendState:
    """One backend as the scheduler sees it."""

    node: str  # storage node name ("" on a single-node service)
    backend: str  # backend name (unique across the cluster)
    total_bytes: int
    free_bytes: int
    provisioned_bytes: int
    volume_count: int
    capabilities: Mapping[str, str] = field(hash=False)
    availability_zone: str
    up: bool
    max_over_subscription_ratio: float = 1.0


@dataclass(frozen=True)
class PlacementRequest:
    size_bytes: int
    extra_specs: Mapping[str, str] = field(hash=False)  # from the volume type ("" type: {})
    availability_zone: str = ""  # "" = any
    backend: str = ""  # an explicit backend ("" = scheduler picks)


def headroom(b: BackendState) -> int:
    """Bytes a backend may still provision: its total times its over-subscription ratio, less what it
    has provisioned, bounded by what is physically free times the ratio."""
    ratio = max(b.max_over_subscription_ratio, 1.0)
    return max(0, min(int(b.total_bytes * ratio) - b.provisioned_bytes, int(b.free_bytes * ratio)))


def rank(candidates: Sequence[BackendState], request: PlacementRequest) -> list[BackendState]:
    """The backends that pass every filter, best first; deterministic for the same input.
    Raises ResourceExhausted / FailedPrecondition (blockwire.errors) naming why none passed."""
    pool = [b for b in candidates if not request.backend or b.backend == request.backend]
    if not pool:
        raise FailedPrecondition(f"no backend {request.backend!r} is registered")
    why: list[str] = []
    passed: list[BackendState] = []
    short = False
    for b in pool:
        if not b.up:
            why.append(f"{b.backend}: node {b.node} is down")
        elif request.availability_zone and b.availability_zone != request.availability_zone:
            why.append(f"{b.backend}: in zone {b.availability_zone!r}, not {request.availability_zone!r}")
        elif missing := [k for k, v in request.extra_specs.items() if b.capabilities.get(k) != v]:
            why.append(f"{b.backend}: lacks {', '.join(sorted(missing))}")
        elif headroom(b) < request.size_bytes:
            short = True
            why.append(f"{b.backend}: {headroom(b)} bytes of room")
        else:
            passed.append(b)
    if not passed:
        message = f"no backend can take {request.size_bytes} bytes: " + "; ".join(why)
        raise ResourceExhausted(message) if short else FailedPrecondition(message)
    return sorted(passed, key=lambda b: (-(headroom(b) // GIB), b.volume_count, b.backend))
