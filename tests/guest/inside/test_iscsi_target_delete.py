"""open-iscsi's per-target node delete as the kernel connector uses it (`Iscsiadm.target_delete`: one
`iscsiadm -m node -T IQN -o delete` for the records on every portal), against the real iscsiadm: it
removes the target's records on both portals in one run, a repeat is "none" (exit 21, not an error), and
a record a session uses is refused, never removed (the connector deletes per target only when no session
is to the target, and falls back to per-portal deletes otherwise)."""

from __future__ import annotations

import subprocess

from blockwire.runtime.clock import SystemClock
from blockwire.runtime.executor import Executor
from hostagent.tools.iscsiadm import Iscsiadm
from tests.guest.inside import kernel
from tests.guest.inside.kernel import PORTALS


def records(iqn: str) -> list[str]:
    return [n for n in kernel.nodes() if iqn in n]


def test_one_run_deletes_the_records_of_every_portal(lun: kernel.Lun) -> None:
    adm = Iscsiadm(Executor(), SystemClock())
    for portal in PORTALS:
        kernel.node_new(lun.iqn, portal)
    assert len(records(lun.iqn)) == 2
    assert adm.target_delete(lun.iqn) is True
    assert records(lun.iqn) == []
    assert adm.target_delete(lun.iqn) is False  # none left: exit 21, "gone"


def test_a_record_a_session_uses_is_never_deleted(lun: kernel.Lun) -> None:
    for portal in PORTALS:
        kernel.node_new(lun.iqn, portal)
    kernel.login(lun.iqn, PORTALS[0])
    try:
        proc = subprocess.run(
            ["iscsiadm", "-m", "node", "-T", lun.iqn, "-o", "delete"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        print(
            f"iscsiadm -T -o delete with a session on one portal: rc={proc.returncode} {proc.stderr.strip()}"
        )
        assert proc.returncode != 0, "iscsiadm reported success while a session uses one of the records"
        assert any(PORTALS[0] in n for n in records(lun.iqn)), "the logged-in portal's record was deleted"
    finally:
        kernel.logout(lun.iqn, PORTALS[0])
        subprocess.run(["iscsiadm", "-m", "node", "-T", lun.iqn, "-o", "delete"], check=False, timeout=60)
    assert records(lun.iqn) == []
