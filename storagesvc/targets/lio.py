"""The `lio` exporter: the kernel's LIO target through rtslib-fb (configfs at /sys/kernel/config).

Install with the `lio` extra (``pip install blockwire[lio]``); rtslib_fb is imported lazily, here only,
so the rest of the service runs where LIO does not exist.

Per volume: a storage object named after the volume (block backstore for block devices, fileio for
files) whose unit serial (``StorageObject.wwn``, configfs ``wwn/vpd_unit_serial``) is the volume's
serial; an iSCSI target with TPG 1 on every configured portal; LUN 0; authentication on, no generated
(demo-mode) ACLs. Per attaching initiator: a NodeACL with its CHAP (``chap_userid``/``chap_password``,
mutual: ``chap_mutual_userid``/``chap_mutual_password``) and a mapped LUN 0, write-protected for
read-only exports.

Identity: LIO announces NAA-6 = ``6`` + company_id + the unit serial's hex digits (25 at most, then
zeros). With the serial of `storagesvc.identity` (20 hex digits) and company_id 0x001405 (LIO's
default) that is exactly the volume's wwn. Another `naa_oui` is written to ``wwn/company_id`` where
the kernel has that attribute; where it does not, the export is refused rather than announce a WWN
the host would reject. CHAP secrets go to configfs files, never onto a command line.

A LUN never exists without its identity here: the unit serial is given when the storage object is
made, before any LUN uses it. `list_targets` reports LUN 0's storage object (backing path, serial and
the WWN it makes); `ensure_target` replaces a storage object on the wrong backing or with the wrong
serial, and a LUN 0 that uses another object, and makes a lost LUN 0 again (the kernel refuses a new
serial while an object is exported, so a wrong one is replaced, never edited). Growing needs no LUN
swap: block backstores follow their device's size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockwire.errors import FailedPrecondition, Unavailable
from blockwire.validate import split_portal
from storagesvc.targets.base import LunState, TargetSpec, TargetState, same_path

log = logging.getLogger(__name__)

LIO_DEFAULT_OUI = "001405"
CONFIGFS = Path("/sys/kernel/config/target")
DBROOT = Path("/etc/target")  # rtslib-fb's preferred dbroot


def _rtslib() -> Any:
    try:
        import rtslib_fb  # noqa: PLC0415 - optional, and only where LIO exists
    except ImportError as exc:
        raise Unavailable("the lio exporter needs rtslib-fb: pip install 'blockwire[lio]'") from exc
    return rtslib_fb


def lio_wwn(serial: str, company_id: str) -> str:
    """The NAA-6 designator LIO announces (target_core_spc.c spc_gen_naa_6h_vendor_specific): ``6`` +
    company id + the serial's hex digits (at most 25), zero-filled to 32 digits."""
    digits = "".join(c for c in serial.lower() if c in "0123456789abcdef")[:25]
    return f"6{company_id}{digits}".ljust(32, "0")


class LioExporter:
    kind = "lio"
    lun = 0

    def __init__(
        self,
        portals: Sequence[str],
        *,
        naa_oui: str = LIO_DEFAULT_OUI,
        rtslib: Any | None = None,
        configfs: Path = CONFIGFS,
    ) -> None:
        self.portals = tuple(portals)
        self.naa_oui = naa_oui
        self._rts_module = rtslib  # rtslib_fb, or a stand-in with its API (tests); None: import it
        self.configfs = configfs

    def _rts(self) -> Any:
        return self._rts_module if self._rts_module is not None else _rtslib()

    def _so_name(self, volume_id: str) -> str:
        return f"bw-{volume_id}"

    def start(self) -> None:
        if not self.configfs.is_dir():
            raise Unavailable(
                f"LIO is not available: {self.configfs} is missing (mount configfs, load target_core_mod)"
            )
        self._rts()
        self._ensure_dbroot()

    def _ensure_dbroot(self) -> None:
        """rtslib-fb (2.1.76 and later) points LIO's dbroot (persistent reservation metadata) at
        /etc/target whenever it opens the configuration, and fails every call with "Cannot set dbroot"
        when that directory is missing (the kernel logs "db_root: cannot open: /etc/target"); targetcli
        creates it on first save. Create it here, as the first user of LIO on this host would."""
        if (self.configfs / "dbroot").is_file() and not DBROOT.is_dir():
            try:
                DBROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise Unavailable(
                    f"LIO needs {DBROOT} (rtslib-fb's dbroot); cannot create it: {exc}"
                ) from exc
            log.info("created %s, LIO's configuration directory", DBROOT)

    def healthy(self) -> bool:
        return self.configfs.is_dir()

    def _storage_object(self, rts: Any, spec: TargetSpec, undo: contextlib.ExitStack) -> Any:
        """The volume's storage object on its device with its serial: the existing one, or a new one
        (deleted again by `undo`). One on another device or with another serial is replaced: deleting
        it takes its LUNs and their mapped LUNs with it; `ensure_target` and `allow` make them again."""
        name = self._so_name(spec.volume_id)
        for so in rts.RTSRoot().storage_objects:
            if so.name != name:
                continue
            if same_path(so.udev_path, spec.device_path) and so.wwn == spec.serial:
                return so
            log.warning(
                "LIO storage object %s is on %s with serial %s, not %s %s: replacing it",
                name,
                so.udev_path,
                so.wwn,
                spec.device_path,
                spec.serial,
            )
            so.delete()
            break
        if stat.S_ISBLK(os.stat(spec.device_path).st_mode):
            so = rts.BlockStorageObject(name, dev=spec.device_path, wwn=spec.serial, readonly=spec.readonly)
        else:
            size = os.stat(spec.device_path).st_size
            so = rts.FileIOStorageObject(
                name, dev=spec.device_path, size=size, wwn=spec.serial, write_back=False
            )
        self._set_company_id(so)  # deletes it itself when it refuses
        undo.callback(so.delete)
        return so

    def _set_company_id(self, so: Any) -> None:
        if self.naa_oui == LIO_DEFAULT_OUI:
            return
        attr = Path(so.path) / "wwn" / "company_id"
        if not attr.exists():
            so.delete()
            raise FailedPrecondition(
                f"this kernel's LIO cannot announce company id {self.naa_oui} (no wwn/company_id); "
                f"set naa_oui = {LIO_DEFAULT_OUI!r} for LIO backends"
            )
        attr.write_text(f"0x{self.naa_oui}\n")

    def ensure_target(self, spec: TargetSpec) -> None:
        rts = self._rts()
        with contextlib.ExitStack() as undo:
            so = self._storage_object(rts, spec, undo)
            fabric = rts.FabricModule("iscsi")
            target = rts.Target(fabric, spec.target_iqn)  # mode "any": create or look up
            undo.callback(target.delete)
            tpg = rts.TPG(target, 1)
            for portal in self.portals:
                ip, port = split_portal(portal)
                rts.NetworkPortal(tpg, ip, port)
            lun = next((x for x in tpg.luns if x.lun == self.lun), None)
            if lun is not None and lun.storage_object.name != so.name:
                log.warning(
                    "LIO target %s: LUN %d used another storage object; replacing it",
                    spec.target_iqn,
                    self.lun,
                )
                lun.delete()
                lun = None
            if lun is None:
                rts.LUN(tpg, self.lun, so)
            tpg.set_attribute("authentication", "1")
            tpg.set_attribute("generate_node_acls", "0")
            tpg.set_attribute("demo_mode_write_protect", "1")
            tpg.enable = True
            undo.pop_all()
        log.info("LIO target %s exports %s", spec.target_iqn, spec.device_path)

    def _target(self, rts: Any, target_iqn: str) -> Any | None:
        fabric = rts.FabricModule("iscsi")
        return next((t for t in fabric.targets if t.wwn == target_iqn), None)

    def remove_target(self, target_iqn: str) -> None:
        rts = self._rts()
        target = self._target(rts, target_iqn)
        objects: set[str] = set()
        if target is not None:
            for tpg in target.tpgs:
                objects.update(lun.storage_object.name for lun in tpg.luns)
            target.delete()
        volume_id = target_iqn.rpartition(":")[2]
        objects.add(self._so_name(volume_id))
        for so in rts.RTSRoot().storage_objects:
            if so.name in objects:
                so.delete()
        log.info("LIO target %s removed", target_iqn)

    def allow(self, spec: TargetSpec, initiator_iqn: str) -> None:
        rts = self._rts()
        target = self._target(rts, spec.target_iqn)
        if target is None:
            raise Unavailable(f"target {spec.target_iqn} is gone from LIO; export checks rebuild it: retry")
        tpg = next(iter(target.tpgs))
        acl = rts.NodeACL(tpg, initiator_iqn)
        if spec.chap is not None:
            acl.chap_userid = spec.chap.username
            acl.chap_password = spec.chap.password.reveal()
        if spec.mutual_chap is not None:
            acl.chap_mutual_userid = spec.mutual_chap.username
            acl.chap_mutual_password = spec.mutual_chap.password.reveal()
        if not any(m.mapped_lun == self.lun for m in acl.mapped_luns):
            lun = next(lun for lun in tpg.luns if lun.lun == self.lun)
            rts.MappedLUN(acl, self.lun, lun, write_protect=spec.readonly)

    def deny(self, target_iqn: str, initiator_iqn: str) -> None:
        rts = self._rts()
        target = self._target(rts, target_iqn)
        if target is None:
            return
        for tpg in target.tpgs:
            for acl in list(tpg.node_acls):
                if acl.node_wwn == initiator_iqn:
                    acl.delete()

    def resize(self, spec: TargetSpec) -> None:
        """Block backstores follow the device's size by themselves; fileio ones cannot grow in place."""
        if not stat.S_ISBLK(os.stat(spec.device_path).st_mode):
            raise FailedPrecondition("LIO fileio exports cannot grow while attached; detach, extend, attach")

    def list_targets(self, prefix: str) -> list[TargetState]:
        rts = self._rts()
        out = []
        for t in rts.FabricModule("iscsi").targets:
            if t.wwn.startswith(prefix):
                tpgs = list(t.tpgs)
                initiators = tuple(acl.node_wwn for tpg in tpgs for acl in tpg.node_acls)
                lun = next((x for tpg in tpgs for x in tpg.luns if x.lun == self.lun), None)
                out.append(TargetState(t.wwn, initiators, self._lun_state(lun) if lun is not None else None))
        return out

    def _lun_state(self, lun: Any) -> LunState:
        so = lun.storage_object
        company = Path(so.path) / "wwn" / "company_id"
        oui = company.read_text().strip().removeprefix("0x").zfill(6) if company.exists() else LIO_DEFAULT_OUI
        return LunState(self.lun, so.udev_path, lio_wwn(so.wwn, oui), so.wwn)
