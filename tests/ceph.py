"""A throwaway Ceph cluster on this machine: one monitor and N OSDs as our own subprocesses, on free
loopback ports, under a short temporary directory, stopped by pid (STYLE.md rule 15: the one Ceph rig,
imported by tests/host and bench/).

MemStore by default (ready in ~2 s, data gone when an OSD process ends); BlueStore on a sparse file when
an OSD restart must keep the data. No ceph-mgr (RBD does not need one; `ceph -s` then shows 0 pgs, so
readiness is "a `rados put` into the pool succeeds"). The recipe and its pitfalls: LAB.md, "Ceph RBD on
one machine".

    with CephCluster(osds=1) as cluster:        # or cluster = CephCluster().start() ... cluster.stop()
        cluster.conf, cluster.monitors, cluster.admin_key, cluster.fsid
        user = cluster.create_user("host-a", pool="rbd")   # caps: profile rbd on that pool only
        cluster.kill_osd(0); cluster.start_osd(0)
        cluster.stop_mon(); cluster.start_mon()

Needs root-free nothing, but the Debian packages ceph-mon, ceph-osd and ceph-common (scripts/setup).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

BINARIES = {
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "ceph": "ceph-common",
    "rados": "ceph-common",
    "rbd": "ceph-common",
    "ceph-authtool": "ceph-common",
    "monmaptool": "ceph-common",
}
PORT_RANGE = 24  # ports reserved per cluster for the OSDs' messengers (4 a daemon: public+cluster, v1+v2)


class CephMissing(Exception):
    """The Ceph binaries are missing or the cluster did not come up; the message says which and why."""


def missing_binaries() -> list[str]:
    """`binary (package)` for each Ceph binary not on PATH."""
    return [f"{b} ({p})" for b, p in BINARIES.items() if shutil.which(b) is None]


def _free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive TCP ports on `host` that are all free now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = int(s.getsockname()[1])
        if base + count > 65000:
            continue
        held: list[socket.socket] = []
        try:
            for p in range(base, base + count):
                t = socket.socket()
                held.append(t)
                t.bind((host, p))
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
        return base
    raise CephMissing(f"no {count} consecutive free TCP ports on {host}")


def _wait(what: str, ready: object, timeout: float, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if ready():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise CephMissing(f"{what}: not within {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, every)


@dataclass
class CephUser:
    """A cephx client: `name` without the `client.` prefix, its base64 key, and a keyring file."""

    name: str
    key: str
    keyring: Path

    @property
    def entity(self) -> str:
        return f"client.{self.name}"


@dataclass
class CephCluster:
    osds: int = 1
    objectstore: str = "memstore"  # or "bluestore" (a sparse file per OSD; survives an OSD restart)
    osd_bytes: int = 2 << 30  # MemStore's device size, or BlueStore's sparse file size
    pool: str = "rbd"
    root: Path | None = None  # default: a new short dir under /tmp (unix sockets < 108 characters)
    start_timeout: float = 60.0
    client_timeout: int = 15  # client_mount_timeout and rados_mon_op_timeout in [client]
    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    osd_ids: list[int] = field(default_factory=list, init=False)
    mon_port: int = field(default=0, init=False)  # the msgr v1 port; v2 is mon_port + 1
    _own_root: bool = field(default=False, init=False)

    # -- paths and addresses

    @property
    def dir(self) -> Path:
        assert self.root is not None, "not started"
        return self.root

    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    @property
    def admin_keyring(self) -> Path:
        return self.dir / "client.admin.keyring"

    @property
    def admin_key(self) -> str:
        return self._key_of(self.admin_keyring)

    @property
    def monitors(self) -> tuple[str, ...]:
        """The monitor as clients name it: host:port of msgr v1 (also what libvirt's <host> takes)."""
        return (f"127.0.0.1:{self.mon_port}",)

    @property
    def mon_host(self) -> str:
        return f"[v2:127.0.0.1:{self.mon_port + 1},v1:127.0.0.1:{self.mon_port}]"

    def log(self, daemon: str) -> Path:
        """A daemon's log file: "mon.a", "osd.0"."""
        return self.dir / "log" / f"{daemon}.log"

    # -- running the tools

    def cli(self, tool: str, *args: str, stdin: str | None = None, timeout: float = 30) -> str:
        """Runs a Ceph tool as client.admin against this cluster; its stdout; CephMissing on failure."""
        argv = [tool, "--conf", str(self.conf)]
        if tool in ("ceph", "rados", "rbd"):
            argv += ["--name", "client.admin", "--keyring", str(self.admin_keyring)]
        if tool == "ceph":
            argv += ["--connect-timeout", str(int(timeout))]
        try:
            done = subprocess.run(
                [*argv, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CephMissing(f"{tool} {' '.join(args)}: no answer within {timeout:g}s") from None
        if done.returncode != 0:
            raise CephMissing(
                f"{tool} {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()[-500:]}"
            )
        return done.stdout

    @staticmethod
    def _key_of(keyring: Path) -> str:
        for line in keyring.read_text().splitlines():
            k, _, v = line.partition("=")
            if k.strip() == "key":
                return v.strip()
        raise CephMissing(f"no key in {keyring}")

    # -- lifecycle

    def start(self) -> CephCluster:
        """Creates and starts the cluster; returns when the pool takes a write. On failure, stops what
        was started and raises CephMissing with the daemon's log tail."""
        missing = missing_binaries()
        if missing:
            raise CephMissing(
                "Ceph binaries not found: " + ", ".join(missing) + " (scripts/setup installs them)"
            )
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="bwceph-", dir="/tmp"))
            self._own_root = True
        try:
            self._create()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _create(self) -> None:
        d = self.dir
        for sub in ("run", "log", "mon", "osd"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        base = _free_ports(2 + PORT_RANGE)
        self.mon_port = base
        self._write_conf(base + 2, base + 1 + PORT_RANGE)
        mon_keyring = d / "mon.keyring"
        self.cli(
            "ceph-authtool",
            "--create-keyring",
            str(mon_keyring),
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        )
        self.cli(
            "ceph-authtool",
            "--create-keyring",
            str(self.admin_keyring),
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mds",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
        )
        self.cli("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.admin_keyring))
        monmap = d / "monmap"
        self.cli("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", self.mon_host, str(monmap))
        self.cli("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(mon_keyring))
        self.start_mon()
        for _ in range(self.osds):
            self.add_osd()
        self.cli("ceph", "osd", "pool", "create", self.pool, "8", "8")
        self.cli("ceph", "osd", "pool", "set", self.pool, "size", "1", "--yes-i-really-mean-it")
        self.cli("ceph", "osd", "pool", "application", "enable", self.pool, "rbd")
        self.wait_writable()
        self.cli("rbd", "pool", "init", self.pool)

    def _write_conf(self, port_min: int, port_max: int) -> None:
        d = self.dir
        objectstore = {"memstore": "memstore", "bluestore": "bluestore"}[self.objectstore]
        self.conf.write_text(
            f"""[global]
fsid = {self.fsid}
mon_host = {self.mon_host}
public_addr = 127.0.0.1
ms_bind_port_min = {port_min}
ms_bind_port_max = {port_max}
run_dir = {d}/run
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
paxos_propose_interval = 0.05
auth_allow_insecure_global_id_reclaim = false

[mon]
mon_data = {d}/mon/$name
keyring = {d}/mon/$name/keyring
admin_socket = {d}/run/$name.asok

[osd]
osd_data = {d}/osd/$id
keyring = {d}/osd/$id/keyring
admin_socket = {d}/run/$name.asok
osd_objectstore = {objectstore}
memstore_device_bytes = {self.osd_bytes}
bluestore_block_create = true
bluestore_block_size = {self.osd_bytes}
bluestore_cache_autotune = false
bluestore_cache_size = 67108864
osd_memory_target = 536870912

[client]
keyring = {self.admin_keyring}
admin_socket =
log_file = {d}/log/client.log
client_mount_timeout = {self.client_timeout}
rados_mon_op_timeout = {self.client_timeout}
rados_osd_op_timeout = {self.client_timeout}
"""
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = self.log(name).with_suffix(".out")
        with out.open("ab") as f:
            self.procs[name] = subprocess.Popen(
                [*argv, "--conf", str(self.conf), "-f"],
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            tail = self.tail(name)
            raise CephMissing(f"{name} is not running (exit {code}):\n{tail}")
        return True

    def tail(self, name: str, chars: int = 2000) -> str:
        text = ""
        for path in (self.log(name).with_suffix(".out"), self.log(name)):
            if path.exists():
                text += path.read_text(errors="replace")[-chars:]
        return text

    # -- the monitor

    def start_mon(self) -> None:
        """Starts mon.a (again) and waits until it answers."""
        self._spawn("mon.a", ["ceph-mon", "-i", "a"])

        def answers() -> bool:
            self._alive("mon.a")
            try:
                self.cli("ceph", "mon", "dump", timeout=10)
            except CephMissing:
                return False
            return True

        _wait("ceph-mon answering", answers, self.start_timeout)

    def stop_mon(self) -> None:
        """Kills mon.a (SIGKILL by pid): clients then find no monitor."""
        self._kill("mon.a")

    # -- OSDs

    def add_osd(self) -> int:
        """Creates a new OSD (id from the monitor), makes its store and starts it; its id."""
        osd_uuid = str(uuid.uuid4())
        secret = self.cli("ceph-authtool", "--gen-print-key").strip()
        out = self.cli("ceph", "osd", "new", osd_uuid, "-i", "-", stdin=json.dumps({"cephx_secret": secret}))
        osd_id = int(out.strip())
        data = self.dir / "osd" / str(osd_id)
        data.mkdir(parents=True, exist_ok=True)
        self.cli(
            "ceph-authtool",
            "--create-keyring",
            str(data / "keyring"),
            "--name",
            f"osd.{osd_id}",
            "--add-key",
            secret,
        )
        self.cli("ceph-osd", "-i", str(osd_id), "--mkfs", "--osd-uuid", osd_uuid, timeout=120)
        self.osd_ids.append(osd_id)
        self.start_osd(osd_id)
        return osd_id

    def start_osd(self, osd_id: int) -> None:
        """Starts osd.N (again) and waits until the monitor reports it up."""
        name = f"osd.{osd_id}"
        self._spawn(name, ["ceph-osd", "-i", str(osd_id)])
        _wait(f"{name} up", lambda: self._alive(name) and self.osd_up(osd_id), self.start_timeout)

    def osd_up(self, osd_id: int) -> bool:
        dump = json.loads(self.cli("ceph", "osd", "dump", "--format", "json"))
        return any(o["osd"] == osd_id and o["up"] == 1 for o in dump["osds"])

    def kill_osd(self, osd_id: int) -> None:
        """kill -9 osd.N (with MemStore its data is gone; BlueStore keeps it) and marks it down at once
        (instead of waiting out the heartbeat grace)."""
        self._kill(f"osd.{osd_id}")
        with contextlib.suppress(CephMissing):
            self.cli("ceph", "osd", "down", str(osd_id))

    # -- pool and users

    def wait_writable(self, pool: str | None = None, timeout: float | None = None) -> None:
        """Until a `rados put` into the pool succeeds (the PGs are active)."""
        pool = pool or self.pool
        probe = self.dir / "probe"
        probe.write_bytes(b"ready")

        def put() -> bool:
            for name, _ in list(self.procs.items()):
                self._alive(name)
            try:
                self.cli("rados", "-p", pool, "put", "blockwire-rig-probe", str(probe), timeout=5)
            except CephMissing:
                return False
            return True

        _wait(f"pool {pool} writable", put, timeout or self.start_timeout, every=0.5)
        with contextlib.suppress(CephMissing):
            self.cli("rados", "-p", pool, "rm", "blockwire-rig-probe", timeout=10)

    def create_pool(self, name: str) -> None:
        """Another pool for RBD (a data pool, a second backend)."""
        self.cli("ceph", "osd", "pool", "create", name, "8", "8")
        self.cli("ceph", "osd", "pool", "set", name, "size", "1", "--yes-i-really-mean-it")
        self.cli("ceph", "osd", "pool", "application", "enable", name, "rbd")
        self.wait_writable(name)
        self.cli("rbd", "pool", "init", name)

    def create_user(self, name: str, pool: str | None = None, *, caps: tuple[str, ...] = ()) -> CephUser:
        """A cephx user `client.NAME` whose caps reach only `pool` (`profile rbd`), or `caps` as given
        ("mon", "...", "osd", "..."); its key in a keyring file under the cluster dir (mode 0600)."""
        pool = pool or self.pool
        caps = caps or ("mon", "profile rbd", "osd", f"profile rbd pool={pool}")
        self.cli("ceph", "auth", "get-or-create", f"client.{name}", *caps)
        key = self.cli("ceph", "auth", "print-key", f"client.{name}").strip()
        keyring = self.dir / f"client.{name}.keyring"
        keyring.touch(mode=0o600)
        keyring.write_text(f"[client.{name}]\n\tkey = {key}\n")
        return CephUser(name, key, keyring)

    # -- stopping

    def _kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    def stop(self) -> None:
        """Kills every daemon this cluster started (by pid: SIGKILL is fine for a throwaway cluster) and
        removes the directory it created."""
        for name in sorted(self.procs, key=lambda n: n.startswith("mon")):  # OSDs first, then the mon
            self._kill(name)
        if self._own_root and self.root is not None and not os.environ.get("BLOCKWIRE_KEEP_CEPH"):
            shutil.rmtree(self.root, ignore_errors=True)
