"""Storage service benchmark: create + attach + detach + delete cycles over gRPC against the real
`blockwire-storage` daemon and a real tgtd of its own (free control port, loopback portals).

    sudo python bench/storage_bench.py [--cycles 50] [--parallel 4] [--synchronous normal,full]
                                       [--rounds 3] [--out bench/results] [--tag NAME]
    sudo python bench/storage_bench.py --synchronous full,postgresql --tag catalogs

"postgresql" among the modes: a daemon with `[catalog] kind = "postgresql"` on a throwaway PostgreSQL
server (tests/postgres.py, fsync on, its data next to the SQLite catalogs), side by side with the SQLite
ones.

Runs `cycles` cycles one after another, then `cycles` cycles spread over `parallel` threads (different
volumes, so they may proceed in parallel). With several `--synchronous` modes (the catalog's SQLite
PRAGMA synchronous, `[service] catalog_synchronous`), one daemon per mode runs on the same tgtd and the
phases alternate between them, `rounds` times, so that both see the same machine load; the report
compares them by the median over the rounds. Reports ops/s and p50/p95 per RPC and per cycle, and how much
of the time tgtadm took: the daemon runs with DEBUG logs, where the Executor logs every command with its
duration; the bench sums the tgtadm ones inside each phase and compares them with the phase's wall time
(with parallel threads, tgtadm seconds can exceed wall seconds). Writes
bench/results/storage-YYYY-MM-DD.{md,json} with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockwire.v1 import storage_pb2 as spb  # noqa: E402
from blockwire.v1 import storage_pb2_grpc  # noqa: E402
from blockwire.v1 import types_pb2 as pb  # noqa: E402
from tests.host.daemons import Tgtd, free_port, free_tgt_control_port, need_root  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.rig import Daemon  # noqa: E402

MODES = ("normal", "full", "postgresql")  # SQLite synchronous = normal / full; the PostgreSQL catalog

MIB = 1 << 20
RAN = re.compile(r'logger=blockwire\.runtime\.executor msg="ran \((.*?)\) -> \d+ in ([0-9.]+)s"')
TS = re.compile(r"^ts=(\S+) ")


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))] if s else 0.0


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    tgt = subprocess.run(["tgtd", "-V"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "cpu": cpu,
        "python": platform.python_version(),
        "tgt": tgt,
    }


class Storage:
    """blockwire-storage (tests.rig's Daemon) with a SQLite catalog in the given synchronous mode, or
    (synchronous = "postgresql") a PostgreSQL one."""

    def __init__(
        self, tmp: Path, tgtd: Tgtd, synchronous: str = "full", postgres: PostgresServer | None = None
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.synchronous = synchronous
        self.prefix = f"iqn.2026-01.io.blockwire.bench{uuid.uuid4().hex[:8]}"
        self.socket = tmp / "storage.sock"
        portals = ", ".join(f'"{p}"' for p in tgtd.portals)
        self.config = tmp / "storage.toml"
        self.config.write_text(
            f'[server]\nunix_socket = "{self.socket}"\nlog_format = "kv"\nlog_level = "DEBUG"\n'
            f'[service]\ncatalog_path = "{tmp}/catalog.db"\niqn_prefix = "{self.prefix}"\n'
            + (
                f'[catalog]\nkind = "postgresql"\ndsn = "{postgres.create_database()}"\n'
                f'password_file = "{postgres.password_file}"\n'
                if postgres is not None
                else f'catalog_synchronous = "{synchronous}"\n'
            )
            + f'[[backends]]\nname = "file"\nkind = "file"\npath = "{tmp}/volumes"\nexporter = "tgt"\n'
            f"[exporters.tgt]\ncontrol_port = {tgtd.control_port}\nportals = [{portals}]\n"
        )
        self.daemon = Daemon.storage(self.config, self.socket, start_timeout=30, stop_timeout=30).start()
        self.stub = storage_pb2_grpc.StorageServiceStub(self.daemon.channel)

    def stop(self) -> None:
        self.daemon.stop()

    def tgtadm_seconds(self, start: datetime, end: datetime) -> tuple[float, int]:
        total, count = 0.0, 0
        for line in self.daemon.log.read_text().splitlines():
            m, t = RAN.search(line), TS.match(line)
            if m and t and "tgtadm" in m.group(1):
                at = datetime.fromisoformat(t.group(1))
                if start <= at <= end:
                    total += float(m.group(2))
                    count += 1
        return total, count


def cycle(
    stub: Any, name: str, timings: dict[str, list[float]], lock: threading.Lock, backend: str = ""
) -> float:
    connector = pb.Connector(host=f"h-{name}", initiator_iqn=f"iqn.2026-01.io.blockwire.bench:{name}")
    began = time.perf_counter()
    marks: list[tuple[str, float]] = []

    def timed(op: str, call: Any) -> Any:
        t = time.perf_counter()
        out = call()
        marks.append((op, time.perf_counter() - t))
        return out

    vol = timed(
        "CreateVolume",
        lambda: stub.CreateVolume(
            spb.CreateVolumeRequest(name=name, size_bytes=64 * MIB, backend=backend), timeout=60
        ),
    ).volume
    att = timed(
        "CreateAttachment",
        lambda: stub.CreateAttachment(
            spb.CreateAttachmentRequest(volume_id=vol.id, connector=connector), timeout=60
        ),
    ).attachment
    timed(
        "DeleteAttachment",
        lambda: stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=60),
    )
    timed("DeleteVolume", lambda: stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=60))
    total = time.perf_counter() - began
    with lock:
        for op, s in marks:
            timings.setdefault(op, []).append(s)
        timings.setdefault("cycle", []).append(total)
    return total


def phase(daemon: Storage, label: str, cycles: int, parallel: int, round_no: int = 0) -> dict[str, Any]:
    timings: dict[str, list[float]] = {}
    lock = threading.Lock()
    start = datetime.now(UTC)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(
            pool.map(
                lambda i: cycle(daemon.stub, f"{label}-{daemon.synchronous}-{round_no}-{i}", timings, lock),
                range(cycles),
            )
        )
    wall = time.perf_counter() - t0
    end = datetime.now(UTC)
    time.sleep(0.2)  # let the daemon's log lines reach the file before reading them
    tgtadm, calls = daemon.tgtadm_seconds(start, end)
    return {
        "phase": label,
        "synchronous": daemon.synchronous,
        "round": round_no,
        "cycles": cycles,
        "parallel": parallel,
        "wall_s": round(wall, 3),
        "cycles_per_s": round(cycles / wall, 2),
        "rpcs_per_s": round(4 * cycles / wall, 2),
        "tgtadm_calls": calls,
        "tgtadm_s": round(tgtadm, 3),
        "tgtadm_share_of_wall": round(tgtadm / wall, 3),
        "latency_ms": {
            op: {
                "p50": round(pct(v, 50) * 1000, 2),
                "p95": round(pct(v, 95) * 1000, 2),
                "mean": round(statistics.mean(v) * 1000, 2),
            }
            for op, v in timings.items()
        },
    }


def compare(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per phase and synchronous mode: the median over the rounds of cycles/s and of each RPC's p50."""
    out = []
    keys = list(dict.fromkeys((p["phase"], p["synchronous"]) for p in phases))  # in the order run
    keys.sort(key=lambda k: ([p["phase"] for p in phases].index(k[0]), k[1] != "normal"))
    for label, mode in keys:
        runs = [p for p in phases if p["phase"] == label and p["synchronous"] == mode]
        ops = sorted({op for p in runs for op in p["latency_ms"]})
        out.append(
            {
                "phase": label,
                "synchronous": mode,
                "rounds": len(runs),
                "cycles_per_s": round(statistics.median(p["cycles_per_s"] for p in runs), 2),
                "p50_ms": {
                    op: round(statistics.median(p["latency_ms"][op]["p50"] for p in runs), 2) for op in ops
                },
            }
        )
    return out


def catalog_label(mode: str) -> str:
    """How a report names a mode: "sqlite full", "sqlite normal", "postgresql"."""
    return mode if mode == "postgresql" else f"sqlite {mode}"


def report(results: dict[str, Any], out: Path, tag: str = "") -> None:
    day = results["date"][:10]
    name = f"storage-{tag}-{day}" if tag else f"storage-{day}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        f"# storagesvc benchmark, {day}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"Python {m['python']}, tgt {m['tgt']}, catalog on {m.get('catalog_fs', '?')}. Daemon "
        "`blockwire-storage` over a unix socket, file backend (64 MiB sparse files), tgt exporter with 2 "
        "loopback portals, CHAP, one ACL entry. A cycle is CreateVolume + CreateAttachment + "
        "DeleteAttachment + DeleteVolume."
        + (
            f" Load average at the end (other jobs share the machine): "
            f"{', '.join(f'{x:.1f}' for x in m['loadavg'])}."
            if m.get("loadavg")
            else ""
        ),
        "",
        "| phase | catalog | round | cycles | threads | wall s | cycles/s | RPCs/s "
        "| tgtadm calls | tgtadm s | tgtadm / wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["phases"]:
        lines.append(
            f"| {p['phase']} | {catalog_label(p.get('synchronous', 'normal'))} | {p.get('round', 0)} "
            f"| {p['cycles']} "
            f"| {p['parallel']} | {p['wall_s']} | {p['cycles_per_s']} | {p['rpcs_per_s']} "
            f"| {p['tgtadm_calls']} | {p['tgtadm_s']} | {p['tgtadm_share_of_wall']:.0%} |"
        )
    if results.get("comparison"):
        ops = sorted({op for c in results["comparison"] for op in c["p50_ms"]})
        lines += [
            "",
            "Catalogs side by side (median over the rounds; RPC columns are client-side p50 in ms):",
            "",
            "| phase | catalog | rounds | cycles/s | " + " | ".join(ops) + " |",
            "|---|---|---|---|" + "---|" * len(ops),
        ]
        for c in results["comparison"]:
            lines.append(
                f"| {c['phase']} | {catalog_label(c['synchronous'])} | {c['rounds']} | {c['cycles_per_s']} | "
                + " | ".join(str(c["p50_ms"].get(op, "")) for op in ops)
                + " |"
            )
    lines += [
        "",
        "Latency per RPC (ms, client side):",
        "",
        "| phase | catalog | round | RPC | p50 | p95 | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in results["phases"]:
        for op, v in p["latency_ms"].items():
            lines.append(
                f"| {p['phase']} | {catalog_label(p.get('synchronous', 'normal'))} "
                f"| {p.get('round', 0)} | {op} "
                f"| {v['p50']} | {v['p95']} | {v['mean']} |"
            )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding `path` (fsync costs differ: tmpfs has none)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount, fstype, *_ = line.split()
        if str(path.resolve()).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument(
        "--synchronous",
        default="normal,full",
        help="catalogs to compare, comma-separated: SQLite's PRAGMA synchronous modes (normal, full) "
        "and/or postgresql",
    )
    parser.add_argument("--tag", default="", help="results file name: storage-TAG-DATE.{md,json}")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the modes' phases")
    parser.add_argument(
        "--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the catalogs live"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    modes = [m.strip() for m in args.synchronous.split(",") if m.strip()]
    if not 1 <= args.cycles <= 1000 or not 1 <= args.parallel <= 32 or not 1 <= args.rounds <= 20:
        raise SystemExit("--cycles 1-1000, --parallel 1-32, --rounds 1-20")
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise SystemExit("--synchronous: some of normal, full, postgresql (e.g. full,postgresql)")
    need_root()
    hosts = ("127.0.0.1", "127.0.0.2")
    port = free_port(hosts)
    tgtd = Tgtd(portals=tuple(f"{h}:{port}" for h in hosts), control_port=free_tgt_control_port())
    tgtd.start()
    postgres = PostgresServer(fsync=True, parent=str(args.tmp)).start() if "postgresql" in modes else None
    phases: list[dict[str, Any]] = []
    operations: dict[str, list[dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="storage-bench-", dir=args.tmp) as tmp:
            daemons = [
                Storage(Path(tmp) / mode, tgtd, mode, postgres if mode == "postgresql" else None)
                for mode in modes
            ]
            try:
                for d in daemons:
                    phase(d, "warmup", 3, 1)
                for r in range(1, args.rounds + 1):
                    for label, parallel in (("serial", 1), ("parallel", args.parallel)):
                        # alternate which mode goes first, so neither always runs on a warmer machine
                        for d in daemons if r % 2 else daemons[::-1]:
                            phases.append(phase(d, label, args.cycles, parallel, r))
                for d in daemons:
                    stats = d.stub.GetBackendStats(spb.GetBackendStatsRequest(), timeout=10)
                    operations[d.synchronous] = [
                        {
                            "operation": o.operation,
                            "count": o.count,
                            "errors": o.errors,
                            "p50_us": o.p50_micros,
                            "p95_us": o.p95_micros,
                        }
                        for o in stats.operations
                    ]
            finally:
                for d in daemons:
                    d.stop()
    finally:
        tgtd.stop()
        if postgres is not None:
            postgres.stop()
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "catalog_fs": filesystem_of(args.tmp), "loadavg": os.getloadavg()},
        "phases": phases,
        "comparison": compare(phases),
        "server_operations": operations,
    }
    report(results, args.out, args.tag)
    print(json.dumps(results["comparison"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
