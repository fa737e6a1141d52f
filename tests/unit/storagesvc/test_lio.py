"""The LIO exporter on a stand-in for rtslib-fb (tests/fakes/rtslib.py; the real LIO runs in the guest
tier): what its target listing says about LUN 0, and how the export checks put back a LUN that was lost,
or whose storage object is on another backing or has another serial (issue 11, item 7)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.model import AccessMode, Connector
from blockwire.runtime.executor import Executor
from storagesvc import identity
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.model import MIB, CreateVolumeSpec
from storagesvc.service import Pool, StorageService
from storagesvc.targets.lio import LioExporter, lio_wwn
from tests.fakes.clock import FakeClock
from tests.fakes.jobs import InlineJobs
from tests.fakes.rtslib import FakeRtslib, Tpg

PREFIX = "iqn.2026-01.io.blockwire.unit"
HOST_A = Connector(host="a", initiator_iqn="iqn.2026-01.io.example:a")
HOST_B = Connector(host="b", initiator_iqn="iqn.2026-01.io.example:b")


class Rig:
    def __init__(self, root: Path) -> None:
        (root / "configfs").mkdir()
        self.lio = FakeRtslib(root / "lio")
        self.exporter = LioExporter(("127.0.0.1:3260",), rtslib=self.lio, configfs=root / "configfs")
        self.backend = FileBackend("file", root / "file", Executor())
        self.catalog = SqliteCatalog(root / "c.db")
        self.service = StorageService(
            self.catalog,
            {"file": Pool(self.backend, self.exporter, "lio")},
            FakeClock(),
            InlineJobs(),
            iqn_prefix=PREFIX,
            lock_timeout=0.2,
        )

    def attached(self, *hosts: Connector) -> str:
        vid = self.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB, multiattach=True)).id
        for h in hosts:
            self.service.complete_attachment(self.service.create_attachment(vid, h, AccessMode.READ_WRITE).id)
        return vid

    def tpg(self) -> Tpg:
        (target,) = self.lio.targets
        (tpg,) = target.tpgs
        return tpg

    def whole(self, vid: str) -> None:
        """LUN 0 on the volume's file with its serial, mapped for every attached initiator."""
        v = self.service.get_volume(vid)
        (lun,) = self.tpg().luns
        so = lun.storage_object
        assert (lun.lun, so.udev_path, so.wwn) == (0, self.backend.device_path(vid), v.serial)
        assert {a.node_wwn: [m.tpg_lun for m in a.mapped_luns] for a in self.tpg().node_acls} == {
            a.connector.initiator_iqn: [lun]
            for a in self.catalog.list_attachments(volume_id=vid, after=None, limit=10)
        }
        (state,) = self.exporter.list_targets(PREFIX + ":")
        assert state.lun is not None
        assert state.lun.wwn == v.wwn
        assert state.lun.differs(self.service._spec(v, v.export)) == ""  # type: ignore[arg-type]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.catalog.close()


def test_the_listing_reports_lun_0_with_the_wwn_lio_announces(rig: Rig) -> None:
    vid = rig.attached(HOST_A)
    rig.whole(vid)
    vid2 = "0123456789abcdef0123456789abcdef"
    assert lio_wwn(identity.serial_for(vid2), "001405") == identity.wwn_for(vid2, "001405")
    assert rig.service.repair_exports() == []  # intact: nothing to do


def test_a_lost_lun_0_is_made_again_and_mapped_for_every_host(rig: Rig) -> None:
    vid = rig.attached(HOST_A, HOST_B)
    (lun,) = rig.tpg().luns
    lun.delete()  # behind storage's back: the mapped LUNs go with it
    (state,) = rig.exporter.list_targets(PREFIX + ":")
    assert state.lun is None
    assert rig.service.repair_exports() == [vid]
    rig.whole(vid)
    assert rig.service.repair_exports() == []


@pytest.mark.parametrize(("attribute", "value"), [("udev_path", "/elsewhere.raw"), ("wwn", "beaf11")])
def test_a_storage_object_on_another_backing_or_serial_is_replaced(
    rig: Rig, attribute: str, value: str
) -> None:
    vid = rig.attached(HOST_A)
    (so,) = rig.lio.objects
    setattr(so, attribute, value)
    assert rig.service.repair_exports() == [vid]
    (replaced,) = rig.lio.objects
    assert replaced is not so
    rig.whole(vid)
