"""RBD attach benchmark in the guest: the kernel's rbd (krbd) against QEMU's librbd, side by side.

    sudo python -m bench.rbd_guest                      # full plan, ~6 min of guest time
    sudo python -m bench.rbd_guest --plan smoke
    sudo python -m bench.rbd_guest --from-raw /var/tmp/blockwire-bench/run-.../results/rbd-guest-raw.json

Boots the guest tier once (tests/guest/image.py: its kernel has rbd.ko, its QEMU the block-rbd module)
and runs this file's `test_rbd_guest_bench` in it. Inside: a throwaway Ceph cluster (tests/ceph.py: mon +
one MemStore OSD on loopback), one running no-OS domain (TCG, virtio-scsi), and two blockwire-agent
daemons (tests/host/rbd_rig.py's RbdAgent), one per contender, each attaching its own image of the same
size with the same cephx user:

* krbd: `rbd_mode = "kernel"` -> hostagent.connectors.rbd.KernelRbdConnector: `rbd device map` (key in a
  0600 keyfile), the identity read from /sys/bus/rbd/devices/N, then /dev/rbdN hot-plugged as a block
  disk; detach unplugs and `rbd device unmap`s;
* librbd: `rbd_mode = "qemu"` -> QemuRbdConnector: the identity checked through librados, a private
  libvirt ceph secret, then a network disk QEMU opens with librbd; detach unplugs and removes the secret.

Both timed client-side around AttachVolume and DetachVolume over gRPC (connect + hot-plug, unplug +
disconnect). Rounds are interleaved (krbd, librbd, then librbd, krbd, ...), the first one a warm-up not
counted. After every detach the leftovers are counted: kernel mappings, keyfiles, ceph secrets of the
volume, journal records, disks in the domain (0 expected). Writes $BLOCKWIRE_GUEST_RESULTS/
rbd-guest-raw.json inside; the host side writes bench/results/rbd-guest-YYYY-MM-DD.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.ceph import CephCluster

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BLOCKWIRE_GUEST_RESULTS", "/tmp"))
RBD_DEVICES = Path("/sys/bus/rbd/devices")
CONTENDERS = ("krbd", "librbd")
MODES = {"krbd": "kernel", "librbd": "qemu"}  # the agent's rbd_mode per contender
RPC_TIMEOUT = 300.0
GUEST_TIMEOUT = {"full": 1500.0, "smoke": 900.0}

IN_GUEST = os.environ.get("BLOCKWIRE_IN_GUEST") == "1"
# The full plan outlasts the guest's per-test timeout; pytest-timeout is in the guest's venv only.
pytestmark = [
    pytest.mark.skipif(not IN_GUEST, reason="inside the guest only"),
    *([pytest.mark.timeout(1200)] if IN_GUEST else []),
]


@dataclass(frozen=True)
class Plan:
    rounds: int  # counted rounds; each attaches and detaches one volume per contender
    warmup: bool = True  # one more round first, not counted (QEMU loads librbd, the kernel's rbd client)
    image_mib: int = 64


FULL = Plan(rounds=15)
SMOKE = Plan(rounds=1, warmup=False, image_mib=16)
PLANS = {"full": FULL, "smoke": SMOKE}


def progress(line: str) -> None:
    """A progress line on stdout and in the results share (readable on the host while the guest runs)."""
    print(line, flush=True)
    with (RESULTS / "rbd-guest-progress.txt").open("a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def leftovers(agent: Any, domain: str, volume_id: str) -> dict[str, int]:
    """What is still on the host after a detach; only the nonzero counts."""
    from tests.guest.inside import kernel  # noqa: PLC0415 - guest-only module (its imports need the guest)

    secrets = kernel.virsh("secret-list").stdout
    counts = {
        "journal": len(agent.journal()),
        "disks": len(kernel.domain_disks(domain)),  # the domain starts with none
        "mappings": len(list(RBD_DEVICES.iterdir())) if RBD_DEVICES.exists() else 0,
        "keyfiles": len(list((agent.state / "rbd-keys").glob("*"))),
        "secrets": sum(1 for line in secrets.splitlines() if f"blockwire/{volume_id}/" in line),
    }
    return {k: v for k, v in counts.items() if v}


def timed(call: Callable[[], Any]) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def run_plan(plan: Plan, work: Path, cluster: CephCluster | None = None) -> dict[str, Any]:
    """Runs the plan; on `cluster` if given (the guest tests' session cluster), else on one of its own."""
    import libvirt  # noqa: PLC0415 - the guest's libvirt-python

    from bench.facts import host_facts  # noqa: PLC0415
    from tests.guest.inside import kernel  # noqa: PLC0415
    from tests.guest.inside.conftest import GUEST_DAEMON, running_domain  # noqa: PLC0415
    from tests.host.daemons import Started, ensure_libvirtd  # noqa: PLC0415
    from tests.host.rbd_rig import RbdAgent, create_image, rbd_info, to_pb  # noqa: PLC0415

    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": {"rounds": plan.rounds, "warmup": plan.warmup, "image_mib": plan.image_mib},
        "guest": {**host_facts(libvirt=libvirt.getVersion()), **versions()},
        "rounds": [],
    }
    with ExitStack() as stack:
        kernel.run(["modprobe", "rbd"])
        started = Started()
        stack.callback(started.stop)
        ensure_libvirtd(started)
        if cluster is None:
            began = time.monotonic()
            cluster = stack.enter_context(
                CephCluster(osds=1, objectstore="memstore", osd_bytes=512 << 20, start_timeout=300)
            )
            results["cluster_start_s"] = round(time.monotonic() - began, 1)
            progress(f"rbd-bench: cluster up in {results['cluster_start_s']}s")
        user = cluster.create_user("bench-guest")
        agents: dict[str, RbdAgent] = {}
        for name in CONTENDERS:
            a = RbdAgent(
                work / name,
                rbd_timeout=60.0,
                mode=MODES[name],
                detach_timeout=60.0,
                extra="device_timeout = 90.0\n",
                daemon=GUEST_DAEMON,
            )
            (work / name).mkdir(parents=True)
            a.start()
            stack.callback(a.stop)
            agents[name] = a
        images = {name: f"bench-{name}-{uuid.uuid4().hex[:6]}" for name in CONTENDERS}
        ids = {name: create_image(cluster, images[name], plan.image_mib) for name in CONTENDERS}
        domain = stack.enter_context(running_domain("bw-rbd-bench"))
        for i in range(plan.rounds + int(plan.warmup)):
            counted = i >= int(plan.warmup)
            order = CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]
            for name in order:
                agent, image = agents[name], images[name]
                info = to_pb(rbd_info(cluster, user, image, image, image_id_=ids[name]))
                row: dict[str, Any] = {"contender": name, "round": i, "counted": counted, "errors": []}
                try:
                    attachment: list[Any] = []
                    row["attach_s"] = timed(
                        lambda: attachment.append(agent.attach(domain, info, timeout=RPC_TIMEOUT))  # noqa: B023
                    )
                    row["host_device"] = attachment[0].host_device
                    row["detach_s"] = timed(lambda: agent.detach(domain, image, timeout=RPC_TIMEOUT))  # noqa: B023
                except Exception as exc:  # recorded, the run goes on
                    row["errors"].append(f"{type(exc).__name__}: {exc}"[:500])
                    stack_detach(agent, domain, image)
                row["leftovers"] = leftovers(agent, domain, image)
                results["rounds"].append(row)
                progress(
                    f"rbd-bench: round {i}{'' if counted else ' (warm-up)'} {name}: attach "
                    f"{row.get('attach_s', 0):.3f}s detach {row.get('detach_s', 0):.3f}s "
                    f"errors {len(row['errors'])} leftovers {row['leftovers']}"
                )
                (RESULTS / "rbd-guest-partial.json").write_text(json.dumps(results) + "\n")
        results["summary"] = summarize(results["rounds"])
    return results


def stack_detach(agent: Any, domain: str, image: str) -> None:
    """After a failed round: one more DetachVolume so the next round starts clean (its error ignored)."""
    try:
        agent.detach(domain, image, timeout=RPC_TIMEOUT)
    except Exception as exc:
        progress(f"rbd-bench: cleanup detach of {image} failed: {exc}")


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for key, argv in (("ceph", ["ceph", "--version"]), ("qemu", ["qemu-system-x86_64", "--version"])):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            out[key] = proc.stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out[key] = "?"
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    from bench.facts import stats  # noqa: PLC0415

    out: dict[str, Any] = {}
    for name in CONTENDERS:
        mine = [r for r in rounds if r["contender"] == name and r["counted"] and not r["errors"]]
        out[name] = {
            "attach": stats([r["attach_s"] for r in mine]),
            "detach": stats([r["detach_s"] for r in mine]),
            "errors": sum(len(r["errors"]) for r in rounds if r["contender"] == name),
            "leftovers": sum(sum(r["leftovers"].values()) for r in rounds if r["contender"] == name),
        }
    for op in ("attach", "detach"):
        for p in ("p50_ms", "p95_ms"):
            lib = out["librbd"][op][p]
            out[f"ratio_{op}_{p.removesuffix('_ms')}"] = round(out["krbd"][op][p] / lib, 2) if lib else None
    return out


def run_and_write(plan: Plan, work: Path, name: str, cluster: CephCluster | None = None) -> dict[str, Any]:
    started = time.time()
    try:
        results = run_plan(plan, work, cluster)
    except BaseException:
        (RESULTS / f"{name}.error.txt").write_text(traceback.format_exc())
        raise
    results["guest_seconds"] = round(time.time() - started, 1)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_rbd_guest_bench(plan: str, tmp_path: Path) -> None:
    """One plan (select it by node id: `bench/rbd_guest.py::test_rbd_guest_bench[full]`); results in
    $BLOCKWIRE_GUEST_RESULTS/rbd-guest-raw.json."""
    run_and_write(PLANS[plan], tmp_path, "rbd-guest-raw")


# --- the host side: boot the guest, write bench/results/ ------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    g, h, s, p = results["guest"], results["host_machine"], results["summary"], results["plan"]
    day = results["date"][:10]
    lines = [
        f"# RBD attach in the guest: krbd vs librbd, {day}",
        "",
        f"Host: {h['cores']} CPUs ({h['cpu']}), {h['memory_gib']} GiB, kernel {h['kernel']}, load before "
        f"{[round(x, 2) for x in h['load_before']]}, after {[round(x, 2) for x in h.get('load_after', [])]}.",
        f"Guest (QEMU TCG, tests/guest/image.py): {g['cores']} vCPUs, {g['memory_gib']} GiB, kernel "
        f"{g['kernel']}, Python {g['python']}, libvirt {g['libvirt']}, {g['qemu']}, {g['ceph']}; load "
        f"before {g['load_before']}. Ceph: a throwaway cluster (tests/ceph.py: 1 mon, 1 MemStore OSD) on "
        f"loopback in the guest (up in {results.get('cluster_start_s', '-')} s). One running no-OS "
        "`type='qemu'` "
        f"domain (virtio-scsi); {p['image_mib']} MiB images; guest time {results.get('guest_seconds')} s.",
        "",
        'krbd = blockwire-agent with `rbd_mode = "kernel"` (KernelRbdConnector: `rbd device map`, identity '
        'from sysfs, /dev/rbdN hot-plugged as a block disk); librbd = `rbd_mode = "qemu"` '
        "(QemuRbdConnector: identity through librados, private ceph secret, network disk opened by QEMU). "
        "AttachVolume / DetachVolume over gRPC, timed by the client. "
        f"{p['rounds']} rounds interleaved (the order alternates), "
        f"{'the first one a warm-up not counted' if p['warmup'] else 'no warm-up'}.",
        "",
        "| contender | attach n | attach p50 ms | attach p95 ms | attach max ms | detach p50 ms "
        "| detach p95 ms | detach max ms | errors | leftovers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in CONTENDERS:
        c = s[name]
        a, d = c["attach"], c["detach"]
        lines.append(
            f"| {name} | {a['n']} | {a['p50_ms']} | {a['p95_ms']} | {a['max_ms']} | {d['p50_ms']} | "
            f"{d['p95_ms']} | {d['max_ms']} | {c['errors']} | {c['leftovers']} |"
        )
    lines += [
        "",
        f"krbd / librbd: attach p50 {s['ratio_attach_p50']}x, p95 {s['ratio_attach_p95']}x; detach p50 "
        f"{s['ratio_detach_p50']}x, p95 {s['ratio_detach_p95']}x. Leftovers counted after every detach "
        "(kernel mappings, keyfiles, ceph secrets of the volume, journal records, disks in the domain).",
        "",
    ]
    errors = [(r["contender"], r["round"], e) for r in results["rounds"] for e in r["errors"]]
    if errors:
        lines += ["Errors:", "", *(f"* {c} round {i}: {e}" for c, i, e in errors), ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"rbd-guest-{results['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    return stem


def main(argv: list[str] | None = None) -> int:
    from bench.facts import host_facts  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m bench.rbd_guest", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="full")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--from-raw", type=Path, help="report on an earlier run's rbd-guest-raw.json")
    args = parser.parse_args(argv)
    if args.from_raw:
        raw = json.loads(args.from_raw.read_text())
        raw.setdefault("host_machine", host_facts())
    else:
        # Our own run directory: other guests booted meanwhile would prune the shared one's results.
        os.environ.setdefault("BLOCKWIRE_GUEST_RUNS", "/var/tmp/blockwire-bench")
        from tests.guest import image  # noqa: PLC0415

        missing = image.requirements_missing()
        if missing:
            print(f"bench: {missing}", file=sys.stderr)
            return 2
        machine = host_facts()
        run = image.run_guest(
            [f"bench/rbd_guest.py::test_rbd_guest_bench[{args.plan}]"], timeout=GUEST_TIMEOUT[args.plan]
        )
        raw_file = run.results / "rbd-guest-raw.json"
        print(f"bench: guest run {run.directory} rc={run.returncode} {run.seconds:.0f}s", file=sys.stderr)
        if not raw_file.exists():
            log = run.results / "pytest.log"
            print(log.read_text()[-5000:] if log.exists() else run.serial_tail(), file=sys.stderr)
            return 1
        raw = json.loads(raw_file.read_text())
        raw["host_machine"] = {**machine, "load_after": list(os.getloadavg())}
        raw_file.write_text(json.dumps(raw, indent=1) + "\n")
    stem = write(raw, args.out)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
