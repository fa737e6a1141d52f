"""Several storage nodes: create + attach + detach + delete cycles over gRPC with 1 and with 3 storage nodes
on a PostgreSQL catalog, side by side in one run.

    sudo python bench/nodes_bench.py [--cycles 30] [--parallel 4] [--rounds 3] [--out bench/results]

Two clusters run at once on the same machine, each on its own PostgreSQL database of one throwaway
server (tests/postgres.py) and made with the host tier's rig (tests/host/nodes_rig.py: a daemon and a
tgtd per node, mutual TLS between nodes): "1 node" (node s alone) and "3 nodes" (a, b, c). Every cycle is
sent to the first node, cycle i naming backend file-<node i mod n>: on 3 nodes two cycles in three are on
another node, so their create, attach, detach and delete are forwarded over mutual TLS and exported by
that node's tgtd (the scheduler's placement is measured by bench/scheduler_bench.py). The
phases (sequential, then `parallel` threads) alternate between the clusters `rounds` times; the report
gives the median cycles/s of each and the ratio 3 nodes / 1 node. The cycle is bench/storage_bench.py's.
Writes bench/results/nodes-YYYY-MM-DD.{md,json} with the machine's facts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.storage_bench import cycle, machine, pct  # noqa: E402
from blockwire.v1 import storage_pb2_grpc  # noqa: E402
from tests.host.daemons import need_root  # noqa: E402
from tests.host.nodes_rig import running_nodes  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402

CLUSTERS = {"1 node": ("s",), "3 nodes": ("a", "b", "c")}


def phase(stub: Any, cluster: str, label: str, cycles: int, parallel: int, round_no: int) -> dict[str, Any]:
    """`cycles` cycles; cycle i names backend file-<node i mod n> (with n = 3, two in three run on
    another node than the one called: forwarded)."""
    nodes = CLUSTERS[cluster]
    timings: dict[str, list[float]] = {}
    lock = threading.Lock()
    tag = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(
            pool.map(
                lambda i: cycle(
                    stub,
                    f"{label.replace(' ', '-')}-{tag}-{i}",
                    timings,
                    lock,
                    f"file-{nodes[i % len(nodes)]}",
                ),
                range(cycles),
            )
        )
    wall = time.perf_counter() - t0
    return {
        "cluster": cluster,
        "phase": label,
        "round": round_no,
        "cycles": cycles,
        "parallel": parallel,
        "wall_s": round(wall, 3),
        "cycles_per_s": round(cycles / wall, 2),
        "p50_ms": {op: round(pct(v, 50) * 1000, 2) for op, v in timings.items()},
        "p95_ms": {op: round(pct(v, 95) * 1000, 2) for op, v in timings.items()},
    }


def summary(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label in dict.fromkeys(p["phase"] for p in phases):
        row: dict[str, Any] = {"phase": label}
        for cluster in CLUSTERS:
            runs = [p for p in phases if p["phase"] == label and p["cluster"] == cluster]
            row[cluster] = {
                "cycles_per_s": round(statistics.median(p["cycles_per_s"] for p in runs), 2),
                "p50_ms": {
                    op: round(statistics.median(p["p50_ms"][op] for p in runs), 2) for op in runs[0]["p50_ms"]
                },
            }
        row["ratio_3_to_1"] = round(row["3 nodes"]["cycles_per_s"] / row["1 node"]["cycles_per_s"], 2)
        out.append(row)
    return out


def report(results: dict[str, Any], out: Path) -> None:
    day = results["date"][:10]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"nodes-{day}.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        f"# Storage nodes: 1 vs 3 nodes ({results['date']})",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"Python {m['python']}, {m['tgt']}. Catalog: PostgreSQL ({results['postgres']}), one database "
        "per cluster. Each cycle: CreateVolume (64 MiB, file backend), CreateAttachment, DeleteAttachment, "
        "DeleteVolume, all sent to the first node, the backends named in turn: on 3 nodes 2/3 of the "
        "cycles are forwarded over mutual TLS.",
        "",
        f"{results['cycles']} cycles per phase, {results['rounds']} rounds alternating between the "
        "clusters; medians over the rounds.",
        "",
        "| phase | 1 node cycles/s | 3 nodes cycles/s | ratio 3/1 | p50 create 1 / 3 (ms) | "
        "p50 attach 1 / 3 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        one, three = row["1 node"], row["3 nodes"]
        lines.append(
            f"| {row['phase']} | {one['cycles_per_s']} | {three['cycles_per_s']} | {row['ratio_3_to_1']} | "
            f"{one['p50_ms']['CreateVolume']} / {three['p50_ms']['CreateVolume']} | "
            f"{one['p50_ms']['CreateAttachment']} / {three['p50_ms']['CreateAttachment']} |"
        )
    lines += [
        "",
        "Reading: here all nodes share the machine's cores, so 3 nodes add no capacity; the ratio is the "
        "cost of forwarding (one more gRPC hop over mutual TLS for 2/3 of the cycles). "
        "On separate machines each node's tgtd and backend work would run in parallel.",
    ]
    (out / f"nodes-{day}.md").write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def cluster(work: Path, names: tuple[str, ...], pg: PostgresServer) -> Iterator[Any]:
    prefix = f"iqn.2026-01.io.blockwire.nb{uuid.uuid4().hex[:8]}"
    with running_nodes(work, names, prefix, pg, pg.create_database(), 1.0, 10.0) as (_, daemons):
        yield storage_pb2_grpc.StorageServiceStub(daemons[names[0]].channel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    need_root()
    pg = PostgresServer().start()
    phases: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bw-nodes-bench-") as tmp, contextlib.ExitStack() as stack:
            stubs = {
                name: stack.enter_context(cluster(Path(tmp) / name.replace(" ", "-"), names, pg))
                for name, names in CLUSTERS.items()
            }
            for round_no in range(args.rounds):
                for label, parallel in (("sequential", 1), (f"parallel x{args.parallel}", args.parallel)):
                    for name, stub in stubs.items():
                        p = phase(stub, name, label, args.cycles, parallel, round_no)
                        print(json.dumps({k: p[k] for k in ("cluster", "phase", "round", "cycles_per_s")}))
                        phases.append(p)
    finally:
        pg.stop()
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "postgres": f"PostgreSQL {pg.bindir.parent.name}",
        "cycles": args.cycles,
        "rounds": args.rounds,
        "phases": phases,
        "summary": summary(phases),
    }
    report(results, args.out)
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
