"""Live-migration benchmark: blockwire's handoff (prepare + finish) beside libvirt's own migration time.

    sudo python -m bench.migrate [--rounds 5] [--volumes 2] [--out bench/results]

Runs on the host tier's rig (tests/host/migration_rig.py: two private libvirtd on this machine, agent A
and B, one storage daemon on its own tgtd): a running no-OS domain (64 MiB, KVM) with `--volumes`
QEMU-iSCSI volumes (CHAP) migrates A -> B and back `--rounds` times. For each migration it times, as the
caller sees them, PrepareMigration (destination), libvirt's migrateToURI3 (live, peer-to-peer, with the
destination XML), FinishIncomingMigration (destination) and FinishOutgoingMigration (source), and reads
libvirt's own figures of the completed job (total time, downtime) on the destination. In the same run, a
domain of the same shape without volumes migrates the same way: libvirt's time and downtime with no
volumes to hand over. Results: bench/results/migrate-YYYY-MM-DD.{json,md} with the machine's facts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import libvirt  # noqa: E402

from bench.facts import host_facts  # noqa: E402
from blockwire.v1 import hostagent_pb2 as hpb  # noqa: E402
from tests.fakes.daemon_rig import MIB  # noqa: E402
from tests.host.daemons import Tgtd, free_port, free_tgt_control_port, need_root  # noqa: E402
from tests.host.migration_rig import World, libvirt_migrate, prepare, running_world  # noqa: E402
from tests.rig import domain_xml  # noqa: E402


def _job(world: World, side: str, domain: str) -> dict[str, float]:
    """libvirt's figures of the migration that just completed into `side` (ms)."""
    dom = world.rig(side).lv().lookupByName(domain)
    try:
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        return {}
    return {k: float(stats[k]) for k in ("time_elapsed", "downtime", "setup_time") if k in stats}


def one_migration(world: World, src: str, dst: str, domain: str, volumes: bool) -> dict[str, Any]:
    timing: dict[str, Any] = {"from": src, "to": dst}
    xml = None
    if volumes:
        t = time.monotonic()
        xml = prepare(world, src, dst, domain).destination_domain_xml
        timing["prepare_ms"] = (time.monotonic() - t) * 1000
    if xml is None:
        xml = world.rig(src).lv().lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    timing["libvirt_ms"] = libvirt_migrate(world, src, dst, domain, xml) * 1000
    timing["libvirt_job"] = _job(world, dst, domain)
    if volumes:
        t = time.monotonic()
        world.rig(dst).agent.FinishIncomingMigration(
            hpb.FinishIncomingMigrationRequest(domain=domain), timeout=60
        )
        timing["finish_in_ms"] = (time.monotonic() - t) * 1000
        t = time.monotonic()
        world.rig(src).agent.FinishOutgoingMigration(
            hpb.FinishOutgoingMigrationRequest(domain=domain), timeout=60
        )
        timing["finish_out_ms"] = (time.monotonic() - t) * 1000
        timing["handoff_ms"] = timing["prepare_ms"] + timing["finish_in_ms"] + timing["finish_out_ms"]
    return timing


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return round(statistics.median(values), 1) if values else 0.0


def _median_job(rows: list[dict[str, Any]], key: str) -> float:
    values = [r["libvirt_job"][key] for r in rows if key in r.get("libvirt_job", {})]
    return round(statistics.median(values), 1) if values else 0.0


def run(world: World, rounds: int, n_volumes: int) -> dict[str, Any]:
    with_volumes = f"bw-bench-mig-{uuid.uuid4().hex[:6]}"
    without = f"bw-bench-plain-{uuid.uuid4().hex[:6]}"
    world.a.lv().createXML(domain_xml(with_volumes), 0)
    world.a.lv().createXML(domain_xml(without), 0)
    volumes = [world.a.create_volume(8 * MIB).id for _ in range(n_volumes)]
    world.b.volume_ids.update(volumes)
    for v in volumes:
        world.a.attach(with_volumes, v)
    handoff: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            for src, dst in (("a", "b"), ("b", "a")):
                # alternate which domain goes first, so neither always runs on a warmer machine
                order = ((with_volumes, True), (without, False))
                for name, vols in order if r % 2 == 0 else order[::-1]:
                    row = one_migration(world, src, dst, name, vols)
                    row["round"] = r + 1
                    (handoff if vols else plain).append(row)
    finally:
        for name in (with_volumes, without):
            for rig in (world.a, world.b):
                with contextlib.suppress(libvirt.libvirtError):
                    rig.lv().lookupByName(name).destroy()
        for side in ("a", "b"):
            for v in volumes:
                with contextlib.suppress(grpc.RpcError):
                    world.rig(side).detach(with_volumes, v)
        for v in volumes:
            world.a.delete_volume(v)
    summary = {
        "migrations": len(handoff),
        "prepare_ms_p50": _median(handoff, "prepare_ms"),
        "finish_in_ms_p50": _median(handoff, "finish_in_ms"),
        "finish_out_ms_p50": _median(handoff, "finish_out_ms"),
        "handoff_ms_p50": _median(handoff, "handoff_ms"),
        "libvirt_ms_p50_with_volumes": _median(handoff, "libvirt_ms"),
        "libvirt_ms_p50_no_volumes": _median(plain, "libvirt_ms"),
        "downtime_ms_p50_with_volumes": _median_job(handoff, "downtime"),
        "downtime_ms_p50_no_volumes": _median_job(plain, "downtime"),
        "libvirt_job_ms_p50_with_volumes": _median_job(handoff, "time_elapsed"),
    }
    base = summary["libvirt_ms_p50_with_volumes"]
    summary["handoff_over_libvirt"] = round(summary["handoff_ms_p50"] / base, 3) if base else 0.0
    return {"summary": summary, "handoff": handoff, "plain": plain}


def report(results: dict[str, Any], out: Path) -> None:
    day = results["date"][:10]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"migrate-{day}.json").write_text(json.dumps(results, indent=2) + "\n")
    s, m = results["summary"], results["machine"]
    lines = [
        f"# Live migration handoff, {results['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"load before {', '.join(f'{x:.2f}' for x in m['load_before'])}.",
        f"A no-OS 64 MiB KVM domain with {results['volumes']} QEMU-iSCSI volumes (CHAP, 8 MiB, tgt), two "
        f"private libvirtd on this machine, {s['migrations']} migrations (A->B and B->A, "
        f"{results['rounds']} rounds); beside it a domain of the same shape without volumes.",
        "",
        "| step (median, ms) | with volumes (blockwire handoff) | no volumes (libvirt alone) |",
        "|---|---|---|",
        f"| PrepareMigration (destination) | {s['prepare_ms_p50']} | - |",
        f"| libvirt migrateToURI3 (caller's wall time) | {s['libvirt_ms_p50_with_volumes']} | "
        f"{s['libvirt_ms_p50_no_volumes']} |",
        f"| libvirt's job time (completed job stats) | {s['libvirt_job_ms_p50_with_volumes']} | - |",
        f"| libvirt's downtime | {s['downtime_ms_p50_with_volumes']} | {s['downtime_ms_p50_no_volumes']} |",
        f"| FinishIncomingMigration (destination) | {s['finish_in_ms_p50']} | - |",
        f"| FinishOutgoingMigration (source) | {s['finish_out_ms_p50']} | - |",
        f"| handoff total (prepare + both finishes) | {s['handoff_ms_p50']} | - |",
        "",
        f"Handoff / libvirt migration time (same domain, same run): **{s['handoff_over_libvirt']}x** "
        "(goal: <= 0.5x). The handoff runs before and after libvirt's migration, never inside it, so it "
        "adds nothing to the downtime (compare the two downtime columns).",
        "",
        "Every migration (ms):",
        "",
        "| round | from -> to | prepare | libvirt | downtime | finish in | finish out |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["handoff"]:
        lines.append(
            f"| {r['round']} | {r['from']} -> {r['to']} | {r['prepare_ms']:.1f} | {r['libvirt_ms']:.1f} | "
            f"{r['libvirt_job'].get('downtime', 0):.0f} | {r['finish_in_ms']:.1f} | "
            f"{r['finish_out_ms']:.1f} |"
        )
    (out / f"migrate-{day}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--volumes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.volumes <= 8:
        raise SystemExit("--rounds 1-50, --volumes 1-8")
    need_root()
    hosts = ("127.0.0.1", "127.0.0.2")
    port = free_port(hosts)
    tgtd = Tgtd(portals=tuple(f"{h}:{port}" for h in hosts), control_port=free_tgt_control_port())
    tgtd.start()
    machine = host_facts()
    try:
        with running_world(tgtd) as world:
            measured = run(world, args.rounds, args.volumes)
    finally:
        tgtd.stop()
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "rounds": args.rounds,
        "volumes": args.volumes,
        **measured,
    }
    report(results, args.out)
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
