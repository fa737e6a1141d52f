"""Fixtures for tests that run inside the guest (BLOCKWIRE_IN_GUEST=1), as root on a real kernel.

Running when a test starts (tests/guest/test-init.sh): systemd-udevd, dbus, iscsid, multipathd
(/etc/multipath.conf: user_friendly_names yes, find_multipaths no), virtlogd, libvirtd (may still be
starting: use the `libvirtd` fixture). Not running: tgtd, which the `tgtd` fixture starts.
Helpers: tests/guest/inside/kernel.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.inside import kernel
from tests.host.daemons import Missing, Started, Tgtd, ensure_libvirtd

_tids = itertools.count(1)


@pytest.fixture(scope="session")
def tgtd() -> Iterator[Tgtd]:
    """Our tgtd on both loopback portals (kernel.PORTALS); control socket /var/run/tgtd/socket.7."""
    daemon = Tgtd(portals=kernel.PORTALS)
    try:
        daemon.start()
    except Missing as exc:
        daemon.stop()
        pytest.fail(f"tgtd does not start in the guest: {exc}", pytrace=False)
    yield daemon
    daemon.stop()


def new_tid() -> int:
    """A target id not used before in this run (targets of earlier tests may still be being deleted)."""
    return next(_tids)


@pytest.fixture
def lun(clean_host: None, tgtd: Tgtd, tmp_path: Path) -> Iterator[kernel.Lun]:
    """A 64 MiB LUN on both portals, with its own announced identity (scsi_id, scsi_sn; `lun.naa` is what
    the kernel reads). Uses
    `clean_host`: the test fails if it leaves sessions, node records, disks, maps or links behind."""
    tid = new_tid()
    made = kernel.make_target(
        tgtd,
        tid,
        f"iqn.2024-01.test.blockwire:lun{tid}",
        tmp_path / f"lun{tid}.img",
        scsi_id=f"b10c{tid:020x}",  # 24 hex digits: the kernel reads them unchanged (kernel.tgt_naa)
        scsi_sn=f"BWSN{tid:04d}",
    )
    yield made
    kernel.delete_target(tgtd, tid)


@pytest.fixture
def clean_host() -> Iterator[None]:
    """Asserts the host has no iSCSI/SCSI/multipath state before and after the test (cleans up after a
    failure so the next test starts clean)."""
    kernel.assert_nothing_left()
    yield
    left = kernel.leftovers()
    if left:
        kernel.force_cleanup()
        pytest.fail(f"the test left behind: {left}", pytrace=False)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """libvirtd answering on qemu:///system (test-init starts it in the background)."""
    started = Started()
    try:
        ensure_libvirtd(started)
    except Missing as exc:
        pytest.fail(f"libvirtd is not available in the guest: {exc}", pytrace=False)
    yield
    started.stop()
