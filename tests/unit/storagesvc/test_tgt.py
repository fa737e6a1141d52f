"""TgtExporter against a FakeRunner: the tgtadm calls, idempotency, undo, secrets, and the parser on recorded
output (tests/unit/storagesvc/data/tgtadm_show_target.txt, from tgt 1.0.85)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockwire.errors import Unavailable
from blockwire.model import Chap
from blockwire.secret import Secret
from storagesvc.targets.base import TargetSpec
from storagesvc.targets.tgt import TgtExporter, parse_portals, parse_targets
from tests.fakes.executor import FakeRunner, Reply

DATA = Path(__file__).parent / "data"
VID = "0123456789abcdef0123456789abcdef"
IQN = f"iqn.2026-01.io.blockwire:{VID}"
SECRET = "S3cretS3cretS3cr"
SPEC = TargetSpec(
    volume_id=VID,
    target_iqn=IQN,
    device_path=f"/v/{VID}.raw",
    wwn="6001405" + VID[:20] + "00000",
    serial=VID[:20],
    readonly=False,
    chap=Chap(f"in-{VID[:24]}", Secret(SECRET)),
)
SHOWN = (DATA / "tgtadm_show_target.txt").read_text()


def exporter(runner: FakeRunner) -> TgtExporter:
    return TgtExporter(runner, ("127.0.0.1:3260", "127.0.0.2:3260"), control_port=7)


def test_parse_recorded_show_target() -> None:
    first, second = parse_targets(SHOWN)
    assert (first.tid, first.iqn, first.luns) == (1, IQN, (0, 1))
    assert first.accounts == (f"in-{VID[:24]}", "other-account")
    assert first.outgoing_accounts == (f"out-{VID[:24]}",)
    assert first.acl == ("ALL", "iqn.2024-01.test:good", "iqn.2024-01.test:other")
    assert (second.tid, second.luns, second.accounts, second.acl) == (3, (0,), (), ())
    assert parse_targets("") == []


def test_parse_portals() -> None:
    assert parse_portals("Portal: 127.0.0.1:3260,1\nPortal: [::1]:3260,1\n") == [
        "127.0.0.1:3260",
        "[::1]:3260",
    ]


def test_ensure_target_creates_target_lun_identity_and_chap_without_leaking_the_secret() -> None:
    runner = FakeRunner().on(r"--op show --mode target", Reply(stdout=""))
    exporter(runner).ensure_target(SPEC)
    ops = [" ".join(c[5:9]) for c in runner.calls if "show" not in c]
    assert ops == [
        "--op new --mode target",
        "--op new --mode logicalunit",
        "--op update --mode logicalunit",
        "--op delete --mode account",
        "--op new --mode account",
        "--op bind --mode account",
    ]
    (update,) = runner.ran(r"--op update --mode logicalunit")
    assert f"scsi_id={SPEC.wwn},scsi_sn={SPEC.serial},readonly=0" in update
    assert all(c[:3] == ("tgtadm", "-C", "7") for c in runner.calls)
    assert all(SECRET not in " ".join(c) for c in runner.calls)  # redacted in what is recorded/logged
    assert any(SECRET in c for c in runner.revealed)  # and handed to tgtadm itself


def test_a_failed_bind_undoes_the_account_and_the_target() -> None:
    runner = (
        FakeRunner()
        .on(r"--op show --mode target", Reply(stdout=""))
        .on(r"--op bind --mode account", Reply(22, stderr="tgtadm: can't find the target"))
    )
    with pytest.raises(Unavailable, match="can't find"):
        exporter(runner).ensure_target(SPEC)
    assert runner.ran(r"--op delete --mode account --user in-")[-1]
    (delete,) = runner.ran(r"--op delete --mode target")
    assert "--tid" in delete
    assert "1" in delete


def test_ensure_target_of_an_existing_target_is_a_repeat() -> None:
    runner = FakeRunner().on(r"--op show --mode target", Reply(stdout=SHOWN))
    exporter(runner).ensure_target(SPEC)
    assert not runner.ran(r"--op new --mode target")
    assert not runner.ran(r"--op new --mode logicalunit")  # LUN 1 is there


def test_tids_skip_those_in_use() -> None:
    runner = FakeRunner().on(r"--op show --mode target", Reply(stdout=SHOWN))
    other = TargetSpec(**{**SPEC.__dict__, "target_iqn": "iqn.2026-01.io.blockwire:new"})
    exporter(runner).ensure_target(other)
    (new,) = runner.ran(r"--op new --mode target")
    assert new[new.index("--tid") + 1] == "2"


def test_remove_target_deletes_its_accounts_and_is_idempotent() -> None:
    runner = FakeRunner().on(r"--op show --mode target", Reply(stdout=SHOWN))
    exporter(runner).remove_target(IQN)
    assert runner.ran(r"--op delete --mode target --tid 1 --force")
    users = [c[c.index("--user") + 1] for c in runner.ran(r"--op delete --mode account")]
    assert users == [f"in-{VID[:24]}", "other-account", f"out-{VID[:24]}"]
    gone = FakeRunner().on(r"--op show --mode target", Reply(stdout=""))
    exporter(gone).remove_target(IQN)
    assert [c[5:9] for c in gone.calls] == [("--op", "show", "--mode", "target")]


def test_allow_and_deny_are_idempotent() -> None:
    runner = FakeRunner().on(r"--op show --mode target", Reply(stdout=SHOWN))
    e = exporter(runner)
    e.allow(SPEC, "iqn.2024-01.test:good")  # already in the ACL
    e.allow(SPEC, "iqn.2024-01.test:new")
    e.deny(IQN, "iqn.2024-01.test:absent")
    e.deny(IQN, "iqn.2024-01.test:other")
    assert [c[-1] for c in runner.ran(r"--op (un)?bind --mode target")] == [
        "iqn.2024-01.test:new",
        "iqn.2024-01.test:other",
    ]


def test_tgtd_not_running_is_unavailable() -> None:
    runner = FakeRunner().on(r".*", Reply(107, stderr="tgtadm: failed to send request hdr to tgt daemon"))
    e = exporter(runner)
    with pytest.raises(Unavailable, match="not running on control port 7"):
        e.ensure_target(SPEC)
    assert not e.healthy()


def test_start_adds_missing_portals_only() -> None:
    runner = FakeRunner().on(r"--op show --mode portal", Reply(stdout="Portal: 127.0.0.1:3260,1\n"))
    exporter(runner).start()
    assert [c[-1] for c in runner.ran(r"--op new --mode portal")] == ["portal=127.0.0.2:3260"]
