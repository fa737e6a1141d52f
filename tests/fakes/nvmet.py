"""FakeNvmetConfigfs: a temporary directory that behaves like the kernel's /sys/kernel/config/nvmet for
the writes `storagesvc.targets.nvmet.Configfs` makes (the real one runs in the guest tier).

What it imitates (drivers/nvme/target/configfs.c, Linux 6.1): mkdir of a subsystem, namespace, port or
host makes its attributes and default groups (a new namespace has a random UUID and a zero NGUID,
disabled; a subsystem does not allow any host; a port has ANA group 1 optimized); rmdir removes them
and refuses an item that still holds items or links (ENOTEMPTY) or a host some subsystem links (EBUSY);
device_path, device_nguid and device_uuid refuse writes while the namespace is enabled (EBUSY); enable
needs an existing device_path (ENOENT); a port's addr_* refuse writes while a subsystem is linked into
it (EACCES) and a link needs its address (EINVAL); revalidate_size needs the namespace enabled
(EINVAL); attr_serial takes at most 20 characters and is fixed once a host identified the controller
(`identified`); values read back with a newline, NGUIDs and UUIDs as "%pUb" shows them. `auth=False`
makes host entries without DH-HMAC-CHAP attributes (a kernel without CONFIG_NVME_TARGET_AUTH).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

SUBSYSTEM_ATTRS = {"attr_allow_any_host": "0", "attr_version": "1.3", "attr_model": "Linux"}
NAMESPACE_ATTRS = {
    "device_path": "",
    "device_nguid": str(uuid.UUID(int=0)),
    "enable": "0",
    "ana_grpid": "1",
    "buffered_io": "0",
}
PORT_ATTRS = {"addr_trtype": "", "addr_adrfam": "", "addr_traddr": "", "addr_trsvcid": "", "addr_treq": ""}
AUTH_ATTRS = {
    "dhchap_key": "",
    "dhchap_ctrl_key": "",
    "dhchap_hash": "hmac(sha256)",
    "dhchap_dhgroup": "null",
}


def _fail(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


class FakeNvmetConfigfs:
    def __init__(self, root: Path, *, auth: bool = True) -> None:
        self.root = root
        self.auth = auth
        self.writes: list[tuple[str, str]] = []  # (path relative to root, value)
        self.identified: set[str] = set()  # subsystem NQNs a host identified (serial fixed)
        for d in ("subsystems", "ports", "hosts"):
            (root / d).mkdir(parents=True, exist_ok=True)

    # -- what the kernel would show

    def kind(self, path: Path) -> str:
        rel = path.relative_to(self.root).parts
        if len(rel) == 2 and rel[0] == "subsystems":
            return "subsystem"
        if len(rel) == 4 and rel[0] == "subsystems" and rel[2] == "namespaces":
            return "namespace"
        if len(rel) == 2 and rel[0] == "ports":
            return "port"
        if len(rel) == 2 and rel[0] == "hosts":
            return "host"
        return ""

    def _attrs(self, path: Path, attrs: dict[str, str]) -> None:
        for name, value in attrs.items():
            (path / name).write_text(f"{value}\n")

    # -- Configfs

    def mkdir(self, path: Path) -> None:
        kind = self.kind(path)
        if not kind:
            raise _fail(errno.EPERM, path)
        path.mkdir()  # FileExistsError like configfs
        if kind == "subsystem":
            self._attrs(path, {**SUBSYSTEM_ATTRS, "attr_serial": os.urandom(8).hex()})
            (path / "namespaces").mkdir()
            (path / "allowed_hosts").mkdir()
        elif kind == "namespace":
            if not path.name.isdigit() or int(path.name) == 0:
                path.rmdir()
                raise _fail(errno.EINVAL, path)
            self._attrs(path, {**NAMESPACE_ATTRS, "device_uuid": str(uuid.uuid4())})
            (path / "revalidate_size").write_text("")
        elif kind == "port":
            self._attrs(path, PORT_ATTRS)
            for d in ("subsystems", "referrals", "ana_groups/1"):
                (path / d).mkdir(parents=True)
            (path / "ana_groups/1/ana_state").write_text("optimized\n")
        elif kind == "host" and self.auth:
            self._attrs(path, AUTH_ATTRS)

    def rmdir(self, path: Path) -> None:
        kind = self.kind(path)
        if not kind or not path.is_dir():
            raise _fail(errno.ENOENT, path)
        if kind == "subsystem" and (
            any((path / "namespaces").iterdir()) or any((path / "allowed_hosts").iterdir())
        ):
            raise _fail(errno.ENOTEMPTY, path)
        if kind == "port" and (any((path / "subsystems").iterdir()) or any((path / "referrals").iterdir())):
            raise _fail(errno.ENOTEMPTY, path)
        if kind == "host":
            for sub in (self.root / "subsystems").iterdir():
                if (sub / "allowed_hosts" / path.name).is_symlink():
                    raise _fail(errno.EBUSY, path)
        shutil.rmtree(path)

    def link(self, link: Path, target: Path) -> None:
        parent = link.parent
        if parent.name == "subsystems" and self.kind(parent.parent) == "port":
            if self.kind(target) != "subsystem":
                raise _fail(errno.EINVAL, link)
            port = parent.parent
            if not (
                (port / "addr_trtype").read_text().strip() and (port / "addr_traddr").read_text().strip()
            ):
                raise _fail(errno.EINVAL, link)
        elif parent.name == "allowed_hosts" and self.kind(parent.parent) == "subsystem":
            if self.kind(target) != "host" or link.name != target.name:
                raise _fail(errno.EINVAL, link)
        else:
            raise _fail(errno.EPERM, link)
        link.symlink_to(target)

    def unlink(self, link: Path) -> None:
        if not link.is_symlink():
            raise _fail(errno.EPERM if link.exists() else errno.ENOENT, link)
        link.unlink()

    def write(self, path: Path, value: str) -> None:
        if not path.is_file():
            raise _fail(errno.ENOENT, path)
        item, name = path.parent, path.name
        self.writes.append((str(path.relative_to(self.root)), value))
        kind = self.kind(item) if item != self.root else ""
        shown = value.strip()
        if kind == "namespace":
            enabled = (item / "enable").read_text().strip() == "1"
            if name in ("device_path", "device_nguid", "device_uuid", "buffered_io") and enabled:
                raise _fail(errno.EBUSY, path)
            if name == "device_nguid":
                digits = shown.replace("-", "").replace(":", "")
                if len(digits) != 32 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                    raise _fail(errno.EINVAL, path)
                shown = str(uuid.UUID(hex=digits))
            if name == "device_uuid":
                try:
                    shown = str(uuid.UUID(shown))
                except ValueError:
                    raise _fail(errno.EINVAL, path) from None
            if name == "enable" and shown == "1":
                device = (item / "device_path").read_text().strip()
                if not device or not os.path.exists(device):
                    raise _fail(errno.ENOENT, path)
            if name == "revalidate_size":
                if not enabled:
                    raise _fail(errno.EINVAL, path)
                return
        serial_fixed = not shown or len(shown) > 20 or item.name in self.identified
        if kind == "subsystem" and name == "attr_serial" and serial_fixed:
            raise _fail(errno.EINVAL, path)
        if kind == "port" and name.startswith("addr_") and any((item / "subsystems").iterdir()):
            raise _fail(errno.EACCES, path)
        if kind == "host" and name in ("dhchap_key", "dhchap_ctrl_key") and not shown.startswith("DHHC-1:"):
            raise _fail(errno.EINVAL, path)
        path.write_text(f"{shown}\n")

    # -- what tests look at

    def everything(self) -> list[str]:
        """Every item and link under the root (attributes left out), relative, sorted."""
        out = []
        for dirpath, dirnames, _ in os.walk(self.root):
            for d in dirnames:
                if (Path(dirpath) / d).is_symlink():
                    continue
                out.append(str((Path(dirpath) / d).relative_to(self.root)))
        for p in self.root.rglob("*"):
            if p.is_symlink():
                out.append(str(p.relative_to(self.root)) + " -> " + os.readlink(p))
        return sorted(set(out))
