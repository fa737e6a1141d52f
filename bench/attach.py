"""Attach/detach benchmark: blockwire against os-brick and the raw iscsiadm floor, side by side in the guest.

    sudo python -m bench.attach            # full plan, ~15-20 min of guest time; writes bench/results/
    sudo python -m bench.attach --plan quick
    sudo python -m bench.attach --plan single   # 1 path x 1 volume x 5, every contender
    sudo python -m bench.attach --plan storm    # boot storm: 64 volumes at once to 8 domains (storm_guest.py)
    sudo python -m bench.attach --from-raw /var/tmp/blockwire-guest/run-.../results/attach-raw.json

Boots the guest tier once (tests/guest/image.py) and runs bench/attach_guest.py in it: the same tgtd
targets (two portals, volumes and CHAP from a real blockwire-storage) for every contender, single path
and two-path multipath, 1, 8 and 32 volumes at once, leftovers counted after every detach. Then writes
bench/results/attach-YYYY-MM-DD.json and .md: p50/p95/max per contender and scenario, ratios against
the floor and against os-brick, leftovers, where blockwire's time goes, the machine and its load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.attach_guest import CONTENDERS, scrub
from bench.facts import host_facts, summary

ROOT = Path(__file__).resolve().parents[1]
GUEST_TIMEOUT = {
    "full": 2700.0, "quick": 1200.0, "scale": 3000.0, "single": 900.0, "smoke": 600.0, "nvme": 3600.0,
    "nvme32": 2400.0, "storm": 3300.0, "storm-small": 900.0, "storm-osbrick": 3300.0,
}  # fmt: skip
STORM_PLANS = ("storm", "storm-small", "storm-osbrick")  # bench/storm_guest.py


def scrub_raw(raw: dict[str, Any]) -> None:
    """CHAP secrets never reach a report: error texts are scrubbed again here (older raw files)."""
    for r in raw.get("scenarios", []):
        r["errors"] = [scrub(e, ()) for e in r.get("errors", [])]


def aggregate(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (paths, volumes, contender): per-volume connect/disconnect latency and batch walls."""
    rows: dict[tuple[int, int, str], dict[str, Any]] = {}
    for r in raw["scenarios"]:
        key = (r["paths"], r["volumes"], r["contender"])
        row = rows.setdefault(
            key,
            {
                "paths": r["paths"],
                "volumes": r["volumes"],
                "contender": r["contender"],
                "reps": 0,
                "_c": [],
                "_d": [],
                "_cw": [],
                "_dw": [],
                "leftovers": 0,
                "leftover_detail": [],
                "errors": [],
            },
        )
        row["reps"] += 1
        row["_c"] += r["connect_s"]
        row["_d"] += r["disconnect_s"]
        row["_cw"].append(r["connect_wall_s"])
        row["_dw"].append(r["disconnect_wall_s"])
        row["leftovers"] += sum(len(v) for v in r["leftovers"].values())
        if r["leftovers"]:
            row["leftover_detail"].append(r["leftovers"])
        row["errors"] += r["errors"]
    out = []
    for row in rows.values():
        row["connect"] = summary(row.pop("_c"))
        row["disconnect"] = summary(row.pop("_d"))
        row["connect_wall"] = summary(row.pop("_cw"))
        row["disconnect_wall"] = summary(row.pop("_dw"))
        out.append(row)
    by_key = {(r["paths"], r["volumes"], r["contender"]): r for r in out}
    for r in out:
        for peer in ("floor", "os-brick"):
            base = by_key.get((r["paths"], r["volumes"], peer))
            if base is None:
                continue
            metric = "connect" if r["volumes"] == 1 else "connect_wall"
            dmetric = "disconnect" if r["volumes"] == 1 else "disconnect_wall"
            r[f"connect_vs_{peer}"] = _ratio(r[metric]["p50"], base[metric]["p50"])
            r[f"disconnect_vs_{peer}"] = _ratio(r[dmetric]["p50"], base[dmetric]["p50"])
    return sorted(out, key=lambda r: (r["paths"], r["volumes"], CONTENDERS.index(r["contender"])))


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def profiles(raw: dict[str, Any]) -> dict[str, Any]:
    """Mean seconds per step (per volume) of bw-lib's connects and disconnects, single volumes and
    the largest batch, and bw-e2e's event gaps."""
    out: dict[str, Any] = {}
    largest = max((r["volumes"] for r in raw["scenarios"]), default=1)
    for paths, volumes in itertools.product((1, 2), sorted({1, largest})):
        reps = [
            r
            for r in raw["scenarios"]
            if r["contender"] == "bw-lib" and r["volumes"] == volumes and r["paths"] == paths
        ]
        for op in ("connect", "disconnect"):
            prof = [r.get(f"profile_{op}", {}) for r in reps if r.get(f"profile_{op}")]
            if not prof:
                continue
            total = sum(sum(r[f"{op}_s"]) / len(r[f"{op}_s"]) for r in reps) / len(reps)
            steps: dict[str, float] = {}
            for p in prof:
                for k, v in p.items():
                    steps[k] = steps.get(k, 0.0) + v / len(prof)
            calls = reps[-1].get(f"calls_{op}", {})
            batch = f" x{volumes}" if volumes > 1 else ""
            out[f"bw-lib {paths}-path{batch} {op}"] = {
                "total_s": round(total, 3),
                "steps_s": {k: round(v, 3) for k, v in sorted(steps.items(), key=lambda kv: -kv[1])},
                "calls": calls,
            }
        e2e = [
            r
            for r in raw["scenarios"]
            if r["contender"] == "bw-e2e" and volumes == 1 and r["volumes"] == 1 and r["paths"] == paths
        ]
        gaps: dict[str, list[float]] = {}
        for r in e2e:
            for ev in r.get("events", []):
                seq = sorted(ev.items(), key=lambda kv: kv[1])
                for (a, ta), (b, tb) in itertools.pairwise(seq):
                    gaps.setdefault(f"{a} -> {b}", []).append(tb - ta)
        if gaps:
            out[f"bw-e2e {paths}-path events"] = {k: round(sum(v) / len(v), 3) for k, v in gaps.items()}
    return out


def fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:g}{unit}"


def profile_lines(profile: dict[str, Any]) -> list[str]:
    """A bullet per profile entry: bw-lib's steps (with call counts) or bw-e2e's event gaps."""
    lines = []
    for name, prof in profile.items():
        if "steps_s" in prof:
            calls = prof.get("calls", {})
            steps = ", ".join(
                f"{k} {v}" + (f" (x{calls[k]})" if calls.get(k, 1) > 1 else "")
                for k, v in prof["steps_s"].items()
            )
            lines.append(f"* {name} (mean {prof['total_s']} s): {steps}")
        else:
            lines.append(f"* {name}: " + ", ".join(f"{k} {v}" for k, v in prof.items()))
    return lines


def markdown(results: dict[str, Any]) -> str:
    m, g = results["machine"], results["guest"]
    lines = [
        f"# Attach/detach benchmark, {results['date'][:10]}",
        "",
        f"Host: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, kernel {m['kernel']}; load average "
        f"before the run {', '.join(f'{x:.2f}' for x in m['load_before'])}, after "
        f"{', '.join(f'{x:.2f}' for x in m['load_after'])}. Guest: Debian 12 under QEMU **TCG** (no KVM: "
        f"every number is several times slower than on hardware), {g.get('guest_cpus')} vCPUs, kernel "
        f"{g.get('kernel')}, {g.get('open-iscsi', 'open-iscsi')}, os-brick {g.get('os_brick', '?')}. "
        f"Guest time {results['guest_seconds'] or '- (partial results)'} s.",
        "",
        "Targets: one tgtd, portals 127.0.0.1:3260 and 127.0.0.2:3260; 32 MiB volumes made by blockwire-"
        "storage (file backend, tgt exporter, CHAP, per-initiator ACL), exported once; every contender "
        "gets that connection info (single path: the first portal only). Seconds. Single volume: per-"
        "operation latency; 8 and 32 volumes: wall time for the whole batch (all started at once, one "
        "thread each). Ratios compare p50s.",
        "",
        "| paths | volumes | contender | reps | connect p50 | p95 | max | detach p50 | p95 | max "
        "| connect / floor | connect / os-brick | detach / os-brick | leftovers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        c = r["connect"] if r["volumes"] == 1 else r["connect_wall"]
        d = r["disconnect"] if r["volumes"] == 1 else r["disconnect_wall"]
        lines.append(
            f"| {r['paths']} | {r['volumes']} | {r['contender']} | {r['reps']} | {c['p50']} | {c['p95']} "
            f"| {c['max']} | {d['p50']} | {d['p95']} | {d['max']} | {fmt(r.get('connect_vs_floor'))} "
            f"| {fmt(r.get('connect_vs_os-brick'))} | {fmt(r.get('disconnect_vs_os-brick'))} "
            f"| {r['leftovers']} |"
        )
    errors = [(r["contender"], r["paths"], r["volumes"], e) for r in results["rows"] for e in r["errors"]]
    if errors:
        lines += ["", "Errors:", ""] + [f"* {c} {p}-path x{n}: {e}" for c, p, n, e in errors[:20]]
    left = [
        (r["contender"], r["paths"], r["volumes"], d) for r in results["rows"] for d in r["leftover_detail"]
    ]
    if left:
        lines += ["", "Leftovers after detach:", ""] + [
            f"* {c} {p}-path x{n}: {d}" for c, p, n, d in left[:20]
        ]
    lines += ["", "## Where blockwire's time goes", ""]
    lines += profile_lines(results["profile"])
    lines += [
        "",
        "bw-lib steps are the connector's own commands and waits (its runner and udev waiter, timed); "
        "with two paths the per-path steps run in parallel, so they add up to more than the total. bw-e2e: "
        "gaps between the agent's events (attach_started -> progress:connect is the connector, "
        "progress:connect -> progress:hotplug libvirt's hot-plug).",
    ]
    b = results.get("before")
    if b:
        lines += [
            "",
            "## Before",
            "",
            "The same harness on the code before the change (`--before`: an earlier run's raw results), "
            f"load average {', '.join(f'{x:.2f}' for x in b['load'] or [])}:",
            "",
            "| paths | volumes | contender | connect p50 | detach p50 |",
            "|---|---|---|---|---|",
        ]
        for r in b["rows"]:
            c = r["connect"] if r["volumes"] == 1 else r["connect_wall"]
            d = r["disconnect"] if r["volumes"] == 1 else r["disconnect_wall"]
            lines.append(f"| {r['paths']} | {r['volumes']} | {r['contender']} | {c['p50']} | {d['p50']} |")
        lines.append("")
        lines += profile_lines(b["profile"])
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def before_section(before: dict[str, Any]) -> dict[str, Any]:
    """An earlier run (the code before a change): its blockwire rows and profile, for before/after."""
    rows = [r for r in aggregate(before) if r["contender"].startswith("bw-")]
    return {
        "date": before.get("date", ""),
        "load": before.get("host_machine", {}).get("load_before"),
        "rows": [
            {
                k: r[k]
                for k in (
                    "paths",
                    "volumes",
                    "contender",
                    "reps",
                    "connect",
                    "disconnect",
                    "connect_wall",
                    "disconnect_wall",
                    "leftovers",
                )
            }
            for r in rows
        ],
        "profile": profiles(before),
    }


def nvme_markdown(results: dict[str, Any]) -> str:
    """The `nvme` plan's report: each transport's contenders against its own floor, then NVMe/TCP beside
    iSCSI for the same contender and scenario."""
    m, g = results["machine"], results["guest"]
    lines = [
        f"# NVMe/TCP and iSCSI attach/detach, {results['date'][:10]}",
        "",
        f"Host: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, kernel {m['kernel']}; load average "
        f"before {', '.join(f'{x:.2f}' for x in m['load_before'])}, after "
        f"{', '.join(f'{x:.2f}' for x in m['load_after'])}. Guest: Debian 12 under QEMU **TCG**, "
        f"{g.get('guest_cpus')} vCPUs, kernel {g.get('kernel')}, {g.get('nvme-cli', 'nvme-cli')}, "
        f"{g.get('open-iscsi', 'open-iscsi')}. Guest time {results['guest_seconds'] or '-'} s.",
        "",
        "One run, the same guest: NVMe/TCP against the kernel target (nvmet, ports 127.0.0.1:4420 and "
        "127.0.0.2:4420, no DH-HMAC-CHAP: the guest kernel has none), then iSCSI against tgtd (portals "
        "127.0.0.1:3260 and 127.0.0.2:3260, CHAP); 32 MiB file volumes made and exported by "
        "blockwire-storage. floor = the raw tools (`nvme connect` / `iscsiadm`), bw-lib = the connector as "
        "a library, bw-e2e = AttachVolume with the libvirt hot-plug. Seconds; 1 volume: per-operation p50, "
        "8 and 32 volumes: wall time of the batch (all at once).",
        "",
        "| transport | paths | volumes | contender | reps | connect p50 | detach p50 | connect / floor "
        "| detach / floor | leftovers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t, rows in results["transports"].items():
        for r in rows:
            c = r["connect"] if r["volumes"] == 1 else r["connect_wall"]
            d = r["disconnect"] if r["volumes"] == 1 else r["disconnect_wall"]
            lines.append(
                f"| {t} | {r['paths']} | {r['volumes']} | {r['contender']} | {r['reps']} | {c['p50']} "
                f"| {d['p50']} | {fmt(r.get('connect_vs_floor'))} | {fmt(r.get('disconnect_vs_floor'))} "
                f"| {r['leftovers']} |"
            )
    lines += [
        "",
        "NVMe/TCP beside iSCSI (p50, NVMe/TCP / iSCSI):",
        "",
        "| paths | volumes | contender | connect NVMe/TCP | connect iSCSI | ratio | detach NVMe/TCP "
        "| detach iSCSI | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    iscsi = {(r["paths"], r["volumes"], r["contender"]): r for r in results["transports"].get("iscsi", [])}
    for r in results["transports"].get("nvme-tcp", []):
        i = iscsi.get((r["paths"], r["volumes"], r["contender"]))
        if i is None:
            continue
        key = "connect" if r["volumes"] == 1 else "connect_wall"
        dkey = "disconnect" if r["volumes"] == 1 else "disconnect_wall"
        lines.append(
            f"| {r['paths']} | {r['volumes']} | {r['contender']} | {r[key]['p50']} | {i[key]['p50']} "
            f"| {fmt(_ratio(r[key]['p50'], i[key]['p50']))} | {r[dkey]['p50']} | {i[dkey]['p50']} "
            f"| {fmt(_ratio(r[dkey]['p50'], i[dkey]['p50']))} |"
        )
    errors = [(t, r["contender"], r["paths"], r["volumes"], e)
              for t, rows in results["transports"].items() for r in rows for e in r["errors"]]  # fmt: skip
    if errors:
        lines += ["", "Errors:", ""] + [f"* {t} {c} {p}-path x{n}: {e}" for t, c, p, n, e in errors[:20]]
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write(
    raw: dict[str, Any], machine: dict[str, Any], out: Path, notes: list[str], before: dict[str, Any] | None
) -> Path:
    date = datetime.now(UTC)
    scrub_raw(raw)
    if any("transport" in r for r in raw.get("scenarios", [])):
        by_t: dict[str, list[dict[str, Any]]] = {}
        for r in raw["scenarios"]:
            by_t.setdefault(r.get("transport", "iscsi"), []).append(r)
        results = {
            "date": date.isoformat(timespec="seconds"),
            "machine": machine,
            "guest": raw.get("versions", {}),
            "guest_seconds": raw.get("guest_seconds"),
            "transports": {t: aggregate({"scenarios": rs}) for t, rs in by_t.items()},
            "notes": notes,
            "raw": raw,
        }
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"attach-nvme-{date:%Y-%m-%d}"
        for n in range(2, 10):  # an earlier run of the same day is kept: -2, -3, ...
            if not stem.with_suffix(".md").exists():
                break
            stem = out / f"attach-nvme-{date:%Y-%m-%d}-{n}"
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        stem.with_suffix(".md").write_text(nvme_markdown(results))
        return stem
    if before:
        scrub_raw(before)
    results = {
        "date": date.isoformat(timespec="seconds"),
        "machine": machine,
        "guest": raw.get("versions", {}),
        "guest_seconds": raw.get("guest_seconds"),
        "rows": aggregate(raw),
        "profile": profiles(raw),
        "notes": notes,
        "before": before_section(before) if before else None,
        "raw": raw,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attach-{date:%Y-%m-%d}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    return stem


def left_counts(left: dict[str, Any]) -> str:
    """What a contender left, counted per kind ("0" for nothing); the names are in the JSON."""
    return ", ".join(f"{k}: {len(v)}" for k, v in left.items()) or "0"


def storm_markdown(results: dict[str, Any]) -> str:
    plan, g, m = results["plan"], results["guest"], results["machine"]
    rows = results["rows"]
    floor = next((r for r in rows if r["contender"] == "floor"), None)
    lines = [
        f"# Boot storm in the guest, {results['date'][:10]}",
        "",
        f"Host: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; load average before "
        f"{m.get('load_before')}, after {m.get('load_after')}. Guest: Debian 12 under QEMU **TCG**, "
        f"{g.get('guest_cpus')} vCPUs, "
        f"kernel {g.get('kernel')}, {g.get('open-iscsi', 'open-iscsi')}, os-brick {g.get('os_brick', '-')}. "
        f"Guest time {results.get('guest_seconds')} s.",
        "",
        f"{plan['volumes']} volumes (32 MiB, tgtd, CHAP, per-initiator ACL, {plan['paths']} path(s)) "
        f"attached at once (one thread each) to {plan['domains']} running no-OS domains, volume i to "
        "domain i mod "
        f"{plan['domains']}; then all detached at once. floor = iscsiadm + udev link + attachDeviceFlags; "
        "os-brick = connect_volume + attachDeviceFlags; bw-e2e = AttachVolume/DetachVolume over gRPC. "
        "Seconds; wall = the whole batch; ratios against the floor's wall time.",
        "",
        "| contender | attach wall | p50 | p95 | p99 | wall / floor | detach wall | p50 | p99 | wall / floor "
        "| errors | leftovers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, d = r["attach"], r["detach"]
        ra = _ratio(a["wall"], floor["attach"]["wall"]) if floor else None
        rd = _ratio(d["wall"], floor["detach"]["wall"]) if floor else None
        lines.append(
            f"| {r['contender']} | {a['wall']} | {a['p50']} | {a['p95']} | {a['p99']} | {fmt(ra)} "
            f"| {d['wall']} | {d['p50']} | {d['p99']} | {fmt(rd)} | {len(r['errors'])} "
            f"| {left_counts(r['leftovers'])} |"
        )
    errors = [(r["contender"], e) for r in rows for e in r["errors"]]
    if errors:
        lines += ["", "Errors:", ""] + [f"* {c}: {e}" for c, e in errors[:20]]
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_storm(raw: dict[str, Any], machine: dict[str, Any], out: Path, notes: list[str]) -> Path:
    date = datetime.now(UTC)
    for r in raw["rows"]:
        r["errors"] = [scrub(e, []) for e in r["errors"]]
    results = {
        "date": date.isoformat(timespec="seconds"),
        "machine": machine,
        "guest": raw.get("versions", {}),
        "guest_seconds": raw.get("guest_seconds"),
        "plan": raw["plan"],
        "rows": raw["rows"],
        "notes": notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"storm-guest-{date:%Y-%m-%d}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(storm_markdown(results))
    return stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attach", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=sorted(GUEST_TIMEOUT), default="full")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--from-raw", type=Path, help="report on an earlier run's attach-raw.json")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    parser.add_argument("--before", type=Path, help="attach-raw.json of a run on the code before a change")
    args = parser.parse_args(argv)
    machine = host_facts()
    if args.from_raw:
        raw = json.loads(args.from_raw.read_text())
        machine = raw.get("host_machine", machine)
    else:
        # Our own run directory: the guest tier keeps only the last few runs in its shared one, and other
        # guests booted meanwhile would prune this run's results before they are read.
        os.environ.setdefault("BLOCKWIRE_GUEST_RUNS", "/var/tmp/blockwire-bench")
        from tests.guest import image  # noqa: PLC0415

        missing = image.requirements_missing()
        if missing:
            print(f"bench: {missing}", file=sys.stderr)
            return 2
        module, raw_name = (
            ("storm_guest.py::test_storm_bench", "storm-raw.json")
            if args.plan in STORM_PLANS
            else ("attach_guest.py::test_attach_bench", "attach-raw.json")
        )
        run = image.run_guest([f"bench/{module}[{args.plan}]"], timeout=GUEST_TIMEOUT[args.plan])
        raw_file = run.results / raw_name
        print(f"bench: guest run {run.directory} rc={run.returncode} {run.seconds:.0f}s", file=sys.stderr)
        if not raw_file.exists():
            print(
                (run.results / "pytest.log").read_text()[-5000:]
                if (run.results / "pytest.log").exists()
                else run.serial_tail(),
                file=sys.stderr,
            )
            return 1
        raw = json.loads(raw_file.read_text())
        machine["load_after"] = list(os.getloadavg())
        raw["host_machine"] = machine
        raw_file.write_text(json.dumps(raw, indent=1) + "\n")
    machine.setdefault("load_after", list(os.getloadavg()))
    if "rows" in raw and "plan" in raw:  # a storm run
        stem = write_storm(raw, machine, args.out, args.note)
        print(stem.with_suffix(".md").read_text())
        return 0
    before = json.loads(args.before.read_text()) if args.before else None
    stem = write(raw, machine, args.out, args.note, before)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
