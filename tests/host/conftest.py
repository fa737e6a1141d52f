"""Host tier: real tgtd, libvirtd + QEMU and udevd on this machine (root)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import tier_unavailable
from tests.host.daemons import Missing, Started, Tgtd, ensure_libvirtd, ensure_udevd, need_root

# Two portals on loopback addresses: two paths to every LUN.
PORTALS = ("127.0.0.1:3260", "127.0.0.2:3260")


@pytest.fixture(scope="session")
def host_daemons() -> Iterator[Started]:
    started = Started()
    try:
        need_root()
        ensure_udevd(started)
        ensure_libvirtd(started)
    except Missing as exc:
        started.stop()
        tier_unavailable("host", str(exc))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def tgtd() -> Iterator[Tgtd]:
    daemon = Tgtd(portals=PORTALS)
    try:
        need_root()
        daemon.start()
    except Missing as exc:
        daemon.stop()
        tier_unavailable("host", str(exc))
    yield daemon
    daemon.stop()
