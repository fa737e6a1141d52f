"""End to end through blockwire's daemons (kernel initiator, tgt, two paths each): eight volumes
attached to one domain at the same time, then detached at the same time; nothing is left.

Each volume is its own target (16 sessions, 16 SCSI disks, 8 maps); the agent locks per volume and
per target, so the attaches proceed in parallel and each gets its own disk in the domain.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack
from tests.guest.inside.kernel import MiB

VOLUMES = 8


def test_eight_volumes_attached_and_detached_concurrently(
    clean_host: None, tgt_stack: Stack, domain: str
) -> None:
    s = tgt_stack
    tag = uuid.uuid4().hex[:6]
    vols = [s.storage.create_volume(f"e2e-many-{tag}-{i}", 16 * MiB, backend="file") for i in range(VOLUMES)]
    try:
        with ThreadPoolExecutor(VOLUMES) as pool:
            started = time.monotonic()
            atts = list(pool.map(lambda v: s.agent.attach_volume(domain, volume_id=v.id), vols))
            attach_s = time.monotonic() - started

            disks = {d.target: d for d in kernel.domain_disks(domain)}
            assert len({a.target_dev for a in atts}) == VOLUMES
            assert len({a.host_device for a in atts}) == VOLUMES
            for a in atts:
                assert disks[a.target_dev].source == a.host_device
                assert len(kernel.active_paths(f"3{a.connection_info.wwn}")) == 2
            assert len(kernel.scsi_disks()) == 2 * VOLUMES
            # Each map is its own volume: data written through one is in that volume's file only.
            for i, a in enumerate(atts):
                pattern = kernel.write_pattern(a.host_device, i)
                assert kernel.read_at(s.volume_file(a.volume_id), i) == pattern

            started = time.monotonic()
            list(pool.map(lambda v: s.agent.detach_volume(domain, v.id), vols))
            detach_s = time.monotonic() - started
        assert kernel.domain_disks(domain) == []
        kernel.settle()
        assert kernel.leftovers() == {}
        print(f"{VOLUMES} volumes: attach {attach_s:.1f}s, detach {detach_s:.1f}s (concurrent)")
    finally:
        for v in vols:
            s.agent.detach_volume(domain, v.id, force=True)
            s.storage.delete_volume(v.id)
