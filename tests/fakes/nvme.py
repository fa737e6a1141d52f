"""FakeNvmeKernel: the host's NVMe-oF driver and a target, on a fake sysfs tree (the Fabrics seam).

The tree has the layout recorded in the guest (tests/data/recorded/nvme_sysfs_*): controllers
class/nvme/nvmeN with subsysnqn, address, state, hostnqn, transport; subsystems
class/nvme-subsystem/nvme-subsysK with a link per controller and the heads nvmeKnM; namespaces
block/nvmeKnM with nsid, nguid, uuid (UUID notation), wwid, size; path devices nvmeKcNnM under each
controller. With `multipath=False` (nvme_core multipath=N, recorded in tests/data/recorded/nvme_mp_*):
no heads and no path devices, each controller N has its own namespace device nvmeNnM (class/nvme/nvmeN/
nvmeNnM, block/nvmeNnM with the same attributes). `connect` (the fabrics write) makes a controller,
like the kernel: EALREADY for a second one with the same subsystem, address and host NQN, ECONNREFUSED
for a port that does not offer the subsystem, EIO for a host the subsystem does not allow, and for
DH-HMAC-CHAP what the 6.12 kernel answers (tests/data/recorded/nvme_dhchap_*): ENOKEY without a secret,
EKEYREJECTED for a wrong host secret or a wrong controller secret. A write of "1" to delete_controller /
rescan_controller takes effect at `sync()` (run as a FakeUdev reaction).
"""

from __future__ import annotations

import errno
import shutil
import threading
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from hostagent.host.udev import UdevDevice
from tests.fakes.udev import FakeUdev


@dataclass
class FakeNs:
    nsid: int
    nguid: str  # 32 hex
    uuid: str
    size: int


@dataclass
class FakeSubsystem:
    nqn: str
    portals: set[str]  # "127.0.0.1:4420"
    hosts: set[str]
    namespaces: list[FakeNs] = field(default_factory=list)
    key: str = ""  # DH-HMAC-CHAP key the host must give
    ctrl_key: str = ""  # the controller's key (bidirectional): a host that gives one must give this


def dashed(hex32: str) -> str:
    return str(uuidlib.UUID(hex=hex32))


class FakeNvmeKernel:
    def __init__(self, root: Path, udev: FakeUdev, *, multipath: bool = True) -> None:
        self.root = root
        self.udev = udev
        self.multipath = multipath
        self.targets: dict[str, FakeSubsystem] = {}
        self.written: list[str] = []  # every options string written to the fabrics device
        self.next_instance = 0
        self.lock = threading.RLock()  # the kernel makes one controller at a time here
        (root / "module/nvme_core/parameters").mkdir(parents=True, exist_ok=True)
        (root / "module/nvme_core/parameters/multipath").write_text("Y\n" if multipath else "N\n")
        (root / "module/nvme_tcp").mkdir(parents=True, exist_ok=True)
        (root / "class/nvme-fabrics").mkdir(parents=True, exist_ok=True)
        for d in ("class/nvme", "class/nvme-subsystem", "block"):
            (root / d).mkdir(parents=True, exist_ok=True)
        if not (root / "class/block").exists():
            (root / "class/block").symlink_to("../block")
        udev.on_trigger.append(lambda _u: self.sync())

    # -- the target ------------------------------------------------------------------------------
    def export(
        self, nqn: str, portals: tuple[str, ...], host: str, *ns: FakeNs, key: str = "", ctrl_key: str = ""
    ) -> FakeSubsystem:
        s = FakeSubsystem(nqn, set(portals), {host}, list(ns), key, ctrl_key)
        self.targets[nqn] = s
        return s

    # -- the fabrics device ----------------------------------------------------------------------
    def connect(self, options: str) -> str:
        with self.lock:
            self.sync()
            return self._connect(options)

    def _connect(self, options: str) -> str:
        self.written.append(options)
        o = dict(part.split("=", 1) for part in options.split(","))
        portal = f"{o['traddr']}:{o['trsvcid']}"
        for c in self._controllers():
            if (c["subsysnqn"], c["address"].split(",src")[0], c["hostnqn"]) == (
                o["nqn"], f"traddr={o['traddr']},trsvcid={o['trsvcid']}", o["hostnqn"]
            ) and c["state"] not in ("deleting",):  # fmt: skip
                raise OSError(errno.EALREADY, "already connected")
        t = self.targets.get(o["nqn"])
        if t is None or portal not in t.portals:
            raise OSError(errno.ECONNREFUSED, "refused")
        if o["hostnqn"] not in t.hosts:
            raise OSError(errno.EIO, "refused")
        if t.key and "dhchap_secret" not in o:
            raise OSError(errno.ENOKEY, "Required key not available")
        if t.key and o["dhchap_secret"] != t.key:
            raise OSError(errno.EKEYREJECTED, "Key was rejected by service")
        if "dhchap_ctrl_secret" in o and o["dhchap_ctrl_secret"] != t.ctrl_key:
            raise OSError(
                errno.EKEYREJECTED, "Key was rejected by service"
            )  # the host refuses the controller
        instance = self.next_instance
        self.next_instance += 1
        name = f"nvme{instance}"
        c = self.root / "class/nvme" / name
        c.mkdir()
        for attr, value in (
            ("subsysnqn", t.nqn),
            ("transport", "tcp"),
            ("address", f"traddr={o['traddr']},trsvcid={o['trsvcid']},src_addr=127.0.0.1"),
            ("hostnqn", o["hostnqn"]),
            ("state", "live"),
            ("ctrl_loss_tmo", o.get("ctrl_loss_tmo", "600")),
            ("delete_controller", ""),
            ("rescan_controller", ""),
        ):
            (c / attr).write_text(value + "\n")
        sub = self._subsystem(t.nqn) or f"nvme-subsys{instance}"
        (self.root / "class/nvme-subsystem" / sub).mkdir(exist_ok=True)
        (self.root / "class/nvme-subsystem" / sub / "subsysnqn").write_text(t.nqn + "\n")
        (self.root / "class/nvme-subsystem" / sub / name).mkdir()
        self._scan(sub)
        return f"instance={instance},cntlid={instance + 1}\n"

    def _subsystem(self, nqn: str) -> str:
        for s in sorted((self.root / "class/nvme-subsystem").iterdir()):
            if (s / "subsysnqn").read_text().strip() == nqn:
                return s.name
        return ""

    def controllers(self) -> list[dict[str, str]]:
        """The controllers there are (after acting on writes: the real kernel deletes synchronously)."""
        with self.lock:
            self.sync()
            return self._controllers()

    def _controllers(self) -> list[dict[str, str]]:
        out = []
        for c in sorted((self.root / "class/nvme").iterdir()):
            d = {a.name: a.read_text().strip() for a in c.iterdir() if a.is_file()}
            d["name"] = c.name
            out.append(d)
        return out

    def _scan(self, sub: str) -> None:
        """The namespaces of the subsystem's target appear (heads, path devices, block/ and udev)."""
        k = sub.removeprefix("nvme-subsys")
        sdir = self.root / "class/nvme-subsystem" / sub
        nqn = (sdir / "subsysnqn").read_text().strip()
        t = self.targets[nqn]
        ctrls = [
            p.name
            for p in sdir.iterdir()
            if p.is_dir() and p.name.startswith("nvme") and "n" not in p.name[4:]
        ]
        if not self.multipath:
            for c in ctrls:
                for ns in t.namespaces:
                    self._own_namespace(c, ns)
            return
        for ns in t.namespaces:
            head = f"nvme{k}n{ns.nsid}"
            b = self.root / "block" / head
            if not b.exists():
                b.mkdir()
                (sdir / head).mkdir()
                self.udev.add(
                    UdevDevice(sys_name=head, sys_path=f"/sys/devices/virtual/nvme-subsystem/{sub}/{head}")
                )
            (b / "nsid").write_text(f"{ns.nsid}\n")
            (b / "nguid").write_text(dashed(ns.nguid) + "\n")
            (b / "uuid").write_text(ns.uuid + "\n")
            (b / "wwid").write_text(f"uuid.{ns.uuid}\n")
            (b / "size").write_text(f"{ns.size // 512}\n")
            for c in ctrls:
                path = self.root / "class/nvme" / c / f"nvme{k}c{c[4:]}n{ns.nsid}"
                if not path.exists():
                    path.mkdir()
                    (path / "nsid").write_text(f"{ns.nsid}\n")
                    (path / "ana_state").write_text("optimized\n")

    @staticmethod
    def _attrs(b: Path, ns: FakeNs) -> None:
        (b / "nsid").write_text(f"{ns.nsid}\n")
        (b / "nguid").write_text(dashed(ns.nguid) + "\n")
        (b / "uuid").write_text(ns.uuid + "\n")
        (b / "wwid").write_text((f"uuid.{ns.uuid}" if ns.uuid else f"eui.{ns.nguid}") + "\n")
        (b / "size").write_text(f"{ns.size // 512}\n")

    def _own_namespace(self, c: str, ns: FakeNs) -> None:
        """Without native multipath: controller c's own device of namespace `ns`."""
        dev = f"{c}n{ns.nsid}"
        b = self.root / "block" / dev
        if not b.exists():
            b.mkdir()
            (self.root / "class/nvme" / c / dev).mkdir()
            self._attrs(b, ns)
            self.udev.add(
                UdevDevice(
                    sys_name=dev,
                    sys_path=f"/sys/devices/virtual/nvme-fabrics/ctl/{c}/{dev}",
                    properties={"ID_WWN": (b / "wwid").read_text().strip()},
                )
            )
        else:  # a rescan: the size follows the target (an identity change is not taken over)
            (b / "size").write_text(f"{ns.size // 512}\n")

    def sync(self) -> None:
        """Acts on what was written to controllers' delete_controller and rescan_controller."""
        with self.lock:
            self._sync()

    def _sync(self) -> None:
        for c in sorted((self.root / "class/nvme").iterdir()):
            if (c / "rescan_controller").read_text().strip() == "1":
                (c / "rescan_controller").write_text("")
                sub = self._subsystem((c / "subsysnqn").read_text().strip())
                self._scan(sub)
            if (c / "delete_controller").read_text().strip() == "1":
                self.drop(c.name)

    def drop(self, name: str) -> None:
        """The controller goes (deleted, or given up after ctrl_loss_tmo); the subsystem and its heads go
        with its last controller."""
        nqn = (self.root / "class/nvme" / name / "subsysnqn").read_text().strip()
        for own in (self.root / "class/nvme" / name).glob("nvme*n*"):
            if "c" not in own.name:  # the controller's own namespace device (no native multipath)
                shutil.rmtree(self.root / "block" / own.name, ignore_errors=True)
                self.udev.remove(own.name)
        shutil.rmtree(self.root / "class/nvme" / name)
        sub = self._subsystem(nqn)
        sdir = self.root / "class/nvme-subsystem" / sub
        shutil.rmtree(sdir / name)
        if not [p for p in sdir.iterdir() if p.is_dir() and "n" not in p.name[4:]]:
            for head in [p.name for p in sdir.iterdir() if p.is_dir()]:
                shutil.rmtree(self.root / "block" / head, ignore_errors=True)
                self.udev.remove(head)
            shutil.rmtree(sdir)

    def remove_namespace(self, nqn: str, nsid: int) -> None:
        """The target drops a namespace; the host removes its head on the change notice."""
        t = self.targets[nqn]
        t.namespaces = [n for n in t.namespaces if n.nsid != nsid]
        sub = self._subsystem(nqn)
        if not self.multipath:  # each controller's own device of it
            for own in self.root.glob(f"class/nvme/nvme*/nvme*n{nsid}"):
                shutil.rmtree(own)
                shutil.rmtree(self.root / "block" / own.name, ignore_errors=True)
                self.udev.remove(own.name)
            return
        head = f"nvme{sub.removeprefix('nvme-subsys')}n{nsid}"
        shutil.rmtree(self.root / "block" / head, ignore_errors=True)
        shutil.rmtree(self.root / "class/nvme-subsystem" / sub / head, ignore_errors=True)
        self.udev.remove(head)

    def set_state(self, name: str, state: str) -> None:
        (self.root / "class/nvme" / name / "state").write_text(state + "\n")

    def set_ana(self, name: str, nsid: int, state: str) -> None:
        """The target changed the ANA state of namespace `nsid` as controller `name` sees it."""
        for path in (self.root / "class/nvme" / name).glob(f"nvme*c*n{nsid}"):
            (path / "ana_state").write_text(state + "\n")

    def identify(self, controller: str, nsid: int) -> dict[str, str] | None:
        """Identify CNS 03h as the target answers it (hostagent.host.nvme.identify_ns_ioctl's seam)."""
        nqn = (self.root / "class/nvme" / controller / "subsysnqn").read_text().strip()
        for ns in self.targets[nqn].namespaces:
            if ns.nsid == nsid:
                return {"nguid": ns.nguid, "uuid": ns.uuid.replace("-", "")}
        return {}

    def heads(self) -> list[str]:
        self.sync()
        return sorted(p.name for p in (self.root / "block").iterdir())
