"""The export supervisor on fakes: a tgtd that forgot its targets (restarted) gets the catalog's exports
back (target, LUN, CHAP account, ACL) on the next check, counted as "export_repair"; intact exports
cost one `tgtadm --op show --mode target`; what the catalog does not export is never created; a
volume with a call in flight is left for the next round; the loop stops within a bound."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.errors import Unavailable
from blockwire.model import AccessMode, Connector
from blockwire.runtime.executor import Executor
from blockwire.runtime.periodic import Periodic
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.config import ConfigError, ServiceConfig, parse
from storagesvc.model import MIB, CreateVolumeSpec, VolumeState
from storagesvc.service import Pool, StorageService
from storagesvc.supervisor import ExportSupervisor
from storagesvc.targets.tgt import TgtExporter
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.jobs import InlineJobs
from tests.fakes.tgtd import FakeTgtd

PREFIX = "iqn.2026-01.io.blockwire.unit"
HOST_A = Connector(host="a", initiator_iqn="iqn.2026-01.io.example:a")
HOST_B = Connector(host="b", initiator_iqn="iqn.2026-01.io.example:b")
PORTALS = ("127.0.0.1:3260", "127.0.0.2:3260")


class Rig:
    def __init__(self, root: Path) -> None:
        self.tgtd = FakeTgtd()
        self.clock = FakeClock()
        self.catalog = SqliteCatalog(root / "c.db")
        self.exporter = TgtExporter(self.tgtd, PORTALS, control_port=7)
        self.service = StorageService(
            self.catalog,
            {"file": Pool(FileBackend("file", root / "file", Executor()), self.exporter, "tgt")},
            self.clock,
            InlineJobs(),
            iqn_prefix=PREFIX,
            lock_timeout=0.2,
        )
        self.service.reconcile()
        self.supervisor = ExportSupervisor(self.service, 2.0)

    def attached(self, name: str, *hosts: Connector) -> str:
        vid = self.service.create_volume(CreateVolumeSpec(name=name, size_bytes=4 * MIB, multiattach=True)).id
        for h in hosts:
            a = self.service.create_attachment(vid, h, AccessMode.READ_WRITE)
            self.service.complete_attachment(a.id)
        return vid

    def restart_tgtd(self) -> None:
        self.tgtd.targets.clear()
        self.tgtd.accounts.clear()
        self.tgtd.portals.clear()

    def targets(self) -> dict[str, tuple[set[int], set[str], set[str]]]:
        return {t.iqn: (set(t.luns), set(t.accounts), set(t.acl)) for t in self.tgtd.targets.values()}

    def repairs(self) -> tuple[int, int]:
        _, ops = self.service.backend_stats()
        found = [(o.count, o.errors) for o in ops if o.operation == "export_repair"]
        return found[0] if found else (0, 0)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.supervisor.stop()
    r.catalog.close()


def test_a_restarted_tgtd_gets_the_exports_back_on_the_next_check(rig: Rig) -> None:
    vid = rig.attached("v", HOST_A, HOST_B)
    before = rig.targets()
    iqn = f"{PREFIX}:{vid}"
    assert before[iqn] == ({0, 1}, {f"in-{vid[:24]}"}, {HOST_A.initiator_iqn, HOST_B.initiator_iqn})
    rig.restart_tgtd()

    assert rig.supervisor.check() == [vid]

    assert rig.targets() == before  # target, LUN 1, the CHAP account bound, both initiators
    assert f"in-{vid[:24]}" in rig.tgtd.accounts
    assert rig.tgtd.portals == set(PORTALS)  # tgtd listens again
    lun = [a for a in rig.tgtd.argvs if "logicalunit" in a and "update" in a][-1]
    v = rig.service.get_volume(vid)
    assert f"scsi_id={v.wwn},scsi_sn={v.serial},readonly=0" in lun  # the same LUN identity
    assert rig.repairs() == (1, 0)
    assert rig.supervisor.check() == []
    assert rig.repairs() == (1, 0)


def test_intact_exports_cost_one_show_and_change_nothing(rig: Rig) -> None:
    rig.attached("v", HOST_A)
    rig.attached("w", HOST_B)
    rig.tgtd.argvs.clear()
    assert rig.supervisor.check() == []
    assert [a[5:9] for a in rig.tgtd.argvs] == [("--op", "show", "--mode", "target")]


def test_a_lost_acl_entry_is_put_back(rig: Rig) -> None:
    vid = rig.attached("v", HOST_A, HOST_B)
    tid = next(t for t, x in rig.tgtd.targets.items() if x.iqn.endswith(vid))
    rig.tgtd.targets[tid].acl.discard(HOST_B.initiator_iqn)
    assert rig.supervisor.check() == [vid]
    assert rig.tgtd.targets[tid].acl == {HOST_A.initiator_iqn, HOST_B.initiator_iqn}


def test_what_the_catalog_does_not_export_is_not_created(rig: Rig) -> None:
    rig.service.create_volume(CreateVolumeSpec(name="idle", size_bytes=4 * MIB))
    vid = rig.attached("gone", HOST_A)
    (att,) = rig.catalog.list_attachments(volume_id=vid, after=None, limit=10)
    rig.service.delete_attachment(att.id)
    rig.restart_tgtd()
    assert rig.supervisor.check() == []
    assert rig.tgtd.targets == {}
    assert rig.repairs() == (0, 0)


def test_a_volume_with_a_call_in_flight_waits_for_the_next_round(rig: Rig) -> None:
    vid = rig.attached("v", HOST_A)
    rig.restart_tgtd()
    with rig.service.locks.hold(vid, "test"):
        holder_done = threading.Event()
        result: list[list[str]] = []
        t = threading.Thread(target=lambda: (result.append(rig.supervisor.check()), holder_done.set()))
        t.start()
        assert holder_done.wait(10)
    t.join(10)
    assert result == [[]]  # ABORTED on the lock: logged, counted as a failed repair
    assert rig.repairs() == (1, 1)
    assert rig.supervisor.check() == [vid]
    assert f"{PREFIX}:{vid}" in rig.targets()


def test_tgtd_down_is_logged_and_retried(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    vid = rig.attached("v", HOST_A)
    rig.exporter.runner = FakeRunner().on("tgtadm", Reply(107, stderr="tgtadm: can't connect to tgtd"))
    assert rig.supervisor.check() == []
    assert "checking its exports failed" in caplog.text
    rig.exporter.runner = rig.tgtd
    rig.restart_tgtd()
    assert rig.supervisor.check() == [vid]


def test_the_loop_runs_on_the_injected_waiter_and_stops_within_a_bound(rig: Rig) -> None:
    vid = rig.attached("v", HOST_A)
    rig.restart_tgtd()
    waits: list[float] = []
    rounds = threading.Event()

    def waiter(stop: threading.Event, seconds: float) -> bool:
        waits.append(seconds)
        rig.clock.advance(seconds)
        if len(waits) >= 3:
            rounds.set()
            return stop.wait(30)
        return stop.is_set()

    sup = ExportSupervisor(rig.service, 2.0, waiter=waiter)
    sup.start()
    assert rounds.wait(10)
    assert f"{PREFIX}:{vid}" in rig.targets()
    assert sup.stop(timeout=5)
    assert not sup.periodic.running
    assert waits == [2.0, 2.0, 2.0]
    assert rig.repairs() == (1, 0)


def test_interval_zero_starts_no_thread() -> None:
    p = Periodic("x", 0, lambda: None)
    p.start()
    assert not p.running
    assert p.stop(timeout=1)


def test_a_failing_check_does_not_end_the_loop() -> None:
    calls: list[int] = []
    done = threading.Event()

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:
            done.set()
        raise RuntimeError("boom")

    p = Periodic("x", 1.0, check, waiter=lambda stop, s: stop.is_set() or (done.is_set() and stop.wait(30)))
    p.start()
    assert done.wait(10)
    assert p.stop(timeout=5)
    assert len(calls) == 2


def test_config_export_check_interval() -> None:
    base = {"backends": [{"name": "f", "kind": "file", "exporter": "tgt", "path": "/x"}]}
    base["exporters"] = {"tgt": {"portals": ["127.0.0.1:3260"]}}  # type: ignore[dict-item]
    assert parse(base).service.export_check_interval == ServiceConfig().export_check_interval == 2.0
    assert parse({**base, "service": {"export_check_interval": 0}}).service.export_check_interval == 0
    with pytest.raises(ConfigError, match="export_check_interval"):
        parse({**base, "service": {"export_check_interval": -1}})


# -- the LUN itself: lost, on another backing, another identity (issue 11, item 7)


def lun1(rig: Rig, vid: str) -> tuple[str, str, str, bool]:
    (t,) = [t for t in rig.tgtd.targets.values() if t.iqn.endswith(vid)]
    u = t.luns[1]
    return u.path, u.scsi_id, u.scsi_sn, u.online


def whole(rig: Rig, vid: str) -> tuple[str, str, str, bool]:
    v = rig.service.get_volume(vid)
    return rig.service.pools["file"].backend.device_path(vid), v.wwn, v.serial, True


def test_a_target_that_lost_its_lun_gets_it_back_with_its_identity(rig: Rig) -> None:
    vid = rig.attached("v", HOST_A, HOST_B)
    (t,) = rig.tgtd.targets.values()
    del t.luns[1]  # tgtadm --op delete --mode logicalunit behind storage's back
    assert rig.supervisor.check() == [vid]
    assert lun1(rig, vid) == whole(rig, vid)
    assert t.acl == {HOST_A.initiator_iqn, HOST_B.initiator_iqn}  # the target and its ACL stayed
    assert rig.repairs() == (1, 0)
    assert rig.supervisor.check() == []


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("path", "/elsewhere/other.raw"),
        ("scsi_id", "IET     00010001"),
        ("scsi_sn", "beaf11"),
        ("online", False),
    ],
)
def test_a_lun_changed_behind_storages_back_is_put_right_in_place(
    rig: Rig, attribute: str, value: object
) -> None:
    vid = rig.attached("v", HOST_A)
    (t,) = rig.tgtd.targets.values()
    setattr(t.luns[1], attribute, value)
    rig.tgtd.argvs.clear()
    assert rig.supervisor.check() == [vid]
    assert lun1(rig, vid) == whole(rig, vid)
    assert not [a for a in rig.tgtd.argvs if "logicalunit" in a and ("delete" in a or "new" in a)]
    assert rig.repairs() == (1, 0)


def test_an_extend_that_fails_in_the_middle_is_finished_by_the_export_checks(rig: Rig) -> None:
    vid = rig.attached("v", HOST_A)
    path = rig.service.pools["file"].backend.device_path(vid)
    rig.tgtd.fail_opens += [path, path]  # the re-open fails, and so does putting it back
    with pytest.raises(Unavailable):
        rig.service.extend_volume(vid, 8 * MIB)
    v = rig.service.get_volume(vid)
    assert (v.state, v.size_bytes) == (VolumeState.IN_USE, 4 * MIB)
    assert lun1(rig, vid) == ("", v.wwn, v.serial, False)  # offline, but never another identity
    assert rig.supervisor.check() == [vid]
    assert lun1(rig, vid) == whole(rig, vid)
    assert rig.service.extend_volume(vid, 8 * MIB).size_bytes == 8 * MIB  # the repeat goes through
    assert lun1(rig, vid) == whole(rig, vid)
