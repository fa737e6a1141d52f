"""What every benchmark records beside its numbers: the machine it ran on, and the percentiles it reports.

Results are only comparable as ratios taken in one run; the machine facts (CPU, cores, memory, kernel,
the load average before the run) say how far the absolute times can be trusted.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any


def pct(values: list[float], p: float) -> float:
    """The p-th percentile, linear between the closest ranks (0.0 for no values)."""
    s = sorted(values)
    if not s:
        return 0.0
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def host_facts(**extra: Any) -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python and the load average now; `extra` (tool versions) added."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    mem_kb = next(
        int(ln.split()[1])
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal")
    )
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        **extra,
    }


def stats(seconds: list[float]) -> dict[str, float]:
    """Count, p50/p95/p99, min and max, in milliseconds, of durations in seconds."""
    ms = [v * 1000 for v in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 1),
        "p95_ms": round(pct(ms, 95), 1),
        "p99_ms": round(pct(ms, 99), 1),
        "min_ms": round(min(ms), 1) if ms else 0.0,
        "max_ms": round(max(ms), 1) if ms else 0.0,
    }


def summary(seconds: list[float], pcts: tuple[int, ...] = (50, 95)) -> dict[str, float]:
    """Count, the given percentiles (keys pNN) and max of durations, in seconds to the millisecond."""
    return {
        "n": len(seconds),
        **{f"p{p}": round(pct(seconds, p), 3) for p in pcts},
        "max": round(max(seconds), 3) if seconds else 0.0,
    }


def unplug_disk(dom: Any, xml: str, marker: str, what: str, timeout: float, poll: float = 0.002) -> None:
    """A raw caller's unplug: libvirt's detachDeviceFlags (live), then the live XML read until `marker`
    (the disk's serial or source) is gone from it; RuntimeError naming `what` after `timeout` seconds."""
    import libvirt  # noqa: PLC0415 - only the benchmarks that hot-plug need it

    dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    deadline = time.monotonic() + timeout
    while marker in dom.XMLDesc(0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: still there after {timeout:g}s")
        time.sleep(poll)
