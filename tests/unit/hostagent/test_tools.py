"""Parsers on real output recorded in the guest tier (tests/data/recorded), and the tools' exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockwire.errors import NotFound, PermissionDenied, Unavailable
from blockwire.secret import Secret
from hostagent.identity import normalize_wwn, same_wwn, wwn_from_wwid
from hostagent.tools.iscsiadm import (
    IDBM_LOCK_WAIT_SECONDS,
    Iscsiadm,
    parse_nodes,
    parse_session_details,
    parse_sessions,
)
from hostagent.tools.libiscsi import identities, parse_readcapacity16, parse_vpd80, parse_vpd83
from hostagent.tools.multipath import parse_multipath_ll, parse_show_maps, parse_show_paths
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.unit.hostagent.conftest import sample

RECORDED = Path(__file__).resolve().parents[2] / "data" / "recorded"
WWID = "36000000000000b000f3c2a9e5d7b4c61"
WWN = "6000000000000b000f3c2a9e5d7b4c61"
TARGET = "iqn.2024-01.test.blockwire:rec1"


def recorded(name: str) -> str:
    return (RECORDED / name).read_text(errors="replace")


def recorded_rc(name: str) -> tuple[int, str, str]:
    """Files written as "$ cmd / rc: N / --- stdout --- / ... / --- stderr --- / ..."."""
    text = recorded(name)
    rc = int(text.split("rc: ", 1)[1].split("\n", 1)[0])
    out = text.split("--- stdout ---\n", 1)[1].split("--- stderr ---\n", 1)
    return rc, out[0], out[1] if len(out) > 1 else ""


def test_parse_sessions_recorded() -> None:
    sessions = parse_sessions(recorded("iscsiadm_session.txt"))
    assert [(s.sid, s.portal, s.tpgt, s.target) for s in sessions] == [
        (3, "127.0.0.1:3260", 1, TARGET),
        (4, "127.0.0.2:3260", 1, TARGET),
    ]


def test_parse_nodes_recorded() -> None:
    nodes = parse_nodes(recorded("iscsiadm_node.txt"))
    assert [(n.portal, n.target) for n in nodes] == [("127.0.0.1:3260", TARGET), ("127.0.0.2:3260", TARGET)]


def test_parse_session_details_recorded() -> None:
    details = parse_session_details(recorded("iscsiadm_session_P3.txt"))
    assert [(d.portal, d.sid, d.host_number, d.disks) for d in details] == [
        ("127.0.0.1:3260", 3, 6, {1: "sda"}),
        ("127.0.0.2:3260", 4, 7, {1: "sdb"}),
    ]
    assert details[0].target == TARGET
    assert details[0].initiator.startswith("iqn.")


def test_no_sessions_is_an_empty_list() -> None:
    rc, out, _ = recorded_rc("iscsiadm_session_none_rc.txt")
    runner = FakeRunner().on(r"-m session", Reply(rc, out))
    assert Iscsiadm(runner, FakeClock()).sessions() == []


def test_multipath_parsers_recorded() -> None:
    (m,) = parse_show_maps(recorded("multipathd_show_maps.txt"))
    assert (m.name, m.wwid, m.sysfs, m.paths) == ("mpatha", WWID, "dm-0", 2)
    paths = parse_show_paths(recorded("multipathd_show_paths.txt"))
    assert [(p.dev, p.wwid, p.hcil, p.checker) for p in paths] == [
        ("sda", WWID, "6:0:0:1", "ready"),
        ("sdb", WWID, "7:0:0:1", "ready"),
    ]
    (ll,) = parse_multipath_ll(recorded("multipath_ll.txt"))
    assert (ll.name, ll.wwid, ll.sysfs, ll.size) == ("mpatha", WWID, "dm-0", "64M")
    assert [p[:2] for p in ll.paths] == [("6:0:0:1", "sda"), ("7:0:0:1", "sdb")]


def test_wwn_forms_recorded_agree() -> None:
    sysfs = recorded("sysfs_wwid.txt").strip()
    assert normalize_wwn(sysfs) == WWN
    assert wwn_from_wwid(WWID) == WWN
    udev = dict(line.split("=", 1) for line in recorded("udevadm_info_dm.txt").splitlines() if "=" in line)
    assert same_wwn(WWN, udev["DM_WWN"])
    assert udev["DM_UUID"] == f"mpath-{WWID}"


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("iscsiadm_login_wrong_chap_rc.txt", PermissionDenied),
        ("iscsiadm_login_wrong_target_rc.txt", NotFound),
    ],
)
def test_login_failures_recorded(name: str, error: type[Exception]) -> None:
    rc, out, err = recorded_rc(name)
    runner = FakeRunner().on(r"--login", Reply(rc, out, err))
    with pytest.raises(error):
        Iscsiadm(runner, FakeClock()).login("127.0.0.1:3260", TARGET)


def test_login_session_exists_is_accepted() -> None:
    rc, out, err = recorded_rc("iscsiadm_session_exists_rc.txt")
    assert rc == 15
    runner = FakeRunner().on(r"--login", Reply(rc, out, err))
    assert Iscsiadm(runner, FakeClock()).login("127.0.0.1:3260", TARGET) is False


def test_database_failure_is_retried_with_backoff_then_unavailable() -> None:
    clock = FakeClock()
    runner = FakeRunner().on(r"-o new", Reply(6, stderr="iscsiadm: database failure"))
    with pytest.raises(Unavailable, match="exit 6"):
        Iscsiadm(runner, clock).node_new("127.0.0.1:3260", TARGET)
    assert len(runner.calls) == 4
    assert clock.sleeps == [0.1, 0.2, 0.4]


def test_iscsid_down_is_unavailable() -> None:
    runner = FakeRunner().on(r"--login", Reply(20, stderr="iscsiadm: can not connect to iSCSI daemon (111)!"))
    with pytest.raises(Unavailable, match="iscsid"):
        Iscsiadm(runner, FakeClock()).login("127.0.0.1:3260", TARGET)


def test_secret_values_are_redacted_in_argv() -> None:
    runner = FakeRunner()
    Iscsiadm(runner, FakeClock()).node_update(
        "p:3260", TARGET, "node.session.auth.password", Secret("s3cret-pw")
    )
    assert runner.calls[0][-1] == "********"
    assert runner.revealed[0][-1] == "s3cret-pw"


def test_libiscsi_parsers_on_host_recordings() -> None:
    d = parse_vpd83(sample("iscsi_inq_vpd83_tgt_scsi_id.txt"))
    assert [x.type for x in d] == ["NAA", "NAA", "T10_VENDORT_ID"]
    assert identities(d) == ["6001405abcdef0123456789abcdef012"]
    assert identities(parse_vpd83(sample("iscsi_inq_vpd83_tgt.txt"))) == []
    assert parse_vpd80(sample("iscsi_inq_vpd80_tgt.txt")) == "SERIAL1"
    assert parse_readcapacity16("RETURNED LOGICAL BLOCK ADDRESS:32767\nTotal size:16777216\n") == 16 << 20


def test_parse_session_details_of_one_session_recorded() -> None:
    """`iscsiadm -m session -r SID -P 3`: the one session, with its host and disk."""
    (d,) = parse_session_details(recorded("iscsiadm_session_r_P3.txt"))
    assert (d.target, d.portal, d.sid, d.host_number, d.disks) == (TARGET, "127.0.0.1:3260", 3, 6, {1: "sda"})


def test_session_details_need_print_level_3() -> None:
    """`-P 1` has no SCSI host or disks: the connector must ask for `-P 3` (host_number stays -1)."""
    details = parse_session_details(recorded("iscsiadm_session_P1.txt"))
    assert [(d.portal, d.sid, d.host_number, d.disks) for d in details] == [
        ("127.0.0.1:3260", 3, -1, {}),
        ("127.0.0.2:3260", 4, -1, {}),
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("multipath_ll_one_path.txt", [("mpatha", WWID, "dm-0", ["sda"])]),
        ("multipath_ll_v3.txt", [("mpatha", WWID, "dm-0", ["sda", "sdb"])]),  # after -v3's paths list
        ("multipathd_show_topology.txt", [("mpatha", WWID, "dm-0", ["sda", "sdb"])]),
        (
            "default_identity_multipath_ll.txt",
            [
                ("mpatha", WWID, "dm-0", ["sda", "sdb"]),
                ("mpathb", "360000000000000000e00000000020001", "dm-1", ["sdc"]),
            ],
        ),
    ],
)
def test_parse_multipath_ll_variants_recorded(
    name: str, expected: list[tuple[str, str, str, list[str]]]
) -> None:
    maps = parse_multipath_ll(recorded(name))
    assert [(m.name, m.wwid, m.sysfs, [p[1] for p in m.paths]) for m in maps] == expected
    assert all(m.size == "64M" for m in maps)
    assert all(p[2] == "active ready running" for m in maps for p in m.paths)


def test_show_paths_in_the_default_layout_is_not_taken_for_ours() -> None:
    assert parse_show_paths(recorded("multipathd_show_paths_default.txt")) == []


def test_default_identity_wwn_forms_recorded_agree() -> None:
    """tgt's default identity (no scsi_id): sysfs, udev and multipath name the same NAA."""
    sysfs = recorded("default_identity_sysfs_wwid.txt").strip()
    udev = dict(
        line.split("=", 1)
        for line in recorded("default_identity_udevadm_info_sd.txt").splitlines()
        if "=" in line
    )
    (_, mpathb) = parse_multipath_ll(recorded("default_identity_multipath_ll.txt"))
    assert same_wwn(normalize_wwn(sysfs), wwn_from_wwid(mpathb.wwid))
    assert same_wwn(normalize_wwn(sysfs), udev["ID_WWN_WITH_EXTENSION"])
    assert wwn_from_wwid(udev["ID_SERIAL"]) == normalize_wwn(sysfs)


def test_iscsiadm_is_never_killed_before_it_could_release_the_node_database_lock() -> None:
    seen: list[float | None] = []

    class Recording(FakeRunner):
        def run(self, argv, *, ok=None, timeout=None, stdin=None, env=None):  # type: ignore[no-untyped-def]
            seen.append(timeout)
            return super().run(argv, ok=ok or {0: "ok"}, timeout=timeout, stdin=stdin, env=env)

    Iscsiadm(Recording(), FakeClock(), timeout=30.0)._run(["-m", "session"])
    assert seen
    assert seen[0] is not None
    assert seen[0] > 30.0 + IDBM_LOCK_WAIT_SECONDS
