"""Journal listing while records are being written and deleted, and after a crash mid-write."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from blockwire.model import ConnectionInfo, LocalConnection
from hostagent.journal import Journal
from hostagent.model import AttachmentState, JournalRecord


def _record(n: int) -> JournalRecord:
    return JournalRecord(
        volume_id=f"vol-{n}",
        domain="dom",
        state=AttachmentState.ATTACHING,
        connection_info=ConnectionInfo(transport=LocalConnection(f"/dev/loop{n}"), volume_id=f"vol-{n}"),
    )


def test_listing_never_sees_records_in_flight(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path)
    stop = threading.Event()

    def churn(n: int) -> None:
        for _ in range(200):
            journal.put(_record(n))
            journal.delete(f"vol-{n}", "dom")
        stop.set()

    writers = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for w in writers:
        w.start()
    listings = 0
    while not stop.is_set() or any(w.is_alive() for w in writers):
        for a in journal.all():
            assert a.volume_id.startswith("vol-")
        listings += 1
        if listings > 100_000:
            break
    for w in writers:
        w.join(timeout=30)
    assert listings > 0
    assert "unreadable" not in caplog.text


def test_a_temporary_record_left_by_a_crash_is_removed_on_open(tmp_path: Path) -> None:
    Journal(tmp_path).put(_record(1))
    leftover = tmp_path / "attachments" / ".tmp-crashed.json"
    leftover.write_text('{"half": ')
    journal = Journal(tmp_path)
    assert not leftover.exists()
    assert [a.volume_id for a in journal.all()] == ["vol-1"]


def test_of_volume_reads_only_that_volumes_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path)
    for n in range(3):
        journal.put(_record(n))
    long_domain = "d" * 300  # its record is named by a digest
    journal.put(JournalRecord(**{**_record(1).__dict__, "domain": long_domain}))
    journal.put(JournalRecord(**{**_record(1).__dict__, "volume_id": "vol-1@x"}))  # "@" is encoded
    # another volume's damaged record is not even read: no error about it
    (journal.dir / "vol-2@broken.json").write_text("{not json")
    got = sorted(a.domain for a in journal.of_volume("vol-1"))
    assert got == sorted(["dom", long_domain])
    assert "unreadable" not in caplog.text
    assert [a.volume_id for a in journal.of_volume("vol-1@x")] == ["vol-1@x"]
    assert len(journal.all()) == 5  # all() still reads (and reports) every file
    assert "vol-2@broken.json is unreadable" in caplog.text
