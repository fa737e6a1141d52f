"""TgtExporter against a FakeRunner: the tgtadm calls, idempotency, undo, secrets, and the parser on recorded
output (tests/unit/storagesvc/data/tgtadm_show_target.txt, from tgt 1.0.85)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockwire.errors import FailedPrecondition, Unavailable
from blockwire.model import Chap
from blockwire.secret import Secret
from storagesvc.targets.base import TargetSpec
from storagesvc.targets.tgt import TgtExporter, parse_portals, parse_targets
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.tgtd import FakeTgtd

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


def listing(text: str) -> FakeRunner:
    """A runner whose tgtd has the targets of `text`: it lists them, and refuses a new target of a taken
    tid or IQN as tgtd does."""
    taken = parse_targets(text)

    def new_target(argv: tuple[str, ...]) -> Reply:
        tid, iqn = argv[argv.index("--tid") + 1], argv[argv.index("-T") + 1]
        if any(str(t.tid) == tid or t.iqn == iqn for t in taken):
            return Reply(22, stderr="tgtadm: this target already exists")
        return Reply()

    return (
        FakeRunner()
        .on(r"--op show --mode target", Reply(stdout=text))
        .on(r"--op new --mode target", new_target)
    )


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
        "--op new --mode account",
        "--op bind --mode account",
    ]
    assert not runner.ran(r"--op show --mode target")  # a new IQN: made at once, no listing
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


def test_an_account_left_from_before_is_made_again_with_the_recorded_password() -> None:
    runner = (
        FakeRunner()
        .on(r"--op show --mode target", Reply(stdout=""))
        .on(r"--op new --mode account", Reply(22, stderr="tgtadm: this account already exists"))
    )

    def made_again(argv: tuple[str, ...]) -> Reply:
        runner.on(r"--op new --mode account", Reply())  # gone now: the next create succeeds
        return Reply()

    runner.on(r"--op delete --mode account", made_again)
    exporter(runner).ensure_target(SPEC)
    ops = [" ".join(c[5:9]) for c in runner.calls if "account" in c]
    assert ops == [
        "--op new --mode account",
        "--op delete --mode account",
        "--op new --mode account",
        "--op bind --mode account",
    ]
    assert any(SECRET in c for c in runner.revealed if "new" in c and "account" in c)


def test_a_tid_taken_since_the_listing_is_picked_again_from_a_fresh_one() -> None:
    taken = "Target 1: iqn.2026-01.io.example:someone-else\n"
    runner = FakeRunner().on(r"--op show --mode target", Reply(stdout=""))

    def refuse_once(argv: tuple[str, ...]) -> Reply:
        runner.on(r"--op show --mode target", Reply(stdout=taken))  # another tgtadm user made tid 1
        runner.on(r"--op new --mode target", Reply())
        return Reply(22, stderr="tgtadm: this target already exists")

    runner.on(r"--op new --mode target", refuse_once)
    exporter(runner).ensure_target(SPEC)
    tids = [c[c.index("--tid") + 1] for c in runner.ran(r"--op new --mode target")]
    assert tids == ["1", "2"]


def test_allow_right_after_creating_the_target_binds_without_listing_it_again() -> None:
    runner = FakeRunner().on(r"--op show --mode target", Reply(stdout=""))
    e = exporter(runner)
    e.ensure_target(SPEC)
    shows = len(runner.ran(r"--op show --mode target"))
    e.allow(SPEC, "iqn.2024-01.test:new")
    (bind,) = runner.ran(r"--op bind --mode target")
    assert bind[bind.index("--tid") + 1] == "1"
    assert len(runner.ran(r"--op show --mode target")) == shows
    # only once: a later allow (another host) looks at the target as tgtd has it
    with pytest.raises(Unavailable, match="gone from tgtd"):
        e.allow(SPEC, "iqn.2024-01.test:second")


def test_allow_after_the_target_was_removed_does_not_use_the_made_tid() -> None:
    runner = FakeRunner().on(r"--op show --mode target", Reply(stdout=""))
    e = exporter(runner)
    e.ensure_target(SPEC)
    e.remove_target(SPEC.target_iqn)
    with pytest.raises(Unavailable, match="gone from tgtd"):
        e.allow(SPEC, "iqn.2024-01.test:new")
    assert not runner.ran(r"--op bind --mode target")


def test_ensure_target_of_an_existing_target_is_a_repeat() -> None:
    runner = listing(SHOWN)
    exporter(runner).ensure_target(SPEC)
    assert len(runner.ran(r"--op new --mode target")) == 1  # refused: the IQN is there (then listed)
    assert len(runner.ran(r"--op show --mode target")) == 1
    assert not runner.ran(r"--op delete")
    assert not runner.ran(r"--op new --mode logicalunit")  # LUN 1 is there


def test_tids_skip_those_in_use() -> None:
    runner = listing(SHOWN)
    other = TargetSpec(**{**SPEC.__dict__, "target_iqn": "iqn.2026-01.io.blockwire:new"})
    e = exporter(runner)
    e.ensure_target(other)
    # the next tid (1) is taken: refused, then listed and the first free one picked
    tids = [c[c.index("--tid") + 1] for c in runner.ran(r"--op new --mode target")]
    assert tids == ["1", "2"]
    # the one after goes past every tid listed, made at once without another listing
    e.ensure_target(TargetSpec(**{**SPEC.__dict__, "target_iqn": "iqn.2026-01.io.blockwire:third"}))
    tids = [c[c.index("--tid") + 1] for c in runner.ran(r"--op new --mode target")]
    assert tids == ["1", "2", str(max(t.tid for t in parse_targets(SHOWN)) + 1)]
    assert len(runner.ran(r"--op show --mode target")) == 1


def test_remove_target_deletes_its_accounts_and_is_idempotent() -> None:
    runner = listing(SHOWN)
    exporter(runner).remove_target(IQN)
    assert runner.ran(r"--op delete --mode target --tid 1 --force")
    users = [c[c.index("--user") + 1] for c in runner.ran(r"--op delete --mode account")]
    assert users == [f"in-{VID[:24]}", "other-account", f"out-{VID[:24]}"]
    gone = FakeRunner().on(r"--op show --mode target", Reply(stdout=""))
    exporter(gone).remove_target(IQN)
    assert [c[5:9] for c in gone.calls] == [("--op", "show", "--mode", "target")]


def test_allow_and_deny_are_idempotent() -> None:
    runner = listing(SHOWN)
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


# -- LUN 1 through an extend, and a LUN lost or changed behind storage's back (issue 11, item 7)


def exported(tgtd: FakeTgtd) -> TgtExporter:
    """An exporter on a FakeTgtd with SPEC's target made (LUN 1 with its identity, CHAP)."""
    e = TgtExporter(tgtd, ("127.0.0.1:3260",), control_port=7)
    e.ensure_target(SPEC)
    return e


def lun1(tgtd: FakeTgtd) -> tuple[str, str, str, bool, bool]:
    """(path, scsi_id, scsi_sn, online, readonly) of SPEC's LUN 1 as the fake tgtd has it."""
    (t,) = [t for t in tgtd.targets.values() if t.iqn == IQN]
    u = t.luns[1]
    return u.path, u.scsi_id, u.scsi_sn, u.online, u.readonly


WHOLE = (SPEC.device_path, SPEC.wwn, SPEC.serial, True, False)


def test_parse_reads_each_luns_backing_identity_and_state() -> None:
    first, second = parse_targets(SHOWN)
    unit = first.unit(1)
    assert unit is not None
    assert unit.path == f"/var/lib/blockwire/volumes/volumes/{VID}.raw"
    assert (unit.scsi_id, unit.scsi_sn) == ("6001405a1b2c3d4e5f60718293a4b5c6", "a1b2c3d4e5f607182930")
    assert (unit.online, unit.readonly) == (True, True)
    controller = first.unit(0)
    assert controller is not None
    assert (controller.scsi_id, controller.path) == ("IET     00010000", "")
    assert second.unit(1) is None


def test_resize_reopens_lun_1_in_place_and_it_never_loses_its_identity() -> None:
    tgtd = FakeTgtd()
    e = exported(tgtd)
    tgtd.argvs.clear()
    e.resize(SPEC)
    asked = [" ".join(a[5:]) for a in tgtd.argvs if "show" not in a]
    assert asked == [
        f"--op update --mode logicalunit --tid 1 --lun 1 --params online=0,path={SPEC.device_path}"
    ]
    assert lun1(tgtd) == WHOLE  # never deleted, never re-made with tgt's default identity


def test_a_resize_that_fails_in_the_middle_puts_the_lun_back_with_its_identity() -> None:
    tgtd = FakeTgtd()
    e = exported(tgtd)
    tgtd.fail_opens.append(SPEC.device_path)  # tgtd closes the backing, then cannot open it
    with pytest.raises(Unavailable, match="put back"):
        e.resize(SPEC)
    assert lun1(tgtd) == WHOLE
    assert [t.iqn for t in parse_targets(tgtd._show())] == [IQN]


def test_a_resize_whose_restore_fails_too_leaves_an_offline_lun_with_its_identity() -> None:
    tgtd = FakeTgtd()
    e = exported(tgtd)
    tgtd.fail_opens += [SPEC.device_path, SPEC.device_path]
    with pytest.raises(Unavailable):
        e.resize(SPEC)
    assert lun1(tgtd) == ("", SPEC.wwn, SPEC.serial, False, False)  # no backing, but never another identity
    (state,) = e.list_targets("iqn.2026-01.io.blockwire:")
    assert state.lun is not None
    assert "backed by nothing" in state.lun.differs(SPEC)  # what the export checks see, and repair:
    e.ensure_target(SPEC)
    assert lun1(tgtd) == WHOLE


def test_a_resize_refused_under_prevent_removal_changes_nothing() -> None:
    tgtd = FakeTgtd()
    e = exported(tgtd)
    (t,) = tgtd.targets.values()
    t.luns[1].prevent_removal = True
    with pytest.raises(FailedPrecondition, match="PREVENT MEDIUM REMOVAL"):
        e.resize(SPEC)
    assert lun1(tgtd) == WHOLE


def test_a_lost_lun_is_made_again_with_its_identity_on_resize_and_on_ensure() -> None:
    tgtd = FakeTgtd()
    e = exported(tgtd)
    (t,) = tgtd.targets.values()
    del t.luns[1]
    (state,) = e.list_targets("iqn.2026-01.io.blockwire:")
    assert state.lun is None
    e.resize(SPEC)
    assert lun1(tgtd) == WHOLE
    del t.luns[1]
    e.ensure_target(SPEC)
    assert lun1(tgtd) == WHOLE


def test_ensure_target_repairs_a_lun_on_another_backing_or_with_another_identity_in_place() -> None:
    tgtd = FakeTgtd()
    e = exported(tgtd)
    (t,) = tgtd.targets.values()
    t.luns[1].path = "/somewhere/else.raw"
    t.luns[1].scsi_sn = "beaf11"
    tgtd.argvs.clear()
    e.ensure_target(SPEC)
    assert lun1(tgtd) == WHOLE
    assert not [a for a in tgtd.argvs if "logicalunit" in a and ("delete" in a or "new" in a)]
    (state,) = e.list_targets("iqn.2026-01.io.blockwire:")
    assert state.lun is not None
    assert state.lun.differs(SPEC) == ""


def test_a_lun_whose_identity_cannot_be_set_is_not_left_behind() -> None:
    """Target 3 of the recorded output has lost LUN 1; tgtd refuses the identity update."""
    runner = listing(SHOWN).on(r"--op update --mode logicalunit", Reply(22, stderr="tgtadm: invalid request"))
    lost = TargetSpec(**{**SPEC.__dict__, "target_iqn": "iqn.2026-01.io.blockwire:ffff"})
    with pytest.raises(Unavailable, match="invalid request"):
        exporter(runner).ensure_target(lost)
    assert runner.ran(r"--op new --mode logicalunit --tid 3 --lun 1")
    assert runner.ran(r"--op delete --mode logicalunit --tid 3 --lun 1")  # no LUN with tgt's identity
    assert not runner.ran(r"--op delete --mode target")  # the target (and its sessions) stays
