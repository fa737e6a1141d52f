"""What the service measures and reports: per-operation counts and latencies (`Stats`), the capacity of
each backend and the per-backend statistics of GetBackendStats."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from blockwire.errors import BlockwireError, NotFound
from blockwire.runtime.clock import Clock
from storagesvc.model import BackendStats, Capacity, OperationStats

if TYPE_CHECKING:
    from storagesvc.backends.base import Backend
    from storagesvc.context import Context


class Stats:
    """Per-operation counts and latencies (the last `window` samples) since the service started."""

    def __init__(self, clock: Clock, window: int = 2048) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._samples: dict[str, collections.deque[float]] = {}
        self._counts: dict[str, list[int]] = {}
        self.window = window

    @contextlib.contextmanager
    def measure(self, operation: str) -> Iterator[None]:
        start = self.clock.monotonic()
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            elapsed = self.clock.monotonic() - start
            with self._lock:
                counts = self._counts.setdefault(operation, [0, 0])
                counts[0] += 1
                counts[1] += failed
                self._samples.setdefault(operation, collections.deque(maxlen=self.window)).append(elapsed)

    def snapshot(self) -> list[OperationStats]:
        with self._lock:
            out = []
            for op in sorted(self._counts):
                samples = sorted(self._samples[op])
                out.append(
                    OperationStats(
                        operation=op,
                        count=self._counts[op][0],
                        errors=self._counts[op][1],
                        p50_micros=int(percentile(samples, 50) * 1e6),
                        p95_micros=int(percentile(samples, 95) * 1e6),
                    )
                )
            return out


def percentile(sorted_samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted samples; 0 for none."""
    if not sorted_samples:
        return 0.0
    rank = max(1, -(-len(sorted_samples) * p // 100))
    return sorted_samples[int(rank) - 1]


def capacity(ctx: Context, backend: str = "") -> list[Capacity]:
    if backend and backend not in ctx.pools:
        raise NotFound(f"backend {backend} does not exist (have: {', '.join(ctx.pools)})")
    out = []
    for name in [backend] if backend else list(ctx.pools):
        b = ctx.pools[name].backend
        space = b.space()
        _, _, provisioned = ctx.catalog.backend_counts(name)
        out.append(
            Capacity(name, space.total_bytes, space.free_bytes, provisioned, b.max_volume_bytes(provisioned))
        )
    return out


def _reachable(backend: Backend) -> bool:
    """Whether a backend without an exporter (rbd) answers: its storage is what hosts reach."""
    try:
        backend.space()
    except BlockwireError:
        return False
    return True


def backend_stats(ctx: Context) -> tuple[list[BackendStats], list[OperationStats]]:
    out = []
    exports = collections.Counter(v.backend for v in ctx.all_volumes() if v.export is not None)
    health: dict[int, bool] = {}
    for name, pool in ctx.pools.items():
        vols, snaps, _ = ctx.catalog.backend_counts(name)
        exporter = pool.exporter
        key = id(exporter if exporter is not None else pool.backend)
        if key not in health:
            health[key] = exporter.healthy() if exporter is not None else _reachable(pool.backend)
        out.append(
            BackendStats(
                backend=name,
                kind=pool.backend.kind,
                exporter=exporter.kind if exporter is not None else "",
                volume_count=vols,
                snapshot_count=snaps,
                export_count=exports[name],
                portals=exporter.portals if exporter is not None else (),
                healthy=health[key],
            )
        )
    return out, ctx.stats.snapshot()
