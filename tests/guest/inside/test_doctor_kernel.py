"""The doctor's kernel kinds on a real kernel: a LUN logged in by hand on both portals (two sessions, two
disks, the multipath map multipathd builds) and a node record without a session are state no attachment
accounts for. The audit lists each; `fix` removes none of it (nothing proves it is blockwire's), and the
sessions, disks and map are exactly as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.config import AgentConfig
from hostagent.wiring import build_agent
from tests.guest.inside import kernel
from tests.guest.inside.kernel import PORTALS, wait_until

RECORD_ONLY = "iqn.2024-01.test.blockwire:record-only"


@pytest.mark.usefixtures("libvirtd")
def test_doctor_lists_kernel_state_nobody_accounts_for_and_fix_leaves_it(
    lun: kernel.Lun, tmp_path: Path
) -> None:
    try:
        for portal in PORTALS:
            kernel.node_new(lun.iqn, portal)
            kernel.login(lun.iqn, portal)
        disks = {p: kernel.disk_for(p, lun.iqn) for p in PORTALS}
        wwid = f"3{lun.naa}"
        name = wait_until("the multipath map", lambda: kernel.map_for(wwid), 60)
        kernel.node_new(RECORD_ONLY, PORTALS[0])
        before = kernel.leftovers()

        agent, hypervisor = build_agent(
            AgentConfig(state_dir=str(tmp_path / "agent"), iscsi_mode="kernel"), storage=None
        )
        try:
            listed = {(f.kind, f.name): f for f in agent.audit()}
            fixed = {(f.kind, f.name): f for f in agent.audit(fix=True)}
        finally:
            hypervisor.close()

        for portal in PORTALS:
            assert ("iscsi_session", f"{portal} {lun.iqn}") in listed
            assert ("scsi_disk", f"/dev/{disks[portal]}") in listed
            assert lun.naa in listed[("scsi_disk", f"/dev/{disks[portal]}")].detail
        assert ("iscsi_node", f"{PORTALS[0]} {RECORD_ONLY}") in listed
        assert ("multipath_map", name) in listed
        assert "--logout" in listed[("iscsi_session", f"{PORTALS[0]} {lun.iqn}")].detail  # how, by hand
        assert set(fixed) == set(listed)
        assert not any(f.fixable or f.fixed for f in fixed.values())
        assert kernel.leftovers() == before  # nothing touched
        assert kernel.map_for(wwid) == name
    finally:
        kernel.force_cleanup()
        kernel.settle()
