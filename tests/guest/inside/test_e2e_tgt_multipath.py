"""End to end through blockwire's own daemons (blockwire-storage + blockwire-agent, iscsi_mode "kernel",
over gRPC with the SDK clients), the `file` backend and the `tgt` exporter on two portals:

AttachVolume -> kernel iSCSI logins on both portals -> udev -> WWN check -> a multipath map over two
paths -> the map hot-plugged into a no-OS domain (live XML) -> data written through the map is in the
volume's file -> one session killed (`iscsiadm -m session -r SID -u`): I/O goes on over the other path
-> the agent restarts and its reconcile logs the lost path in again -> DetachVolume -> nothing left on
the host (no sd device, dm map, session, node record or by-path link) -> DeleteVolume.
"""

from __future__ import annotations

from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack, two_paths_scenario
from tests.host.daemons import Tgtd


def test_tgt_two_paths_hotplug_path_loss_and_return_then_nothing_left(
    clean_host: None, tgt_stack: Stack, tgtd: Tgtd, domain: str
) -> None:
    iqn, timings = two_paths_scenario(
        tgt_stack, domain, backend="file", backing=tgt_stack.volume_file, portals=kernel.PORTALS
    )
    assert iqn not in tgtd.adm("--op", "show", "--mode", "target").stdout
    assert list(tgt_stack.volume_file("x").parent.iterdir()) == []
    print(f"timings (s): {timings}")
