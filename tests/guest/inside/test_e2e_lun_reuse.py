"""End to end through blockwire's daemons (kernel initiator): LUN reuse is refused.

Storage exports volume A (connection info with A's WWN); then the same target and LUN are made to serve
volume B, with B's identity (what a reused target/LUN number does, the CVE-2023-2088 class of bug).
AttachVolume with A's pre-resolved connection info must fail with FAILED_PRECONDITION (identity
mismatch) after the login: the wrong disk never reaches the domain (its XML is unchanged), and the
agent removes everything it made (no sd device, dm map, session, node record or by-path link).
"""

from __future__ import annotations

import time
import uuid

import pytest

from blockwire.errors import FailedPrecondition
from storagesvc.identity import serial_for, wwn_for
from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack
from tests.guest.inside.kernel import MiB
from tests.host.daemons import Tgtd


def _tid(tgtd: Tgtd, iqn: str) -> int:
    for line in tgtd.adm("--op", "show", "--mode", "target").stdout.splitlines():
        if line.startswith("Target ") and line.split()[2] == iqn:
            return int(line.split()[1].rstrip(":"))
    raise AssertionError(f"tgtd has no target {iqn}")


def test_a_reused_lun_with_another_wwn_is_refused_and_nothing_is_left(
    clean_host: None, tgt_stack: Stack, tgtd: Tgtd, domain: str
) -> None:
    s = tgt_stack
    tag = uuid.uuid4().hex[:6]
    a = s.storage.create_volume(f"e2e-reuse-a-{tag}", 32 * MiB, backend="file")
    b = s.storage.create_volume(f"e2e-reuse-b-{tag}", 32 * MiB, backend="file")
    export = s.storage.create_attachment(a.id, s.agent.get_connector(), domain=domain)
    try:
        ci = export.connection_info
        iqn = ci.iscsi.paths[0].target_iqn
        assert ci.wwn == wwn_for(a.id, "001405")
        # The target's LUN now serves volume B, announcing B's identity.
        tid = str(_tid(tgtd, iqn))
        lun = str(ci.iscsi.paths[0].lun)
        tgtd.adm("--op", "delete", "--mode", "logicalunit", "--tid", tid, "--lun", lun)
        tgtd.adm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", lun,
                 "-b", str(s.volume_file(b.id)))  # fmt: skip
        wwn_b = wwn_for(b.id, "001405")
        tgtd.adm("--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", lun,
                 "--params", f"scsi_id={wwn_b},scsi_sn={serial_for(b.id)}")  # fmt: skip

        before = kernel.domain_xml(domain)
        started = time.monotonic()
        with pytest.raises(FailedPrecondition, match=f"(?s){wwn_b}.*{ci.wwn}"):
            s.agent.attach_volume(domain, connection_info=ci)
        refused_s = time.monotonic() - started
        assert kernel.domain_xml(domain) == before
        assert s.agent.list_attachments(domain) == []
        kernel.settle()
        assert kernel.leftovers() == {}
        print(f"refused in {refused_s:.1f}s (logins, identity check, teardown)")
    finally:
        s.storage.delete_attachment(export.id)
        s.storage.delete_volume(a.id)
        s.storage.delete_volume(b.id)
