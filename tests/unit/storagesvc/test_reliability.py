"""StorageService reliability on fakes: an unexpected failure at every step of an export undoes it;
tgt CHAP accounts that no target uses are pruned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.model import AccessMode
from blockwire.runtime import failpoints
from storagesvc import service
from storagesvc.model import VolumeState
from storagesvc.targets.tgt import TgtExporter, parse_accounts
from tests.fakes.executor import FakeRunner, Reply
from tests.unit.storagesvc.test_service import HOST_A, Rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.catalog.close()


@pytest.mark.parametrize(
    "failpoint",
    [service.FP_EXPORT_AFTER_CATALOG, service.FP_EXPORT_AFTER_TARGET, service.FP_EXPORT_AFTER_ACL],
)
def test_a_failure_at_every_export_step_leaves_nothing(rig: Rig, failpoint: str) -> None:
    vid = rig.volume()
    with rig.service.ctx.failpoints.armed({failpoint: "raise"}), pytest.raises(failpoints.FailpointHit):
        rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    assert rig.catalog.list_attachments(volume_id=vid, after=None, limit=10) == []
    assert rig.exporter.targets == {}
    assert rig.service.get_volume(vid).state is VolumeState.AVAILABLE


def test_parse_accounts() -> None:
    assert parse_accounts("Account list:\n    out-x\n    in-abc\n") == ["out-x", "in-abc"]
    assert parse_accounts("Account list:\n") == []


def test_tgt_prunes_only_our_unbound_accounts() -> None:
    show = "Target 1: iqn.x:1\n    System information:\n    Account information:\n        in-aaa\n"
    runner = (
        FakeRunner()
        .on(r"--op show --mode target", Reply(stdout=show))
        .on(r"--op show --mode account", Reply(stdout="Account list:\n    in-aaa\n    in-bbb\n    admin\n"))
        .on(r"--op delete --mode account", Reply())
    )
    exporter = TgtExporter(runner, ("127.0.0.1:3260",), control_port=7)
    assert exporter.prune_accounts(lambda u: u.startswith("in-")) == ["in-bbb"]
    assert [c[-1] for c in runner.ran(r"--op delete --mode account")] == ["in-bbb"]
