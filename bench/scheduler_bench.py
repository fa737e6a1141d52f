"""Scheduler benchmark: the cost of `storagesvc.scheduler.rank` per create with many backends registered.

    python bench/scheduler_bench.py [--backends 1000] [--calls 200] [--rounds 5] [--out bench/results]

Cases, run side by side (interleaved, `rounds` times, so each sees the same machine load): 10, 100 and
`backends` candidates with no extra specs; `backends` candidates with four extra specs (a boolean, a
string choice, a number comparison and a substring); the same with the volume_count weigher; and a
request that only a tenth of the backends pass. Reports the median and p95 per call in milliseconds, and
the ratio of each case to the 10-backend one, and the median CPU time of the calling thread (what a call
costs when the machine is shared: wall time includes waiting for a core). The goal (issue 16) is
< 5 ms per create at 1,000 backends.
Writes bench/results/scheduler-YYYY-MM-DD.{md,json} with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.facts import host_facts  # noqa: E402
from storagesvc.scheduler import BackendState, PlacementRequest, rank  # noqa: E402

GIB = 1 << 30


def backends(n: int, seed: int = 16) -> list[BackendState]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        total = rng.randint(1, 100) * 100 * GIB
        thin = rng.random() < 0.8
        out.append(
            BackendState(
                node=f"node{i % 10}",
                backend=f"backend{i:05d}",
                total_bytes=total,
                free_bytes=rng.randint(0, total),
                provisioned_bytes=rng.randint(0, total * 2),
                volume_count=rng.randint(0, 500),
                capabilities={
                    "thin_provisioning": "true" if thin else "false",
                    "multiattach": "true",
                    "encryption": "true" if rng.random() < 0.9 else "false",
                    "transport": rng.choice(["iscsi", "nvme-tcp", "rbd"]),
                    "kind": rng.choice(["file", "lvm-thin", "rbd"]),
                    "tier": rng.choice(["gold-ssd", "silver-ssd", "bronze-hdd"]),
                    "max_iops": str(rng.choice([1000, 5000, 20000, 100000])),
                },
                availability_zone=f"az{i % 3}",
                up=rng.random() < 0.97,
                max_over_subscription_ratio=rng.choice([1.0, 2.0, 4.0]),
            )
        )
    return out


SPECS = {
    "encryption": "<is> True",
    "capabilities:transport": "<or> iscsi <or> nvme-tcp",
    "capabilities:max_iops": ">= 5000",
    "capabilities:tier": "<in> ssd",
}


def cases(n: int) -> dict[str, Callable[[], list[BackendState]]]:
    small, medium, large = backends(10), backends(100), backends(n)
    plain = PlacementRequest(size_bytes=10 * GIB, extra_specs={})
    specs = PlacementRequest(size_bytes=10 * GIB, extra_specs=SPECS)
    narrow = PlacementRequest(
        size_bytes=10 * GIB, extra_specs={"capabilities:tier": "s== gold-ssd"}, availability_zone="az1"
    )
    return {
        "10 backends, no specs": lambda: rank(small, plain),
        "100 backends, no specs": lambda: rank(medium, plain),
        f"{n} backends, no specs": lambda: rank(large, plain),
        f"{n} backends, 4 specs": lambda: rank(large, specs),
        f"{n} backends, 4 specs, volume_count weigher": lambda: rank(large, specs, weigher="volume_count"),
        f"{n} backends, zone + tier (about 1 in 9 pass)": lambda: rank(large, narrow),
    }


def run(n: int, calls: int, rounds: int) -> dict[str, Any]:
    todo = cases(n)
    samples: dict[str, list[float]] = {name: [] for name in todo}
    cpu: dict[str, list[float]] = {
        name: [] for name in todo
    }  # this thread's CPU time: the cost without the wait
    passed: dict[str, int] = {}
    for r in range(rounds):
        order = list(todo) if r % 2 == 0 else list(reversed(todo))
        for name in order:
            fn = todo[name]
            passed[name] = len(fn())  # warm up, and how many pass
            for _ in range(calls):
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                samples[name].append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
    base = statistics.median(samples["10 backends, no specs"])
    out = {}
    for name, s in samples.items():
        s.sort()
        med = statistics.median(s)
        out[name] = {
            "calls": len(s),
            "passed": passed[name],
            "median_ms": round(med * 1000, 4),
            "p95_ms": round(s[int(len(s) * 0.95) - 1] * 1000, 4),
            "cpu_median_ms": round(statistics.median(cpu[name]) * 1000, 4),
            "ratio_to_10": round(med / base, 1),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    facts = host_facts()
    results = run(args.backends, args.calls, args.rounds)
    facts["load_after"] = list(os.getloadavg())
    now = datetime.now(UTC)
    doc = {"date": now.isoformat(timespec="seconds"), "machine": facts, "goal_ms": 5.0, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scheduler-{now.date().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"# Scheduler rank() cost per create ({now.date().isoformat()})",
        "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, kernel {facts['kernel']}, "
        f"Python {facts['python']}; load {facts['load_before'][0]:.2f} before, "
        f"{facts['load_after'][0]:.2f} after.",
        f"{args.rounds} rounds x {args.calls} calls per case, interleaved. Goal: < 5 ms per create.",
        "",
        "| case | passing backends | median ms | p95 ms | CPU median ms | x 10 backends |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['passed']} | {r['median_ms']} | {r['p95_ms']} | {r['cpu_median_ms']} "
            f"| {r['ratio_to_10']} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
