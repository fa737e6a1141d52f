"""Encrypted vs plain volumes through QEMU: create, attach and detach time, and sequential I/O, side by
side in one run on the same daemons, tgtd, libvirtd and domain.

    sudo python bench/encryption.py [--rounds 5] [--size-mib 64] [--io-mib 32] [--out bench/results]

The real stack of the host tier (tests/fakes/daemon_rig.Rig: blockwire-storage with the embedded key
manager + tgtd, blockwire-agent + libvirtd + QEMU's iSCSI initiator). Each round creates one plain and one
encrypted volume (LUKS1 aes-xts-plain64, 512-bit key), in alternating order, attaches each to a running
no-OS domain, writes then reads `io-mib` MiB sequentially through QEMU's block layer (HMP qemu-io: one
request each way, with a pattern, timed by QEMU), detaches and
deletes it. Writes bench/results/encryption-YYYY-MM-DD.{json,md} with medians and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from bench.facts import host_facts  # noqa: E402
from blockwire.v1 import storage_pb2 as spb  # noqa: E402
from tests.fakes.daemon_rig import Rig, define_domain, remove_domain  # noqa: E402
from tests.host.daemons import (  # noqa: E402
    Started,
    Tgtd,
    ensure_libvirtd,
    ensure_udevd,
    free_port,
    free_tgt_control_port,
    need_root,
)
from tests.rig import hmp_qemu_io  # noqa: E402

MIB = 1 << 20
_RATE = re.compile(r"\(([\d.]+) (KiB|MiB|GiB)/sec")


def _mib_per_s(out: str) -> float:
    """QEMU's qemu-io timing line: '32 MiB, 32 ops; 00.12 sec (265.3 MiB/sec and 265.3 ops/sec)'."""
    m = _RATE.findall(out)
    if not m:
        raise RuntimeError(f"no qemu-io timing in: {out[-400:]}")
    value, unit = m[-1]
    return float(value) * {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}[unit]


def one(rig: Rig, domain: str, encrypted: bool, size_mib: int, io_mib: int) -> dict[str, float]:
    t0 = time.monotonic()
    v = rig.storage.CreateVolume(
        spb.CreateVolumeRequest(
            name=f"bench-{os.urandom(4).hex()}",
            size_bytes=size_mib * MIB,
            backend="file",
            encrypted=encrypted,
        ),
        timeout=120,
    ).volume
    t1 = time.monotonic()
    rig.volume_ids.add(v.id)
    a = rig.attach(domain, v.id)
    t2 = time.monotonic()
    w = hmp_qemu_io(domain, a.target_dev, f"write -P 0x5a 0 {io_mib}M")
    r = hmp_qemu_io(domain, a.target_dev, f"read -P 0x5a 0 {io_mib}M")
    if "Pattern verification failed" in r:
        raise RuntimeError("read back another pattern")
    t3 = time.monotonic()
    rig.detach(domain, v.id)
    t4 = time.monotonic()
    rig.delete_volume(v.id)
    return {
        "create_s": t1 - t0,
        "attach_s": t2 - t1,
        "detach_s": t4 - t3,
        "write_mib_s": _mib_per_s(w),
        "read_mib_s": _mib_per_s(r),
    }


def machine_facts() -> dict[str, Any]:
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=False).stdout
    return host_facts(
        cpu_aes_ni="aes" in Path("/proc/cpuinfo").read_text().split(),
        qemu=qemu.splitlines()[0] if qemu else "",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--io-mib", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.io_mib <= args.size_mib <= 1024:
        raise SystemExit("--rounds 1-50, --io-mib 1..--size-mib, --size-mib at most 1024")
    need_root()
    started = Started()
    ensure_udevd(started)
    ensure_libvirtd(started)
    hosts = ("127.0.0.1", "127.0.0.2")
    port = free_port(hosts)
    tgtd = Tgtd(portals=tuple(f"{h}:{port}" for h in hosts), control_port=free_tgt_control_port())
    tgtd.start()
    results: dict[str, list[dict[str, float]]] = {"plain": [], "encrypted": []}
    facts = machine_facts()
    try:
        with tempfile.TemporaryDirectory(prefix="bw-crypt-bench-") as tmp:
            work = Path(tmp)
            keys = f'\n[keys]\nkind = "embedded"\nmaster_key_file = "{work / "master.key"}"\n'
            virt = libvirt.open("qemu:///system")
            with Rig(work=work, tgtd=tgtd, virt=virt, storage_config=keys).running() as rig:
                domain = define_domain(virt, "bw-bench-crypt")
                try:
                    one(rig, domain, False, args.size_mib, args.io_mib)  # warm-up, not counted
                    for r in range(args.rounds):
                        order = (False, True) if r % 2 == 0 else (True, False)
                        for enc in order:
                            results["encrypted" if enc else "plain"].append(
                                one(rig, domain, enc, args.size_mib, args.io_mib)
                            )
                finally:
                    remove_domain(virt, domain)
            virt.close()
    finally:
        tgtd.stop()
        started.stop()
    keys_ = ("create_s", "attach_s", "detach_s", "write_mib_s", "read_mib_s")
    med = {kind: {k: statistics.median(x[k] for x in runs) for k in keys_} for kind, runs in results.items()}
    ratio = {k: med["encrypted"][k] / med["plain"][k] for k in keys_}
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": facts,
        "params": vars(args) | {"out": str(args.out)},
        "median": med,
        "ratio_encrypted_to_plain": ratio,
        "runs": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"encryption-{day}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"# Encrypted vs plain volumes through QEMU ({day})",
        "",
        f"Machine: {facts['cpu']} ({facts['cores']} cores, AES-NI {facts['cpu_aes_ni']}), kernel "
        f"{facts['kernel']}, {facts['qemu']}; load before {facts['load_before']}.",
        f"{args.rounds} rounds, alternating order; {args.size_mib} MiB volumes (file backend, tgt, QEMU "
        f"iSCSI initiator), {args.io_mib} MiB sequential write then read through QEMU (HMP qemu-io).",
        "",
        "| median | plain | encrypted (LUKS1 aes-xts-plain64 512) | encrypted / plain |",
        "|---|---|---|---|",
    ]
    for k in keys_:
        lines.append(f"| {k} | {med['plain'][k]:.3f} | {med['encrypted'][k]:.3f} | {ratio[k]:.2f} |")
    (args.out / f"encryption-{day}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
