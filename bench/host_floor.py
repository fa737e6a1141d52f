"""Host-tier attach/detach against the raw floor: QEMU-native iSCSI (CHAP, tgtd) or RBD, side by side.

    sudo python -m bench.host_floor [--transport iscsi|rbd] [--cycles 15] [--storm 64 --domains 8]
        [--out bench/results]

One tgtd of our own (tests/host/daemons.py), the host's libvirtd, the reliability rig's real daemons
(tests/fakes/daemon_rig.py: blockwire-storage with the file backend and the tgt exporter, CHAP and a
per-initiator ACL; blockwire-agent with iscsi_mode qemu) and one running no-OS kvm domain. Each cycle,
interleaved (the order rotates each cycle; the first cycle warms up and is not counted):

* floor: the same work with raw calls: tgtadm new target, new LUN, LUN identity (scsi_id, scsi_sn), CHAP
  account and its bind, initiator ACL, a private libvirt secret (usage iscsi), attachDeviceFlags of the
  iSCSI network disk with auth (the XML from hostagent.virt.diskxml, as the agent writes it); detach:
  detachDeviceFlags until libvirt's DEVICE_REMOVED event, secret undefine, tgtadm delete target, delete
  account.
* grpc: AttachVolume / DetachVolume on blockwire-agent's unix socket (the agent calls blockwire-storage
  over gRPC: CreateAttachment, CompleteAttachment, DeleteAttachment).
* lib: the same through the embeddable library (hostagent.wiring.build_agent in this process, no agent
  gRPC; storage still over gRPC), its steps timed by a StepObserver (the agent's own step timing).

`--transport rbd`: a throwaway Ceph cluster of the bench's own (tests/ceph.py: 1 mon, 1 MemStore OSD,
stopped by pid), storage's rbd backend on it (hosts get the backend's cephx user and key), the agent with
rbd_mode qemu. The floor is what an RBD attach must do, with raw calls on one librados connection kept for
the run: the image's id read through librbd (open the pool, open the image read-only, `id()`, close: the
identity the agent checks) and compared with the id the image was created with, a private libvirt secret
(usage ceph) holding the key, attachDeviceFlags of the rbd network disk (hostagent.virt.diskxml, as the
agent writes it); detach: detachDeviceFlags until the disk is gone, secret undefine. The profile's
rbd_identity is the agent's read of the image through librados (hostagent.host.ceph).

`--storm N --domains D`: N volumes at once (one thread each) on D running domains, floor and grpc, per
attach p50/p95/p99 and the batch's wall time, then all detached (also at once) and what is left counted:
tgtd targets and accounts, libvirt secrets, domains' disks, journal records, storage's attachment rows.

Writes bench/results/host-floor[-rbd]-YYYY-MM-DD.{json,md} with the machine, its load, ratios and the
profile.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "clients")]

import libvirt  # noqa: E402
from lxml import etree  # noqa: E402

from bench.facts import host_facts, stats, unplug_disk  # noqa: E402
from hostagent.virt.diskxml import Auth, DiskSpec, DriveAddress, NetHost, NetworkSource, disk_xml  # noqa: E402
from tests.ceph import CephCluster, CephUser  # noqa: E402
from tests.fakes.daemon_rig import Rig, define_domain, remove_domain  # noqa: E402
from tests.host.daemons import Started, Tgtd, ensure_libvirtd, free_port, free_tgt_control_port  # noqa: E402

PORTAL_HOSTS = ("127.0.0.1",)
MIB = 1 << 20
RAW_PREFIX = "bench-floor"
METRICS: dict[str, str] = {}  # daemon -> its metrics endpoint (address:port)


class Steps:
    """A StepObserver that sums each step's seconds per operation (the library contender's profile)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: dict[str, float] = defaultdict(float)

    def observe(self, step: str, seconds: float) -> None:
        with self.lock:
            self.current[step] += seconds

    def take(self) -> dict[str, float]:
        with self.lock:
            out, self.current = dict(self.current), defaultdict(float)
        return out


class RawFloor(Protocol):
    """A transport's raw floor: `new` makes (untimed) what one attach needs, `attach` and `detach` time
    the raw calls; `usages` are the libvirt secrets it defined; `cleanup` removes what a failed run left."""

    usages: set[str]

    def new(self, unit: int) -> Any: ...

    def attach(self, domain: str, t: Any, unit: int) -> float: ...

    def detach(self, domain: str, t: Any, timeout: float = 30) -> float: ...

    def cleanup(self) -> None: ...


@dataclass
class RawTarget:
    """One floor export: its tgt tid, names, backing file and the disk's XML."""

    tid: int
    iqn: str
    user: str
    password: str
    backing: Path
    usage: str
    xml: str = ""
    serial: str = ""


@dataclass
class Floor:
    """The raw floor: tgtadm and libvirt calls, nothing else."""

    tgtd: Tgtd
    lv: Callable[[], libvirt.virConnect]  # the connection (opened again after a libvirtd restart)
    work: Path
    initiator: str
    next_tid: int = 5000
    lock: threading.Lock = field(default_factory=threading.Lock)
    usages: set[str] = field(default_factory=set)  # the secrets this run defined

    def adm(self, *args: str) -> None:
        r = self.tgtd.adm(*args, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args[:4])}: exit {r.returncode}: {r.stderr.strip()}")

    def new(self, unit: int) -> RawTarget:
        with self.lock:
            tid = self.next_tid
            self.next_tid += 1
        backing = self.work / f"floor-{tid}.img"
        with open(backing, "wb") as f:
            f.truncate(8 * MIB)
        tag = uuid.uuid4().hex[:12]
        return RawTarget(
            tid=tid,
            iqn=f"iqn.2026-01.io.blockwire.{RAW_PREFIX}:{tag}",
            user=f"bf-{tag}",
            password=uuid.uuid4().hex[:16],
            backing=backing,
            usage=f"{RAW_PREFIX}/{tag}",
            serial=f"bf{tag}",
        )

    def disk(self, t: RawTarget, host: str, port: int, unit: int) -> str:
        return disk_xml(
            DiskSpec(
                source=NetworkSource(
                    protocol="iscsi",
                    name=f"{t.iqn}/1",
                    hosts=(NetHost(host, port),),
                    initiator_iqn=self.initiator,
                    auth=Auth(t.user, "iscsi", usage=t.usage),
                ),
                target_dev=f"sd{chr(ord('a') + unit // 26) if unit >= 26 else ''}{chr(ord('a') + unit % 26)}",
                serial=t.serial,
                address=DriveAddress(unit=unit),
            )
        )

    def attach(self, domain: str, t: RawTarget, unit: int) -> float:
        host, _, port = self.tgtd.portals[0].rpartition(":")
        wwn = "6" + uuid.uuid4().hex[:31]
        began = time.perf_counter()
        tid = str(t.tid)
        self.adm("--op", "new", "--mode", "target", "--tid", tid, "-T", t.iqn)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1", "--bstype", "rdwr",
                 "-b", str(t.backing))  # fmt: skip
        self.adm("--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", "1",
                 "--params", f"scsi_id={wwn},scsi_sn={t.serial},readonly=0")  # fmt: skip
        self.adm("--op", "new", "--mode", "account", "--user", t.user, "--password", t.password)
        self.adm("--op", "bind", "--mode", "account", "--tid", tid, "--user", t.user)
        self.adm("--op", "bind", "--mode", "target", "--tid", tid, "--initiator-name", self.initiator)
        root = etree.Element("secret", ephemeral="no", private="yes")
        usage = etree.SubElement(root, "usage", type="iscsi")
        etree.SubElement(usage, "target").text = t.usage
        self.usages.add(t.usage)
        secret = self.lv().secretDefineXML(etree.tostring(root, encoding="unicode"))
        secret.setValue(t.password.encode())
        t.xml = self.disk(t, host, int(port), unit)
        self.lv().lookupByName(domain).attachDeviceFlags(t.xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return time.perf_counter() - began

    def detach(self, domain: str, t: RawTarget, timeout: float = 30) -> float:
        began = time.perf_counter()
        dom = self.lv().lookupByName(domain)
        unplug_disk(dom, t.xml, f"<serial>{t.serial}</serial>", f"floor detach of {t.serial}", timeout)
        self.lv().secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, t.usage).undefine()
        self.adm("--op", "delete", "--mode", "target", "--tid", str(t.tid), "--force")
        self.adm("--op", "delete", "--mode", "account", "--user", t.user)
        return time.perf_counter() - began

    def cleanup(self) -> None:
        """Whatever a failed floor run left: our secrets, targets and accounts (ours by prefix only)."""
        for s in self.lv().listAllSecrets():
            if (s.usageID() or "").startswith(RAW_PREFIX + "/"):
                with contextlib.suppress(libvirt.libvirtError):
                    s.undefine()
        out = self.tgtd.adm("--op", "show", "--mode", "target", check=False).stdout
        for m in re.finditer(r"^Target (\d+): (\S+)$", out, re.M):
            if f".{RAW_PREFIX}:" in m.group(2):
                self.tgtd.adm(
                    "--op", "delete", "--mode", "target", "--tid", m.group(1), "--force", check=False
                )
        acc = self.tgtd.adm("--op", "show", "--mode", "account", check=False).stdout
        for user in re.findall(r"^\s+(bf-[0-9a-f]+)$", acc, re.M):
            self.tgtd.adm("--op", "delete", "--mode", "account", "--user", user, check=False)


@dataclass
class RawImage:
    """One RBD floor volume: an image, the id it was created with, its secret's usage and disk XML."""

    name: str
    image_id: str
    usage: str
    serial: str
    xml: str = ""


class RbdFloor:
    """The raw RBD floor: librbd and libvirt calls, nothing else, on one librados connection kept for the
    run (what an attach must do; the agent keeps its connections too)."""

    def __init__(
        self, cluster: CephCluster, user: CephUser, lv: Callable[[], libvirt.virConnect], pool: str = ""
    ) -> None:
        import rados  # noqa: PLC0415 - Debian's bindings, linked into the venv by scripts/setup
        import rbd  # noqa: PLC0415

        self.rbd = rbd
        self.cluster, self.user, self.lv = cluster, user, lv
        self.pool = pool or cluster.pool
        self.usages: set[str] = set()  # the secrets this run defined
        self.steps = Steps()  # its own steps (rbd_identity, secret, hotplug; unplug, secret), as the agent's
        conf = {"mon_host": cluster.mon_host, "key": user.key, "admin_socket": "", "log_file": ""}
        self.rados = rados.Rados(rados_id=user.name, conffile=None, conf=conf)
        self.rados.connect(timeout=15)
        self.ioctx = self.rados.open_ioctx(self.pool)  # creating images (not timed)

    def new(self, unit: int) -> RawImage:
        tag = uuid.uuid4().hex[:12]
        name = f"{RAW_PREFIX}-{tag}"
        self.rbd.RBD().create(self.ioctx, name, 8 * MIB)
        with self.rbd.Image(self.ioctx, name, read_only=True) as img:
            image_id = str(img.id())
        return RawImage(name=name, image_id=image_id, usage=f"{RAW_PREFIX}/{tag}", serial=f"bf{tag}")

    def disk(self, t: RawImage, unit: int) -> str:
        return disk_xml(
            DiskSpec(
                source=NetworkSource(
                    protocol="rbd",
                    name=f"{self.pool}/{t.name}",
                    hosts=tuple(
                        NetHost(h, int(p)) for h, _, p in (m.rpartition(":") for m in self.cluster.monitors)
                    ),
                    auth=Auth(self.user.name, "ceph", usage=t.usage),
                ),
                target_dev=f"sd{chr(ord('a') + unit // 26) if unit >= 26 else ''}{chr(ord('a') + unit % 26)}",
                serial=t.serial,
                address=DriveAddress(unit=unit),
            )
        )

    def attach(self, domain: str, t: RawImage, unit: int) -> float:
        began = time.perf_counter()
        ioctx = self.rados.open_ioctx(self.pool)
        try:
            with self.rbd.Image(ioctx, t.name, read_only=True) as img:
                found = str(img.id())
        finally:
            ioctx.close()
        if found != t.image_id or not self.rados.get_fsid():
            raise RuntimeError(f"floor attach of {t.name}: image id {found}, created as {t.image_id}")
        t1 = time.perf_counter()
        root = etree.Element("secret", ephemeral="no", private="yes")
        usage = etree.SubElement(root, "usage", type="ceph")
        etree.SubElement(usage, "name").text = t.usage
        self.usages.add(t.usage)
        secret = self.lv().secretDefineXML(etree.tostring(root, encoding="unicode"))
        secret.setValue(base64.b64decode(self.user.key))
        t.xml = self.disk(t, unit)
        t2 = time.perf_counter()
        self.lv().lookupByName(domain).attachDeviceFlags(t.xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        end = time.perf_counter()
        for step, seconds in (("rbd_identity", t1 - began), ("secret", t2 - t1), ("hotplug", end - t2)):
            self.steps.observe(step, seconds)
        return end - began

    def detach(self, domain: str, t: RawImage, timeout: float = 30) -> float:
        began = time.perf_counter()
        dom = self.lv().lookupByName(domain)
        unplug_disk(dom, t.xml, f"<serial>{t.serial}</serial>", f"floor detach of {t.serial}", timeout)
        t1 = time.perf_counter()
        self.lv().secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, t.usage).undefine()
        end = time.perf_counter()
        self.steps.observe("unplug", t1 - began)
        self.steps.observe("secret", end - t1)
        return end - began

    def cleanup(self) -> None:
        """Whatever a failed floor run left: our secrets (ours by prefix only); the connection closed
        (the images go with the throwaway cluster)."""
        for s in self.lv().listAllSecrets():
            if (s.usageID() or "").startswith(RAW_PREFIX + "/"):
                with contextlib.suppress(libvirt.libvirtError):
                    s.undefine()
        with contextlib.suppress(Exception):
            self.ioctx.close()
            self.rados.shutdown()


def rbd_backend(rig: Rig, cluster: CephCluster, user: CephUser) -> Rig:
    """Gives `rig`'s storage an rbd backend "ceph" on `cluster` as `user` (before the daemons start);
    its volumes are then created there. Hosts get the backend's user and key."""
    rig.storage_config += f"""
[[backends]]
name = "ceph"
kind = "rbd"
monitors = ["{cluster.monitors[0]}"]
pool = "{cluster.pool}"
user = "{user.name}"
keyring = "{user.keyring}"
connect_timeout = 10.0
op_timeout = 30.0
capacity_bytes = {64 << 30}
"""
    rig.backend = "ceph"
    return rig


def timed(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


# The library's parts the agent does not time itself (its StepObserver covers storage, the commands, udev,
# the hot-plug and the unplug): timed here by wrapping the instance's methods, outermost call only.
PROFILED = {
    "journal": ("put", "delete"),
    "journal_read": ("get", "of_volume", "all"),
}
PROFILED_HYPERVISOR = {
    "secret": ("define_secret", "undefine_secret", "secret_exists"),
    "libvirt_read": ("lookup", "disks", "running_disks", "defined_disks"),
    "": ("attach_disk", "detach_disk"),  # timed by the agent (hotplug, unplug): only hides nested reads
}


def profile_methods(obj: Any, groups: dict[str, tuple[str, ...]], steps: Steps) -> None:
    depth = threading.local()

    def wrap(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kw: Any) -> Any:
            outer = not getattr(depth, "n", 0)
            depth.n = getattr(depth, "n", 0) + 1
            began = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                depth.n -= 1
                if outer and step:
                    steps.observe(step, time.perf_counter() - began)

        return timed_call

    for step, names in groups.items():
        for name in names:
            setattr(obj, name, wrap(step, getattr(obj, name)))


def library_agent(rig: Rig, steps: Steps) -> tuple[Any, Any, Any]:
    """hostagent as a library in this process: the rig's agent config with its own state dir (so its
    own initiator name and journal), storage over gRPC."""
    from hostagent.config import load_config  # noqa: PLC0415
    from hostagent.rpc.storage_client import GrpcStorageApi, channel_for  # noqa: PLC0415
    from hostagent.wiring import build_agent  # noqa: PLC0415

    text = (rig.work / "agent.toml").read_text().replace(str(rig.state), str(rig.work / "lib-state"))
    text = text.replace(str(rig.work / "agent.sock"), str(rig.work / "lib-agent.sock"))
    (rig.work / "lib-agent.toml").write_text(text)
    config = load_config(rig.work / "lib-agent.toml")
    channel = channel_for(f"unix://{rig.work / 'storage.sock'}")
    agent, hypervisor = build_agent(config, GrpcStorageApi(channel, timeout=30), steps)
    profile_methods(agent.journal, PROFILED, steps)
    profile_methods(hypervisor, PROFILED_HYPERVISOR, steps)
    return agent, hypervisor, channel


def serial_cycles(n: int, rig: Rig, floor: RawFloor, dom: str) -> dict[str, Any]:
    steps = Steps()
    agent, hypervisor, channel = library_agent(rig, steps)
    vol_grpc = rig.create_volume().id
    vol_lib = rig.create_volume().id
    times: dict[str, list[float]] = defaultdict(list)
    profile_attach: list[dict[str, float]] = []
    profile_detach: list[dict[str, float]] = []
    floor_attach: list[dict[str, float]] = []
    floor_detach: list[dict[str, float]] = []
    grpc_steps: list[tuple[dict[str, Any], ...]] = []
    try:
        for i in range(n + 1):

            def floor_cycle() -> tuple[float, float]:
                t = floor.new(0)
                own = getattr(floor, "steps", None)  # a floor that times its own steps
                if own is not None:
                    own.take()
                a = floor.attach(dom, t, 0)
                sa = own.take() if own is not None else {}
                d = floor.detach(dom, t)
                if own is not None:
                    floor_attach.append({**sa, "total": a})
                    floor_detach.append({**own.take(), "total": d})
                return a, d

            def grpc_cycle() -> tuple[float, float]:
                s0 = {name: scrape(listen) for name, listen in METRICS.items()}
                a = timed(lambda: rig.attach(dom, vol_grpc))
                s1 = {name: scrape(listen) for name, listen in METRICS.items()}
                d = timed(lambda: rig.detach(dom, vol_grpc))
                s2 = {name: scrape(listen) for name, listen in METRICS.items()}
                grpc_steps.append((s0, s1, s2))
                return a, d

            def lib_cycle() -> tuple[float, float]:
                steps.take()
                a = timed(lambda: agent.attach(dom, volume_id=vol_lib))
                sa = steps.take()
                d = timed(lambda: agent.detach(dom, vol_lib))
                sd = steps.take()
                profile_attach.append({**sa, "total": a})  # the first (warm-up) is dropped below
                profile_detach.append({**sd, "total": d})
                return a, d

            cycles = [("floor", floor_cycle), ("grpc", grpc_cycle), ("lib", lib_cycle)]
            k = i % 3
            for name, run in cycles[k:] + cycles[:k]:
                a, d = run()
                if i:
                    times[f"{name}_attach"].append(a)
                    times[f"{name}_detach"].append(d)
    finally:
        with contextlib.suppress(Exception):
            agent.detach(dom, vol_lib)
        hypervisor.close()
        channel.close()
    out: dict[str, Any] = {k: stats(v) for k, v in sorted(times.items())}
    for c in ("grpc", "lib"):
        for op in ("attach", "detach"):
            out[f"ratio_{c}_{op}_p50"] = round(out[f"{c}_{op}"]["p50_ms"] / out[f"floor_{op}"]["p50_ms"], 2)
            out[f"ratio_{c}_{op}_p95"] = round(out[f"{c}_{op}"]["p95_ms"] / out[f"floor_{op}"]["p95_ms"], 2)
    for op, (x, y) in (("attach", (0, 1)), ("detach", (1, 2))):
        out[f"daemon_steps_{op}"] = {
            name: mean_steps([step_delta(c[x][name], c[y][name]) for c in grpc_steps[1:]]) for name in METRICS
        }
    out["profile_attach_ms"] = mean_profile(profile_attach[1:])
    out["profile_detach_ms"] = mean_profile(profile_detach[1:])
    if floor_attach:
        out["floor_profile_attach_ms"] = mean_profile(floor_attach[1:])
        out["floor_profile_detach_ms"] = mean_profile(floor_detach[1:])
    return out


def mean_profile(profiles: list[dict[str, float]]) -> dict[str, float]:
    """Mean milliseconds per step; `untimed` = total minus the timed steps (journal, validation, the
    agent's own libvirt reads, the secret's define/undefine)."""
    if not profiles:
        return {}
    keys = sorted({k for p in profiles for k in p})
    mean = {k: 1000 * sum(p.get(k, 0.0) for p in profiles) / len(profiles) for k in keys}
    mean["untimed"] = mean["total"] - sum(v for k, v in mean.items() if k != "total")
    return {k: round(v, 1) for k, v in sorted(mean.items(), key=lambda kv: -kv[1])}


def mean_steps(deltas: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Mean ms per operation of each step (summed over its calls in one operation)."""
    if not deltas:
        return {}
    keys = {k for d in deltas for k in d}
    mean = {k: 1000 * sum(d[k]["sum_s"] for d in deltas if k in d) / len(deltas) for k in keys}
    return {k: round(v, 1) for k, v in sorted(mean.items(), key=lambda kv: -kv[1])}


@contextlib.contextmanager
def domains(lv: Callable[[], libvirt.virConnect], n: int, prefix: str) -> Iterator[list[str]]:
    """`n` running no-OS domains, removed afterwards (through `lv()`, which opens the connection again
    when libvirtd restarted meanwhile; a removal that fails is tried again once libvirtd is back)."""
    names: list[str] = []
    try:
        for _ in range(n):
            names.append(define_domain(lv(), prefix))
        yield names
    finally:
        for name in names:
            for attempt in range(4):
                try:
                    remove_domain(lv(), name)
                    lv().lookupByName(name)  # still there: try again
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        break
                time.sleep(5 * (attempt + 1))
            else:
                print(f"bench: domain {name} could not be removed; remove it by hand", file=sys.stderr)


def leftovers(rig: Rig, floor: RawFloor, doms: list[str], vols: list[str]) -> dict[str, Any]:
    left: dict[str, Any] = {}
    rows = sum(len(rig.attachments(v)) for v in vols)
    if rows:
        left["storage attachments"] = rows
    disks = {d: len(rig.live_disks(d)) for d in doms}
    if any(disks.values()):
        left["domain disks"] = {d: n for d, n in disks.items() if n}
    if rig.secrets():
        left["agent secrets"] = len(rig.secrets())
    floor_secrets = [s for s in rig.lv().listAllSecrets() if s.usageID() in floor.usages]
    if floor_secrets:
        left["floor secrets"] = len(floor_secrets)
    if rig.journal():
        left["journal"] = len(rig.journal())
    out = rig.tgtd.adm("--op", "show", "--mode", "target").stdout
    targets = re.findall(r"^Target \d+: (\S+)$", out, re.M)
    if targets:
        left["tgt targets"] = len(targets)
    if rig.accounts():
        left["tgt accounts"] = len(rig.accounts())
    return left


def storm(n: int, n_domains: int, rig: Rig, floor: RawFloor) -> dict[str, Any]:
    vols = [rig.create_volume().id for _ in range(n)]
    per: dict[str, list[float]] = {"floor": [], "grpc": [], "floor_detach": [], "grpc_detach": []}
    walls: dict[str, float] = {}
    errors: list[str] = []
    lock = threading.Lock()
    with domains(rig.lv, n_domains, "bw-storm") as doms:
        placed = [(doms[i % n_domains], i // n_domains) for i in range(n)]
        targets = [floor.new(i) for i in range(n)]

        def run(name: str, fn: Callable[[int], float], count: int) -> None:
            def one(i: int) -> None:
                try:
                    t = fn(i)
                except Exception as exc:  # counted and reported
                    details = exc.details() if hasattr(exc, "details") else str(exc)
                    with lock:
                        errors.append(f"{name} {i}: {details}"[:300])
                    return
                with lock:
                    per[name].append(t)

            with ThreadPoolExecutor(count) as pool:
                began = time.perf_counter()
                list(pool.map(one, range(count)))
                walls[name] = time.perf_counter() - began

        run("floor", lambda i: floor.attach(placed[i][0], targets[i], placed[i][1]), n)
        run("floor_detach", lambda i: floor.detach(placed[i][0], targets[i], timeout=120), n)
        scraped = {name: scrape(listen) for name, listen in METRICS.items()}
        run("grpc", lambda i: timed(lambda: rig.attach(placed[i][0], vols[i], timeout=180)), n)
        steps = {name: step_delta(scraped[name], scrape(listen)) for name, listen in METRICS.items()}
        attached = len(rig.journal())
        scraped = {name: scrape(listen) for name, listen in METRICS.items()}
        run("grpc_detach", lambda i: timed(lambda: rig.detach(placed[i][0], vols[i], timeout=180)), n)
        detach_steps = {name: step_delta(scraped[name], scrape(listen)) for name, listen in METRICS.items()}
        left = leftovers(rig, floor, doms, vols)
    for v in vols:
        with contextlib.suppress(Exception):
            rig.delete_volume(v)
    return {
        "volumes": n,
        "domains": n_domains,
        **{k: {**stats(v), "wall_s": round(walls.get(k, 0.0), 3)} for k, v in per.items()},
        "ratio_wall": round(walls["grpc"] / walls["floor"], 2) if walls.get("floor") else None,
        "ratio_detach_wall": round(walls["grpc_detach"] / walls["floor_detach"], 2)
        if walls.get("floor_detach")
        else None,
        "grpc_attached": attached,
        "grpc_steps": steps,
        "grpc_detach_steps": detach_steps,
        "left_after_detach": left,
        "errors": errors[:20],
    }


_STEP = re.compile(r'^blockwire_step_duration_seconds_(sum|count)\{step="([^"]+)"\} (\S+)$', re.M)
_RPC = re.compile(r'^blockwire_rpc_duration_seconds_(sum|count)\{method="(?:[^"]*/)?([^"/]+)"\} (\S+)$', re.M)


def scrape(listen: str) -> dict[str, tuple[float, float]]:
    """A daemon's step histogram from its metrics endpoint: step -> (seconds summed, count); and each RPC
    it served, as the step "rpc <Method>" (the whole call, server side)."""
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as r:  # loopback
        text = r.read().decode()
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for kind, step, value in _STEP.findall(text):
        out[step][0 if kind == "sum" else 1] = float(value)
    for kind, method, value in _RPC.findall(text):
        out[f"rpc {method}"][0 if kind == "sum" else 1] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def step_delta(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, dict[str, float]]:
    """Per step between two scrapes: calls, mean ms, and seconds summed over every call."""
    out = {}
    for step, (total, count) in after.items():
        t0, c0 = before.get(step, (0.0, 0.0))
        n = count - c0
        if n > 0:
            out[step] = {"calls": int(n), "mean_ms": round(1000 * (total - t0) / n, 1),
                         "sum_s": round(total - t0, 4)}  # fmt: skip
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["sum_s"]))


TEXT = {
    "iscsi": {
        "title": "QEMU-native iSCSI, CHAP, tgtd",
        "floor": "floor = raw calls (tgtadm target, LUN, identity, CHAP account + bind, ACL; private libvirt "
        "secret; attachDeviceFlags of the iSCSI network disk with auth; detach: detachDeviceFlags until the "
        "disk is gone, secret undefine, tgtadm delete target + account).",
        "identity": "identity = the LUN's VPD read (libiscsi in process, else iscsi-inq)",
        "storage_steps": ", storage's tgt_* are its tgtadm requests, rpc X = the whole call served",
        "storm_steps": "; tgt_* are storage's tgtadm requests, which one tgtd serves one at a time",
    },
    "rbd": {
        "title": "RBD through QEMU's librbd, a throwaway Ceph cluster",
        "floor": "Ceph: a throwaway cluster of the bench's own (tests/ceph.py: 1 mon, 1 MemStore OSD) on "
        "loopback; storage's rbd backend on it, the agent with rbd_mode qemu. floor = raw calls on one "
        "librados connection kept for the run (the image's id read through librbd: open the pool, open the "
        "image read-only, id(), close, compared with the id it was created with; a private libvirt secret "
        "of usage ceph with the key; attachDeviceFlags of the rbd network disk with auth; detach: "
        "detachDeviceFlags until the disk is gone, secret undefine).",
        "identity": "rbd_identity = the image's id, size and the cluster's fsid read through librados/librbd "
        "(hostagent.host.ceph, on a kept connection)",
        "storage_steps": "; storage's rbd = its rbd backend's time in cluster sessions (the kept "
        "connection, a monitor round trip, the pool, the image's id and the fsid), rpc X = the whole call "
        "served",
        "storm_steps": "; rpc X = the whole call served, rbd = storage's time in cluster sessions",
    },
}


def report(results: dict[str, Any], out: Path) -> Path:
    day = results["date"][:10]
    out.mkdir(parents=True, exist_ok=True)
    transport = results.get("transport", "iscsi")
    words = TEXT[transport]
    stem = out / f"host-floor{'' if transport == 'iscsi' else '-' + transport}-{day}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        f"# Host-tier attach against the raw floor ({words['title']}), {day}",
        "",
        f"Machine: {m['cores']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, Python "
        f"{m['python']}, libvirt {m['libvirt']}; load average before {m['load_before']}, after "
        f"{m.get('load_after')}. Code: {results.get('commit', '?')}. Other engineers' runs share the 2 "
        "cores: read the ratios (all contenders side by side in one run), not the absolute times.",
        "",
        f"{words['floor']} grpc = AttachVolume / DetachVolume on blockwire-agent's unix socket (which "
        "calls blockwire-storage over gRPC). lib = "
        "the same through hostagent as a library in the bench's process (storage still over gRPC). "
        "Cycles interleaved, order rotating, first cycle not counted.",
    ]
    s = results.get("serial")
    if s:
        lines += [
            "",
            "| one volume at a time | n | p50 ms | p95 ms | min ms | max ms | p50 / floor | p95 / floor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for op in ("attach", "detach"):
            for c in ("floor", "grpc", "lib"):
                r = s[f"{c}_{op}"]
                ratio = (
                    f"{s[f'ratio_{c}_{op}_p50']}x | {s[f'ratio_{c}_{op}_p95']}x" if c != "floor" else "1 | 1"
                )
                lines.append(
                    f"| {c} {op} | {r['n']} | {r['p50_ms']} | {r['p95_ms']} | {r['min_ms']} | {r['max_ms']} "
                    f"| {ratio} |"
                )
        lines += [
            "",
            "Where the library's time goes (mean ms per operation; steps timed by the agent's StepObserver: "
            f"export = storage CreateAttachment over gRPC, {words['identity']}, hotplug = attachDeviceFlags, "
            "complete = CompleteAttachment, unplug = detachDeviceFlags until DEVICE_REMOVED, unexport = "
            "DeleteAttachment; journal = record writes (fsync'd), secret = the private libvirt secret, "
            "libvirt_read = the agent's lookups and XML reads outside the hot-plug; untimed = the rest):",
            "",
            "* attach: " + ", ".join(f"{k} {v}" for k, v in s["profile_attach_ms"].items()),
            "* detach: " + ", ".join(f"{k} {v}" for k, v in s["profile_detach_ms"].items()),
        ]
        if "floor_profile_attach_ms" in s:
            lines += [
                "",
                "The floor's own steps, the same way (rbd_identity = its librbd read of the image id; "
                "secret = define + set value, or undefine; hotplug, unplug as above):",
                "",
                "* floor attach: " + ", ".join(f"{k} {v}" for k, v in s["floor_profile_attach_ms"].items()),
                "* floor detach: " + ", ".join(f"{k} {v}" for k, v in s["floor_profile_detach_ms"].items()),
            ]
        lines += [
            "",
            "The grpc contender's daemons, from their own step histograms (mean ms per operation; the "
            f"agent's steps as above{words['storage_steps']}):",
            "",
        ]
        for op in ("attach", "detach"):
            for daemon, by_step in s.get(f"daemon_steps_{op}", {}).items():
                lines.append(f"* {op}, {daemon}: " + ", ".join(f"{k} {v}" for k, v in by_step.items()))
    c = results.get("storm")
    if c:
        lines += [
            "",
            f"## Boot storm: {c['volumes']} volumes at once on {c['domains']} running domains",
            "",
            "One thread per volume for both; floor = the raw calls above, grpc = AttachVolume. Then all "
            "detached at once the same way.",
            "",
            "| storm | n | p50 ms | p95 ms | p99 ms | max ms | wall s |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in ("floor", "grpc", "floor_detach", "grpc_detach"):
            r = c[k]
            lines.append(
                f"| {k} | {r['n']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} "
                f"| {r['wall_s']} |"
            )
        lines += [
            "",
            f"Wall ratio attach {c['ratio_wall']}x, detach {c['ratio_detach_wall']}x (goal <= 1.3x); "
            f"{c['grpc_attached']} of {c['volumes']} attached; left after detach: "
            f"{c['left_after_detach'] or 'nothing'}; errors: {len(c['errors'])}.",
        ]
        lines += [f"* {e}" for e in c["errors"][:10]]
        lines += [
            "",
            "Where the grpc storm's time went (the daemons' own step histograms, scraped before and after: "
            f"calls, mean ms, seconds summed over all calls{words['storm_steps']}):",
            "",
        ]
        for key, op in (("grpc_steps", "attach"), ("grpc_detach_steps", "detach")):
            for daemon, by_step in c.get(key, {}).items():
                lines.append(
                    f"* {op}, {daemon}: "
                    + ", ".join(
                        f"{k} {v['calls']}x {v['mean_ms']} ms ({v['sum_s']} s)" for k, v in by_step.items()
                    )
                )
    b = results.get("before")
    if b:
        lines += before_lines(b)
    for note in results.get("notes", []):
        lines += ["", note]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def before_lines(b: dict[str, Any]) -> list[str]:
    """An earlier run (the code before a change, `--before`): its ratios and profile beside this one's."""
    m = b.get("machine", {})
    lines = [
        "",
        f"## Before: {b.get('commit') or 'the code before the change'} ({b.get('date', '?')}, load average "
        f"{m.get('load_before')} -> {m.get('load_after')})",
        "",
    ]
    s = b.get("serial")
    if s:
        lines += ["| one volume at a time | p50 ms | p95 ms | p50 / floor |", "|---|---|---|---|"]
        for op in ("attach", "detach"):
            for c in ("floor", "grpc", "lib"):
                r = s[f"{c}_{op}"]
                ratio = f"{s[f'ratio_{c}_{op}_p50']}x" if c != "floor" else "1"
                lines.append(f"| {c} {op} | {r['p50_ms']} | {r['p95_ms']} | {ratio} |")
        lines += [
            "",
            "* attach: " + ", ".join(f"{k} {v}" for k, v in s["profile_attach_ms"].items()),
            "* detach: " + ", ".join(f"{k} {v}" for k, v in s["profile_detach_ms"].items()),
        ]
    c = b.get("storm")
    if c:
        lines += [
            "",
            f"Storm ({c['volumes']} on {c['domains']}): attach wall floor {c['floor']['wall_s']} s, grpc "
            f"{c['grpc']['wall_s']} s ({c['ratio_wall']}x), grpc p99 {c['grpc']['p99_ms']} ms; detach "
            f"{c['ratio_detach_wall']}x; errors {len(c['errors'])}.",
        ]
    return lines


def with_metrics(rig: Rig) -> Rig:
    """Gives both daemons of `rig` a metrics endpoint on a free loopback port (before they start)."""
    for name in ("agent", "storage"):
        METRICS[name] = f"127.0.0.1:{free_port(('127.0.0.1',))}"
    rig.agent_config += f'[metrics]\nlisten = "{METRICS["agent"]}"\n'
    rig.storage_config += f'[metrics]\nlisten = "{METRICS["storage"]}"\n'
    return rig


def commit() -> str:
    git = ["git", "-C", str(ROOT)]
    r = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                       timeout=10)  # fmt: skip
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, check=False, timeout=10).stdout.strip()  # fmt: skip
    return r.stdout.strip() + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=sorted(TEXT), default="iscsi")
    parser.add_argument("--cycles", type=int, default=15)
    parser.add_argument("--storm", type=int, default=0, help="volumes attached at once (0: no storm)")
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--tag", default="", help="a subdirectory of --out for the result files")
    parser.add_argument("--before", type=Path, help="the JSON of a run on the code before a change")
    parser.add_argument("--from-json", type=Path, help="only write the report of an earlier run's JSON")
    args = parser.parse_args(argv)
    before = json.loads(args.before.read_text()) if args.before else None
    if before is not None:
        before.pop("before", None)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["notes"] = results.get("notes", []) + args.note
        if before is not None:
            results["before"] = before
        stem = report(results, args.out)
        print(stem.with_suffix(".md").read_text())
        return 0
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host_facts(libvirt=libvirt.getVersion()),
        "commit": commit(),
        "transport": args.transport,
        "notes": args.note,
    }
    started = Started()
    ensure_libvirtd(started)
    port = free_port(PORTAL_HOSTS)
    tgtd = Tgtd(portals=tuple(f"{h}:{port}" for h in PORTAL_HOSTS), control_port=free_tgt_control_port())
    tgtd.start()  # storage's file backend exports through it (the rbd mode's volumes do not)
    virt = libvirt.open("qemu:///system")
    try:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bwfloor-", dir="/tmp"))
            rig = with_metrics(Rig(Path(tmp), tgtd, virt, log_level="INFO"))
            floor: RawFloor
            if args.transport == "rbd":
                cluster = stack.enter_context(CephCluster(osds=1, objectstore="memstore"))
                user = cluster.create_user("bench-storage")
                rbd_backend(rig, cluster, user)
                floor = RbdFloor(cluster, user, rig.lv)
                results["machine"]["ceph"] = subprocess.run(
                    ["ceph", "--version"], capture_output=True, text=True, check=False, timeout=30
                ).stdout.strip()
            else:
                floor = Floor(
                    tgtd, rig.lv, Path(tmp), initiator=f"iqn.2026-01.io.blockwire.{RAW_PREFIX}:host"
                )
            try:
                with rig.running():
                    if args.cycles:
                        with domains(rig.lv, 1, "bw-floor") as (dom,):
                            results["serial"] = serial_cycles(args.cycles, rig, floor, dom)
                    if args.storm:
                        results["storm"] = storm(args.storm, args.domains, rig, floor)
            finally:
                floor.cleanup()
    finally:
        tgtd.stop()
        started.stop()
    results["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if before is not None:
        results["before"] = before
    stem = report(results, args.out if not args.tag else args.out / args.tag)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
