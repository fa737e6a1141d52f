"""A boot storm on the kernel path, inside the guest: many volumes attached at once to several domains.

Runs inside the guest tier's QEMU guest (kernel iSCSI, tgtd, libvirtd, no-OS `type='qemu'` domains);
driven from the host by `python -m bench.attach --plan storm` (or `storm-small`). One tgtd, one
`blockwire-storage` (file backend, tgt exporter, CHAP, per-initiator ACL) and `blockwire-agent`
(iscsi_mode kernel), the environment of bench/attach_guest.py. `volumes` volumes are exported once;
then, per contender, every volume is attached at once (one thread each) to `domains` running domains
(volume i to domain i mod domains), and after all are attached, all are detached at once:

* floor: the raw tools (`iscsiadm` node new/update/login, the udev link; `multipath` where two paths),
  then libvirt's attachDeviceFlags of the block device (a `bus='scsi'` disk); detach: detachDeviceFlags
  until the disk is gone from the live XML, then logout and node delete;
* os-brick: os-brick's ISCSIConnector (7.x, in-process) connect_volume, then the same attachDeviceFlags;
  detach the same, then disconnect_volume;
* bw-e2e: AttachVolume / DetachVolume over gRPC (identity checked, journal, storage's attachment).

Per attach and per detach: p50/p95/p99 (seconds, from the call to its return), and each batch's wall
time; what is left after each contender (sessions, node records, disks, maps, domain disks).
Writes `storm-raw.json` into $BLOCKWIRE_GUEST_RESULTS.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.attach_guest import (
    RESULTS,
    BwE2e,
    Env,
    Floor,
    OsBrick,
    environment,
    progress,
    scrub,
    set_find_multipaths,
    single_path,
    versions,
)
from bench.facts import summary, unplug_disk
from tests.guest.inside import kernel
from tests.host.daemons import Tgtd
from tests.rig import domain_xml

pytestmark = pytest.mark.skipif(os.environ.get("BLOCKWIRE_IN_GUEST") != "1", reason="inside the guest only")

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class StormPlan:
    volumes: int
    domains: int
    paths: int = 1
    contenders: tuple[str, ...] = ("floor", "os-brick", "bw-e2e")


PLANS = {
    # os-brick is left out of the 64: its host-wide lock makes its storm 64 connects one after another
    # (the 32-volume rows of the attach plans measure that), which alone would take longer than the rest.
    "storm": StormPlan(volumes=64, domains=8, contenders=("floor", "bw-e2e")),
    "storm-osbrick": StormPlan(volumes=32, domains=8),
    # The same shape, small: a check that the storm machinery works (minutes, not half an hour).
    "storm-small": StormPlan(volumes=8, domains=2, contenders=("floor", "bw-e2e")),
}


class Hotplug:
    """libvirt's hot-plug of a host block device as a raw caller writes it: a `bus='scsi'` disk."""

    def __init__(self, virt: Any) -> None:
        self.virt = virt

    @staticmethod
    def xml(device: str, slot: int) -> str:
        return (
            "<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/>"
            f"<source dev='{device}'/><target dev='sd{LETTERS[slot]}' bus='scsi'/></disk>"
        )

    def attach(self, domain: str, device: str, slot: int) -> str:
        import libvirt  # noqa: PLC0415

        xml = self.xml(device, slot)
        self.virt.lookupByName(domain).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return xml

    def detach(self, domain: str, xml: str, device: str, timeout: float = 300) -> None:
        dom = self.virt.lookupByName(domain)
        unplug_disk(dom, xml, f"dev='{device}'", f"{device} in {domain}", timeout, poll=0.01)


class RawStorm:
    """A connector (the floor's tools or os-brick) plus the raw hot-plug: what a caller without blockwire
    does for one attach."""

    def __init__(self, connector: Any, hotplug: Hotplug) -> None:
        self.connector = connector
        self.hotplug = hotplug
        self.name = connector.name
        self.held: dict[str, tuple[Any, str, str]] = {}  # volume -> (connector's device, device, xml)

    def attach(self, domain: str, slot: int, info: Any) -> None:
        got = self.connector.connect(info)
        device = got["path"] if isinstance(got, dict) else str(got)
        device = str(Path(device).resolve())
        self.held[info.volume_id] = (got, device, self.hotplug.attach(domain, device, slot))

    def detach(self, domain: str, info: Any) -> None:
        got, device, xml = self.held.pop(info.volume_id)
        self.hotplug.detach(domain, xml, device)
        self.connector.disconnect(info, got)


class E2eStorm:
    name = "bw-e2e"

    def __init__(self, env: Env) -> None:
        self.e2e = BwE2e(env)

    def attach(self, domain: str, slot: int, info: Any) -> None:
        self.e2e.env.agent_client.attach_volume(domain, connection_info=info, disk=self.e2e.disk, timeout=900)

    def detach(self, domain: str, info: Any) -> None:
        self.e2e.env.agent_client.detach_volume(domain, info.volume_id, timeout=900)


@contextlib.contextmanager
def domains(env: Env, n: int) -> Iterator[list[str]]:
    """`n` running no-OS domains (two virtio-scsi controllers: libvirt puts seven disks on one)."""
    import libvirt  # noqa: PLC0415

    made: list[Any] = []
    try:
        for _ in range(n):
            name = f"bw-storm-{uuid.uuid4().hex[:6]}"
            xml = domain_xml(name, virt_type="qemu", memory_mib=32, scsi_controllers=2)
            made.append(env.virt.createXML(xml, 0))
        yield [d.name() for d in made]
    finally:
        for d in made:
            with contextlib.suppress(libvirt.libvirtError):
                d.destroy()


def domain_disks(env: Env, names: list[str]) -> dict[str, int]:
    counts = {n: env.virt.lookupByName(n).XMLDesc(0).count("<disk ") for n in names}
    return {n: c for n, c in counts.items() if c}


def storm(contender: Any, infos: list[Any], doms: list[str]) -> dict[str, Any]:
    n = len(infos)
    placed = [(doms[i % len(doms)], i // len(doms)) for i in range(n)]
    times: dict[str, list[float]] = {"attach": [], "detach": []}
    walls: dict[str, float] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def phase(op: str, fn: Callable[[int], None]) -> None:
        def one(i: int) -> None:
            began = time.monotonic()
            try:
                fn(i)
            except Exception as exc:  # counted and reported
                with lock:
                    errors.append(f"{op} {i}: {type(exc).__name__}: {exc}"[:400])
                return
            with lock:
                times[op].append(time.monotonic() - began)

        began = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, range(n)))
        walls[op] = time.monotonic() - began

    phase("attach", lambda i: contender.attach(placed[i][0], placed[i][1], infos[i]))
    phase("detach", lambda i: contender.detach(placed[i][0], infos[i]))
    secrets = [i.transport.chap.password.reveal() for i in infos if i.transport.chap is not None]
    return {
        "contender": contender.name,
        "attach": {**summary(times["attach"], (50, 95, 99)), "wall": round(walls["attach"], 3)},
        "detach": {**summary(times["detach"], (50, 95, 99)), "wall": round(walls["detach"], 3)},
        "errors": [scrub(e, secrets) for e in errors[:20]],
    }


def run_storm(plan: StormPlan, work: Path, tgtd: Tgtd | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {
        "plan": {"volumes": plan.volumes, "domains": plan.domains, "paths": plan.paths},
        "versions": versions(),
        "rows": [],
    }
    started = time.time()
    multipath = plan.paths == 2
    with contextlib.ExitStack() as stack:
        stack.callback(set_find_multipaths, "no")
        set_find_multipaths("no" if multipath else "strict")
        env = stack.enter_context(environment(work, plan.volumes, tgtd))
        doms = stack.enter_context(domains(env, plan.domains))
        infos = [i if multipath else single_path(i) for i in env.infos]
        hotplug = Hotplug(env.virt)
        for name in plan.contenders:
            kernel.force_cleanup()
            if name == "floor":
                contender: Any = RawStorm(Floor(multipath), hotplug)
            elif name == "os-brick":
                contender = RawStorm(OsBrick(multipath, work / "locks"), hotplug)
            else:
                contender = E2eStorm(env)
            progress(f"storm: {plan.volumes} volumes on {plan.domains} domains: {name}")
            row = storm(contender, infos, doms)
            kernel.settle()
            left: dict[str, Any] = dict(kernel.leftovers())
            disks = domain_disks(env, doms)
            if disks:
                left["domain disks"] = disks
            row["leftovers"] = left
            progress(
                f"storm:   attach wall {row['attach']['wall']:.1f}s p50 {row['attach']['p50']:.2f}s, "
                f"detach wall {row['detach']['wall']:.1f}s, errors {len(row['errors'])}, leftovers {left}"
            )
            results["rows"].append(row)
            (RESULTS / "storm-partial.json").write_text(json.dumps(results) + "\n")
            if left and name == "bw-e2e":
                with contextlib.suppress(Exception):
                    for i, info in enumerate(infos):
                        env.agent_client.detach_volume(doms[i % len(doms)], info.volume_id, force=True)
            if name == "bw-e2e":
                set_find_multipaths("no" if multipath else "strict")
    results["guest_seconds"] = round(time.time() - started, 1)
    return results


@pytest.mark.timeout(3300)
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_storm_bench(plan: str, tmp_path: Path) -> None:
    """One plan (select it by node id: `...::test_storm_bench[storm]`); results in
    $BLOCKWIRE_GUEST_RESULTS/storm-raw.json."""
    results = run_storm(PLANS[plan], tmp_path)
    (RESULTS / "storm-raw.json").write_text(json.dumps(results, indent=1) + "\n")
    assert results["rows"], "no contender ran"
