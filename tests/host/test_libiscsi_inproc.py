"""Host tier: the in-process LUN reader (hostagent.host.libiscsi, libiscsi through ctypes) against a LUN of
the real tgtd fixture, with CHAP and an initiator ACL: identity, serial, size, each refusal mapped to its
error, a silent portal bounded by the timeout, parallel reads, and the password nowhere but in the login.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockwire.errors import NotFound, PermissionDenied, Unavailable
from blockwire.model import Chap
from blockwire.runtime.clock import SystemClock
from blockwire.runtime.executor import Executor
from blockwire.secret import Secret
from hostagent.host.libiscsi import InprocLibiscsi, load, lun_reader
from hostagent.tools.libiscsi import Libiscsi, Lun
from tests.conftest import tier_unavailable
from tests.host.daemons import Tgtd

INITIATOR = "iqn.2026-01.io.blockwire.test:inproc-host"
WWN = "6001405f00dbabe5c0ffee0123456000"
SERIAL = "INPROC0001"
SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class Exported:
    lun: Lun
    chap: Chap
    tid: int


def _free_tid(tgtd: Tgtd) -> int:
    used = {
        int(t)
        for t in re.findall(r"^Target (\d+):", tgtd.adm("--op", "show", "--mode", "target").stdout, re.M)
    }
    return max(used | {900}) + 1


@pytest.fixture(scope="module")
def exported(tgtd: Tgtd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    """One target of our own on the session's tgtd: LUN 1 (a sparse file) with a WWN and serial, a CHAP
    account bound to it, an ACL admitting INITIATOR. Removed afterwards (only what this made)."""
    if load()[0] is None:
        tier_unavailable("host", f"libiscsi does not load: {load()[1]} (apt-get install libiscsi7)")
    backing = tmp_path_factory.mktemp("inproc") / "lun.img"
    with backing.open("wb") as f:
        f.truncate(SIZE)
    suffix = uuid.uuid4().hex[:8]
    iqn, user, password = (
        f"iqn.2026-01.io.blockwire.test:inproc-{suffix}",
        f"in-{suffix}",
        f"pw-{uuid.uuid4().hex}",
    )
    tid = _free_tid(tgtd)
    tgtd.adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
    try:
        tgtd.adm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1", "-b", str(backing))
        tgtd.adm("--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1",
                 "--params", f"scsi_id={WWN},scsi_sn={SERIAL}")  # fmt: skip
        tgtd.adm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        tgtd.adm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user)
        tgtd.adm("--op", "bind", "--mode", "target", "--tid", str(tid), "-Q", INITIATOR)
        host, _, port = tgtd.portals[0].rpartition(":")
        yield Exported(Lun(host, int(port), iqn, 1), Chap(user, Secret(password)), tid)
    finally:
        tgtd.adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force", check=False)
        tgtd.adm("--op", "delete", "--mode", "account", "--user", user, check=False)


@pytest.fixture
def reader() -> InprocLibiscsi:
    lib, why = load()
    assert lib is not None, why
    return InprocLibiscsi(lib, SystemClock(), timeout=5)


def test_identity_serial_and_size(exported: Exported, reader: InprocLibiscsi) -> None:
    ids = reader.identities(exported.lun, exported.chap, INITIATOR)
    assert WWN in ids  # the binary NAA-6 designator, read in hex
    assert reader.serial(exported.lun, exported.chap, INITIATOR) == SERIAL
    assert reader.size(exported.lun, exported.chap, INITIATOR) == SIZE
    # the tools agree on what they can read
    tools = Libiscsi(Executor(), timeout=15)
    assert tools.serial(exported.lun, exported.chap, INITIATOR) == SERIAL
    assert tools.size(exported.lun, exported.chap, INITIATOR) == SIZE


def test_wrong_chap_is_permission_denied(exported: Exported, reader: InprocLibiscsi) -> None:
    wrong = Chap(exported.chap.username, Secret("not-the-password"))
    with pytest.raises(PermissionDenied, match="refused the CHAP credentials"):
        reader.identities(exported.lun, wrong, INITIATOR)
    with pytest.raises(PermissionDenied):
        reader.identities(exported.lun, None, INITIATOR)  # no CHAP at all where it is required


def test_missing_lun_target_or_acl_is_not_found(exported: Exported, reader: InprocLibiscsi) -> None:
    lun = exported.lun
    with pytest.raises(NotFound, match="not exported"):
        reader.identities(Lun(lun.host, lun.port, lun.target_iqn, 7), exported.chap, INITIATOR)
    with pytest.raises(NotFound):
        reader.serial(Lun(lun.host, lun.port, lun.target_iqn + "-gone", 1), exported.chap, INITIATOR)
    with pytest.raises(NotFound):
        reader.size(lun, exported.chap, "iqn.2026-01.io.blockwire.test:not-in-the-acl")


def test_refused_portal_is_unavailable(exported: Exported, reader: InprocLibiscsi) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: the connect is refused
        with pytest.raises(Unavailable, match="Connection refused"):
            reader.identities(Lun("127.0.0.1", port, exported.lun.target_iqn, 1), exported.chap, INITIATOR)


def test_silent_portal_is_unavailable_within_the_timeout(exported: Exported) -> None:
    """A portal that accepts the TCP connection and never answers the login: the deadline ends it."""
    lib, _ = load()
    assert lib is not None
    reader = InprocLibiscsi(lib, SystemClock(), timeout=1.0)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        lun = Lun("127.0.0.1", srv.getsockname()[1], exported.lun.target_iqn, 1)
        start = time.monotonic()
        with pytest.raises(Unavailable, match="no answer within 1 s"):
            reader.identities(lun, exported.chap, INITIATOR)
        took = time.monotonic() - start
    assert 0.9 <= took < 2.5, took


def test_reads_in_parallel_threads(exported: Exported, reader: InprocLibiscsi) -> None:
    """One context per call: reads on several threads at once all get the right answer."""
    results: list[object] = []

    def read() -> None:
        for _ in range(5):
            try:
                results.append(WWN in reader.identities(exported.lun, exported.chap, INITIATOR))
            except Exception as exc:  # reported by the assertion below
                results.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 20


def test_the_password_is_in_no_argv_environment_log_or_error(
    exported: Exported, reader: InprocLibiscsi, caplog: pytest.LogCaptureFixture
) -> None:
    password = exported.chap.password.reveal()
    seen: list[str] = []
    stop = threading.Event()

    def scan() -> None:  # every process's argv and environment while reads run
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                for part in ("cmdline", "environ"):
                    try:
                        if password.encode() in Path(f"/proc/{pid}/{part}").read_bytes():
                            seen.append(f"/proc/{pid}/{part}")
                    except OSError:
                        continue
            stop.wait(0.01)

    scanner = threading.Thread(target=scan)
    scanner.start()
    errors: list[str] = []
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(10):
                reader.identities(exported.lun, exported.chap, INITIATOR)
                reader.size(exported.lun, exported.chap, INITIATOR)
                try:
                    reader.identities(Lun(exported.lun.host, exported.lun.port, exported.lun.target_iqn, 9),
                                      exported.chap, INITIATOR)  # fmt: skip
                except NotFound as exc:
                    errors.append(str(exc))
    finally:
        stop.set()
        scanner.join(10)
    assert seen == []
    assert password not in caplog.text
    assert errors
    assert not [e for e in errors if password in e]


def test_wiring_takes_the_library_and_falls_back_to_the_tools(caplog: pytest.LogCaptureFixture) -> None:
    tools = Libiscsi(Executor())
    with caplog.at_level(logging.INFO, logger="hostagent.host.libiscsi"):
        assert isinstance(lun_reader(tools, SystemClock(), timeout=5), InprocLibiscsi)
        assert lun_reader(tools, SystemClock(), timeout=5, soname="libiscsi-not-there.so.99") is tools
    assert "in process" in caplog.text
    assert "through libiscsi's tools (iscsi-inq): libiscsi-not-there.so.99 cannot be loaded" in caplog.text
