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
from storagesvc.targets.base import TargetSpec, TargetState

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


def _split_portal(portal: str) -> tuple[str, int]:
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


class LioExporter:
    kind = "lio"
    lun = 0

    def __init__(self, portals: Sequence[str], *, naa_oui: str = LIO_DEFAULT_OUI) -> None:
        self.portals = tuple(portals)
        self.naa_oui = naa_oui

    def _so_name(self, volume_id: str) -> str:
        return f"bw-{volume_id}"

    def start(self) -> None:
        if not CONFIGFS.is_dir():
            raise Unavailable(
                f"LIO is not available: {CONFIGFS} is missing (mount configfs, load target_core_mod)"
            )
        _rtslib()
        self._ensure_dbroot()

    def _ensure_dbroot(self) -> None:
        """rtslib-fb (2.1.76 and later) points LIO's dbroot (persistent reservation metadata) at
        /etc/target whenever it opens the configuration, and fails every call with "Cannot set dbroot"
        when that directory is missing (the kernel logs "db_root: cannot open: /etc/target"); targetcli
        creates it on first save. Create it here, as the first user of LIO on this host would."""
        if (CONFIGFS / "dbroot").is_file() and not DBROOT.is_dir():
            try:
                DBROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise Unavailable(
                    f"LIO needs {DBROOT} (rtslib-fb's dbroot); cannot create it: {exc}"
                ) from exc
            log.info("created %s, LIO's configuration directory", DBROOT)

    def healthy(self) -> bool:
        return CONFIGFS.is_dir()

    def _storage_object(self, rts: Any, spec: TargetSpec) -> Any:
        name = self._so_name(spec.volume_id)
        for so in rts.RTSRoot().storage_objects:
            if so.name == name:
                return so
        if stat.S_ISBLK(os.stat(spec.device_path).st_mode):
            so = rts.BlockStorageObject(name, dev=spec.device_path, wwn=spec.serial, readonly=spec.readonly)
        else:
            size = os.stat(spec.device_path).st_size
            so = rts.FileIOStorageObject(
                name, dev=spec.device_path, size=size, wwn=spec.serial, write_back=False
            )
        self._set_company_id(so)
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
        rts = _rtslib()
        with contextlib.ExitStack() as undo:
            existed = any(so.name == self._so_name(spec.volume_id) for so in rts.RTSRoot().storage_objects)
            so = self._storage_object(rts, spec)
            if not existed:
                undo.callback(so.delete)
            fabric = rts.FabricModule("iscsi")
            target = rts.Target(fabric, spec.target_iqn)  # mode "any": create or look up
            undo.callback(target.delete)
            tpg = rts.TPG(target, 1)
            for portal in self.portals:
                ip, port = _split_portal(portal)
                rts.NetworkPortal(tpg, ip, port)
            if not any(lun.lun == self.lun for lun in tpg.luns):
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
        rts = _rtslib()
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
        rts = _rtslib()
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
        rts = _rtslib()
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
        rts = _rtslib()
        out = []
        for t in rts.FabricModule("iscsi").targets:
            if t.wwn.startswith(prefix):
                initiators = tuple(acl.node_wwn for tpg in t.tpgs for acl in tpg.node_acls)
                out.append(TargetState(t.wwn, initiators))
        return out
