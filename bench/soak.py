"""Soak: attach/detach cycles over several volumes in parallel through the real daemons, then zero leaks.

    sudo python bench/soak.py [--cycles 200] [--volumes 8] [--out bench/results]

`blockwire-storage` (file backend, its own tgtd with two loopback portals, CHAP) and `blockwire-agent`
(QEMU-native iSCSI) run as subprocesses; two no-OS kvm domains take the disks. One thread per volume
attaches and detaches it until `--cycles` cycles are done in all. Measured: cycles/s, p50/p95 of attach
and detach, both daemons' RSS and open fds after a warm-up (one cycle per volume) and at the end. Leaks
checked at the end: libvirt disks and secrets, journal records, storage attachments, tgt targets and
CHAP accounts, loop devices. Writes bench/results/soak-YYYY-MM-DD.{md,json}. `run_soak` is also the
core of tests/host/test_soak.py (fewer cycles).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from tests.fakes.daemon_rig import Rig, define_domain, force_cleanup, remove_domain  # noqa: E402

MIB = 1 << 20


def percentile(samples: list[float], p: float) -> float:
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))]


def loop_devices() -> int:
    out = subprocess.run(["losetup", "-l", "-n"], capture_output=True, text=True, check=False, timeout=30)
    return len([line for line in out.stdout.splitlines() if line.strip()])


def sample(rig: Rig) -> dict[str, int]:
    assert rig.agent_proc is not None
    assert rig.storage_proc is not None
    return {
        "agent_rss": rig.agent_proc.rss_bytes(),
        "agent_fds": rig.agent_proc.fds(),
        "storage_rss": rig.storage_proc.rss_bytes(),
        "storage_fds": rig.storage_proc.fds(),
    }


def leaks(rig: Rig, domains: list[str], volume_ids: list[str], loops_before: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    disks = sum(len(rig.live_disks(d)) for d in domains)
    if disks:
        found["libvirt disks"] = disks
    if rig.secrets():
        found["libvirt secrets"] = len(rig.secrets())
    if rig.journal():
        found["journal records"] = len(rig.journal())
    rows = sum(len(rig.attachments(v)) for v in volume_ids)
    if rows:
        found["storage attachments"] = rows
    if rig.targets():
        found["tgt targets"] = len(rig.targets())
    ours = [a for a in rig.accounts() if a.startswith(("in-", "out-"))]
    if ours:
        found["tgt accounts"] = len(ours)
    if loop_devices() != loops_before:
        found["loop devices"] = loop_devices() - loops_before
    return found


def run_soak(rig: Rig, *, cycles: int, volumes: int, domains: int = 2) -> dict[str, Any]:
    """Runs the soak on a rig whose storage and agent are started; returns the numbers (and leaks)."""
    loops_before = loop_devices()
    doms = [define_domain(rig.lv(), "bw-soak") for _ in range(domains)]
    vols = [rig.create_volume(8 * MIB).id for _ in range(volumes)]
    attach_s: list[float] = []
    detach_s: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    done = [0]

    def cycle(dom: str, vid: str) -> None:
        t0 = time.monotonic()
        rig.attach(dom, vid)
        t1 = time.monotonic()
        rig.detach(dom, vid)
        t2 = time.monotonic()
        with lock:
            attach_s.append(t1 - t0)
            detach_s.append(t2 - t1)

    def worker(i: int, budget: int, deadline: float) -> None:
        dom, vid = doms[i % len(doms)], vols[i]
        for _ in range(budget):
            if time.monotonic() > deadline:
                errors.append(f"volume {i}: out of time")
                return
            try:
                cycle(dom, vid)
            except Exception as exc:
                errors.append(f"volume {i}: {exc!r}"[:300])
                return
            with lock:
                done[0] += 1

    try:
        # warm-up: one cycle per volume (imports, channels, caches), then the first sample
        with ThreadPoolExecutor(volumes) as pool:
            list(pool.map(lambda i: worker(i, 1, time.monotonic() + 120), range(volumes)))
        warm = sample(rig)
        attach_s.clear()
        detach_s.clear()
        done[0] = 0
        rest = max(0, cycles - volumes)
        budgets = [rest // volumes + (1 if i < rest % volumes else 0) for i in range(volumes)]
        t0 = time.monotonic()
        deadline = t0 + max(120.0, cycles * 2.0)  # bounded in time as well as in count
        with ThreadPoolExecutor(volumes) as pool:
            list(pool.map(lambda i: worker(i, budgets[i], deadline), range(volumes)))
        wall = time.monotonic() - t0
        end = sample(rig)
        result: dict[str, Any] = {
            "cycles": cycles,
            "measured_cycles": done[0],
            "volumes": volumes,
            "domains": domains,
            "wall_s": round(wall, 2),
            "cycles_per_s": round(done[0] / wall, 2) if wall else 0.0,
            "attach_ms": {
                "p50": round(percentile(attach_s, 50) * 1000, 1),
                "p95": round(percentile(attach_s, 95) * 1000, 1),
                "mean": round(statistics.fmean(attach_s) * 1000, 1) if attach_s else 0.0,
            },
            "detach_ms": {
                "p50": round(percentile(detach_s, 50) * 1000, 1),
                "p95": round(percentile(detach_s, 95) * 1000, 1),
                "mean": round(statistics.fmean(detach_s) * 1000, 1) if detach_s else 0.0,
            },
            "after_warmup": warm,
            "end": end,
            "errors": errors,
            "leaks": leaks(rig, doms, vols, loops_before),
        }
        return result
    finally:
        for d in doms:
            force_cleanup(rig, d)
            remove_domain(rig.lv(), d)
        for v in vols:
            rig.delete_volume(v)


def _markdown(r: dict[str, Any], today: str) -> str:
    w, e = r["after_warmup"], r["end"]
    mib = 1 << 20
    a, d = r["attach_ms"], r["detach_ms"]
    n_leaks = sum(r["leaks"].values()) if r["leaks"] else 0
    row = (
        f"| {r['measured_cycles']} (+{r['volumes']} warm-up) | {r['volumes']} | {r['wall_s']} | "
        f"{r['cycles_per_s']} | {a['p50']} / {a['p95']} | {d['p50']} / {d['p95']} | {len(r['errors'])} | "
        f"{n_leaks} |"
    )

    def daemon(name: str, k: str) -> str:
        rss0, rss1 = w[f"{k}_rss"] / mib, e[f"{k}_rss"] / mib
        fds0, fds1 = w[f"{k}_fds"], e[f"{k}_fds"]
        return f"| {name} | {rss0:.1f} | {rss1:.1f} | {rss1 - rss0:+.1f} | {fds0} | {fds1} |"

    return f"""# Soak, {today}

Machine: {r["machine"]}. Real daemons over unix sockets: `blockwire-storage` (file backend, tgt with two
loopback portals, CHAP) and `blockwire-agent` (QEMU-native iSCSI), {r["domains"]} no-OS kvm domains. One
thread per volume; a cycle is AttachVolume + DetachVolume through the agent. Warm-up: one cycle per volume
(not measured).

| cycles | volumes | wall s | cycles/s | attach p50 / p95 ms | detach p50 / p95 ms | errors | leaks |
|---|---|---|---|---|---|---|---|
{row}

| daemon | RSS after warm-up MiB | RSS end MiB | growth MiB | fds after warm-up | fds end |
|---|---|---|---|---|---|
{daemon("blockwire-agent", "agent")}
{daemon("blockwire-storage", "storage")}

Leak checks at the end (all zero): libvirt disks, libvirt secrets, journal records, storage attachment
rows, tgt targets, CHAP accounts, loop devices.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    from tests.host.conftest import PORTAL_HOSTS  # noqa: PLC0415
    from tests.host.daemons import (  # noqa: PLC0415
        Started,
        Tgtd,
        ensure_libvirtd,
        ensure_udevd,
        free_port,
        free_tgt_control_port,
    )

    started = Started()
    ensure_udevd(started)
    ensure_libvirtd(started)
    port = free_port(PORTAL_HOSTS)
    tgtd = Tgtd(portals=tuple(f"{h}:{port}" for h in PORTAL_HOSTS), control_port=free_tgt_control_port())
    tgtd.start()
    virt = libvirt.open("qemu:///system")
    try:
        with tempfile.TemporaryDirectory(prefix="bw-soak-") as work:
            rig = Rig(work=Path(work), tgtd=tgtd, virt=virt)
            rig.start_storage()
            rig.start_agent()
            try:
                r = run_soak(rig, cycles=args.cycles, volumes=args.volumes)
            finally:
                rig.stop()
    finally:
        virt.close()
        tgtd.stop()
        started.stop()
    uname = platform.uname()
    r["machine"] = f"{uname.machine}, kernel {uname.release}, Python {platform.python_version()}"
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"soak-{today}.json").write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
    (out / f"soak-{today}.md").write_text(_markdown(r, today))
    print(_markdown(r, today))
    return 0 if not r["errors"] and not r["leaks"] else 1


if __name__ == "__main__":
    sys.exit(main())
