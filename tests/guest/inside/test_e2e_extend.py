"""End to end through blockwire's daemons (kernel initiator, tgt, two paths): extend while attached.

StorageService.ExtendVolume grows the file and re-creates tgt's LUN with the same identity; then
HostAgentService.ExtendVolume rescans both SCSI paths, resizes the multipath map and calls libvirt's
blockResize: the domain sees the new size (`virsh domblkinfo`), and data written before is still there.
"""

from __future__ import annotations

import time
import uuid

from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack
from tests.guest.inside.kernel import MiB


def test_extend_while_attached_reaches_the_domain(clean_host: None, tgt_stack: Stack, domain: str) -> None:
    s = tgt_stack
    vol = s.storage.create_volume(f"e2e-grow-{uuid.uuid4().hex[:6]}", 32 * MiB, backend="file")
    attached = False
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        attached = True
        assert kernel.domblk_capacity(domain, att.target_dev) == 32 * MiB
        pattern = kernel.write_pattern(att.host_device, 30)

        started = time.monotonic()
        grown = s.storage.extend_volume(vol.id, 48 * MiB)
        assert grown.size_bytes == 48 * MiB
        size = s.agent.extend_volume(vol.id, 48 * MiB)
        extend_s = time.monotonic() - started
        assert size == 48 * MiB
        assert kernel.domblk_capacity(domain, att.target_dev) == 48 * MiB
        wwid = f"3{att.connection_info.wwn}"
        for dev in kernel.map_slaves(kernel.map_for(wwid) or ""):
            assert int((kernel.SYS_BLOCK / dev / "size").read_text()) * 512 == 48 * MiB, dev
        assert len(kernel.active_paths(wwid)) == 2
        assert kernel.read_at(att.host_device, 30) == pattern
        pattern = kernel.write_pattern(att.host_device, 47)  # the new end is writable
        assert kernel.read_at(s.volume_file(vol.id), 47) == pattern

        s.agent.detach_volume(domain, vol.id)
        attached = False
        print(f"extend (storage + agent): {extend_s:.1f}s")
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)
