"""RBD attach benchmark on the host: blockwire-agent's AttachVolume over gRPC against the raw libvirt floor.

    sudo python bench/rbd_attach.py [--iterations 20] [--concurrent 32] [--out bench/results]

A throwaway Ceph cluster (tests/ceph.py, MemStore) and one running no-OS domain. Side by side, interleaved
(raw, blockwire, raw, blockwire, ...) so both see the same load:

* raw: the same disk XML the agent writes (hostagent.virt.diskxml, `<source protocol='rbd'>` with the
  monitors and a ceph secret defined once beforehand) hot-plugged with libvirt's attachDeviceFlags; its
  detach is detachDeviceFlags until the disk left the live XML;
* blockwire: AttachVolume with the connection info (identity checked through librados, a private
  libvirt secret per attachment, journal) and DetachVolume, over gRPC on the agent's unix socket.

Then `concurrent` images at once (one thread each) on the same domain, raw and blockwire. Writes
bench/results/rbd-attach-YYYY-MM-DD.{json,md} with p50/p95/max, the ratios and the machine.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
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
sys.path[:0] = [str(ROOT), str(ROOT / "clients")]

import libvirt  # noqa: E402
from lxml import etree  # noqa: E402

from bench.facts import host_facts, pct  # noqa: E402
from hostagent.virt.diskxml import Auth, DiskSpec, DriveAddress, NetHost, NetworkSource, disk_xml  # noqa: E402
from tests.ceph import CephCluster  # noqa: E402
from tests.host.rbd_rig import RbdAgent, create_image, rbd_info, running_domain, to_pb  # noqa: E402

RAW_SECRET = f"bench-raw/{uuid.uuid4().hex[:8]}"


def stats(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 1),
        "p95_ms": round(pct(ms, 95), 1),
        "max_ms": round(max(ms), 1) if ms else 0.0,
    }


class Raw:
    """The floor: libvirt alone, the agent's disk XML, one ceph secret defined beforehand."""

    def __init__(self, virt: libvirt.virConnect, cluster: CephCluster, user_name: str, key: str) -> None:
        self.virt = virt
        self.cluster = cluster
        self.user = user_name
        root = etree.Element("secret", ephemeral="no", private="yes")
        usage = etree.SubElement(root, "usage", type="ceph")
        etree.SubElement(usage, "name").text = RAW_SECRET
        self.secret = virt.secretDefineXML(etree.tostring(root, encoding="unicode"))
        self.secret.setValue(base64.b64decode(key))

    def xml(self, image: str, unit: int) -> str:
        host, _, port = self.cluster.monitors[0].rpartition(":")
        return disk_xml(
            DiskSpec(
                source=NetworkSource(
                    protocol="rbd",
                    name=f"{self.cluster.pool}/{image}",
                    hosts=(NetHost(host, int(port)),),
                    auth=Auth(self.user, "ceph", usage=RAW_SECRET),
                ),
                target_dev=f"sd{chr(ord('a') + unit // 26) if unit >= 26 else ''}{chr(ord('a') + unit % 26)}",
                serial=f"raw{unit}",
                address=DriveAddress(unit=unit),
            )
        )

    def attach(self, domain: str, xml: str) -> float:
        dom = self.virt.lookupByName(domain)
        began = time.perf_counter()
        dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return time.perf_counter() - began

    def detach(self, domain: str, xml: str, serial: str) -> float:
        dom = self.virt.lookupByName(domain)
        began = time.perf_counter()
        dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        deadline = began + 30
        while f"<serial>{serial}</serial>" in dom.XMLDesc(0):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"raw detach of {serial}: still there after 30s")
            time.sleep(0.002)
        return time.perf_counter() - began

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.secret.undefine()


def timed(call: Any) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host_facts(libvirt=libvirt.getVersion()),
    }
    virt = libvirt.open("qemu:///system")
    with tempfile.TemporaryDirectory(prefix="bwrbd-", dir="/tmp") as tmp, CephCluster() as cluster:
        user = cluster.create_user("bench-host")
        agent = RbdAgent(Path(tmp))
        agent.start()
        raw = Raw(virt, cluster, user.name, user.key)
        try:
            with running_domain(virt, "bw-rbd-bench") as dom:
                results["serial"] = serial(args.iterations, cluster, user, agent, raw, dom)
            with running_domain(virt, "bw-rbd-bench32") as dom:
                results["concurrent"] = concurrent(args.concurrent, cluster, user, agent, raw, dom)
        finally:
            raw.close()
            agent.stop()
    report(results, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))
    return 0


def serial(n: int, cluster: CephCluster, user: Any, agent: RbdAgent, raw: Raw, dom: str) -> dict[str, Any]:
    raw_image = "bench-raw"
    create_image(cluster, raw_image, 16)
    iid = create_image(cluster, "bench-bw", 16)
    times: dict[str, list[float]] = {"raw_attach": [], "raw_detach": [], "bw_attach": [], "bw_detach": []}
    xml = raw.xml(raw_image, 0)
    for i in range(n + 1):  # the first round warms up (QEMU loads librbd), not counted
        t_ra = raw.attach(dom, xml)
        t_rd = raw.detach(dom, xml, "raw0")
        info = to_pb(rbd_info(cluster, user, "bench-bw", "bench-bw", image_id_=iid))
        t_ba = timed(lambda: agent.attach(dom, info))  # noqa: B023 - called at once
        t_bd = timed(lambda: agent.detach(dom, "bench-bw"))
        if i:
            for k, v in (
                ("raw_attach", t_ra),
                ("raw_detach", t_rd),
                ("bw_attach", t_ba),
                ("bw_detach", t_bd),
            ):
                times[k].append(v)
    out = {k: stats(v) for k, v in times.items()}
    out["ratio_attach_p50"] = round(out["bw_attach"]["p50_ms"] / out["raw_attach"]["p50_ms"], 2)
    out["ratio_attach_p95"] = round(out["bw_attach"]["p95_ms"] / out["raw_attach"]["p95_ms"], 2)
    out["ratio_detach_p50"] = round(out["bw_detach"]["p50_ms"] / out["raw_detach"]["p50_ms"], 2)
    return out


def concurrent(
    n: int, cluster: CephCluster, user: Any, agent: RbdAgent, raw: Raw, dom: str
) -> dict[str, Any]:
    images = [f"bench-c{i}" for i in range(n)]
    ids = {img: create_image(cluster, img, 8) for img in images}
    xmls = [raw.xml(img, i) for i, img in enumerate(images)]
    lock = threading.Lock()
    per: dict[str, list[float]] = {"raw": [], "bw": []}

    def raw_one(i: int) -> None:
        t = raw.attach(dom, xmls[i])
        with lock:
            per["raw"].append(t)

    def bw_one(img: str) -> None:
        info = to_pb(rbd_info(cluster, user, img, img, image_id_=ids[img]))
        t = timed(lambda: agent.attach(dom, info, timeout=120))
        with lock:
            per["bw"].append(t)

    with ThreadPoolExecutor(n) as pool:
        began = time.perf_counter()
        list(pool.map(raw_one, range(n)))
        raw_wall = time.perf_counter() - began
    for i in range(n):
        raw.detach(dom, xmls[i], f"raw{i}")
    with ThreadPoolExecutor(n) as pool:
        began = time.perf_counter()
        list(pool.map(bw_one, images))
        bw_wall = time.perf_counter() - began
    attached = len(agent.journal())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda img: agent.detach(dom, img, timeout=120), images))
    return {
        "volumes": n,
        "raw": {**stats(per["raw"]), "wall_s": round(raw_wall, 3)},
        "bw": {**stats(per["bw"]), "wall_s": round(bw_wall, 3), "attached": attached},
        "ratio_wall": round(bw_wall / raw_wall, 2),
        "left_after_detach": len(agent.journal()),
    }


def report(results: dict[str, Any], out: Path) -> None:
    day = results["date"][:10]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rbd-attach-{day}.json").write_text(json.dumps(results, indent=2) + "\n")
    m, s, c = results["machine"], results["serial"], results["concurrent"]
    lines = [
        f"# RBD attach benchmark, {day}",
        "",
        f"Machine: {m['cores']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, Python "
        f"{m['python']}, libvirt {m['libvirt']}, load before {m['load_before']}. Ceph: a throwaway cluster "
        "(tests/ceph.py: 1 mon, 1 MemStore OSD) on loopback; one running no-OS kvm domain (virtio-scsi).",
        "",
        "raw = libvirt attachDeviceFlags of the same rbd network disk XML, secret defined beforehand; "
        "bw = blockwire-agent AttachVolume over gRPC (unix socket) with the connection info: librados "
        "identity check, private ceph secret, journal, hot-plug. Interleaved, first round not counted.",
        "",
        "| one volume at a time | n | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for k in ("raw_attach", "bw_attach", "raw_detach", "bw_detach"):
        lines.append(f"| {k} | {s[k]['n']} | {s[k]['p50_ms']} | {s[k]['p95_ms']} | {s[k]['max_ms']} |")
    lines += [
        "",
        f"AttachVolume / floor: p50 {s['ratio_attach_p50']}x, p95 {s['ratio_attach_p95']}x (goal <= 2x); "
        f"DetachVolume / floor p50 {s['ratio_detach_p50']}x.",
        "",
        f"| {c['volumes']} attaches at once | p50 ms | p95 ms | max ms | wall s |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {c[k]['p50_ms']} | {c[k]['p95_ms']} | {c[k]['max_ms']} | {c[k]['wall_s']} |"
            for k in ("raw", "bw")
        ),
        "",
        f"Wall ratio {c['ratio_wall']}x; {c['bw']['attached']} of {c['volumes']} attached, "
        f"{c['left_after_detach']} journal records left after detaching them all.",
        "",
    ]
    (out / f"rbd-attach-{day}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
