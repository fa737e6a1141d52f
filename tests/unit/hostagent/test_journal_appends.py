"""The journal's record files: the first record of a pair makes the file (atomically), later records are
appended (one fdatasync, no directory fsync); a crash during an append leaves a torn last line, which is
skipped (the old record stands) and never glued to the next record; an older agent's indented document is
read and rewritten; a file that grew is compacted."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from blockwire.model import ConnectionInfo, LocalConnection
from hostagent import journal as journal_mod
from hostagent.journal import Journal, encode_record, parse_record_file, read_record_file, to_json
from hostagent.model import AttachmentState, JournalRecord


def _record(state: AttachmentState = AttachmentState.ATTACHING, **changes: object) -> JournalRecord:
    a = JournalRecord(
        volume_id="vol-1",
        domain="dom",
        state=state,
        connection_info=ConnectionInfo(transport=LocalConnection("/dev/loop1"), volume_id="vol-1"),
    )
    return replace(a, **changes)  # type: ignore[arg-type]


def test_an_attachs_records_are_one_file_of_json_lines(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.put(_record())
    path = j._path("vol-1", "dom")
    assert json.loads(path.read_text())["state"] == "attaching"  # one record: a plain JSON document
    inode = path.stat().st_ino
    j.put(_record(attachment_id="att-1"))
    j.put(_record(AttachmentState.ATTACHED, attachment_id="att-1"))
    assert path.stat().st_ino == inode  # appended, not replaced: the directory entry never changed
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["state"] for x in lines] == ["attaching", "attaching", "attached"]
    assert j.get("vol-1", "dom") == _record(AttachmentState.ATTACHED, attachment_id="att-1")
    assert Journal(tmp_path).all() == [_record(AttachmentState.ATTACHED, attachment_id="att-1")]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("cut", [1, 10, 100, -2])
def test_a_crash_during_an_append_leaves_the_old_record(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(tmp_path)
    j.put(_record(attachment_id="att-1"))
    path = j._path("vol-1", "dom")
    torn = encode_record(_record(AttachmentState.ATTACHED, attachment_id="att-1"))[:cut]  # never the newline
    with path.open("ab") as f:
        f.write(torn)
    after_crash = Journal(tmp_path)
    assert after_crash.get("vol-1", "dom") == _record(attachment_id="att-1")
    assert after_crash.all() == [_record(attachment_id="att-1")]
    assert "unreadable" not in caplog.text
    # the next record starts on its own line: the torn tail never swallows it
    after_crash.put(_record(AttachmentState.DETACHING, attachment_id="att-1"))
    assert Journal(tmp_path).get("vol-1", "dom") == _record(AttachmentState.DETACHING, attachment_id="att-1")


def test_a_crash_leaving_zeros_past_the_end_leaves_the_old_record(tmp_path: Path) -> None:
    """A file system may show a size extended over blocks never written: zeros are no record."""
    j = Journal(tmp_path)
    j.put(_record(attachment_id="att-1"))
    path = j._path("vol-1", "dom")
    with path.open("ab") as f:
        f.write(b"\0" * 700)
    assert Journal(tmp_path).get("vol-1", "dom") == _record(attachment_id="att-1")


def test_a_failed_append_is_cut_back_and_the_old_record_stands(tmp_path: Path) -> None:
    fail = {"after": -1}

    def write(fd: int, data: memoryview) -> int:
        if fail["after"] == 0:
            raise OSError(28, "No space left on device")
        fail["after"] -= 1
        return os.write(fd, data[:50])  # short writes: the second one fails mid-record

    j = Journal(tmp_path, write=write)
    j.put(_record(attachment_id="att-1"))
    path = j._path("vol-1", "dom")
    size = path.stat().st_size
    fail["after"] = 1
    with pytest.raises(OSError, match="No space"):
        j.put(_record(AttachmentState.ATTACHED, attachment_id="att-1"))
    assert path.stat().st_size == size
    assert Journal(tmp_path).get("vol-1", "dom") == _record(attachment_id="att-1")


def test_an_older_agents_record_is_read_and_rewritten(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    path = j._path("vol-1", "dom")
    path.write_text(json.dumps(to_json(_record(attachment_id="att-1")), indent=1, sort_keys=True))
    assert j.get("vol-1", "dom") == _record(attachment_id="att-1")
    j.put(_record(AttachmentState.ATTACHED, attachment_id="att-1"))
    assert len(path.read_bytes().splitlines()) == 1  # rewritten as a new file, not appended to
    assert j.get("vol-1", "dom") == _record(AttachmentState.ATTACHED, attachment_id="att-1")


def test_a_grown_file_is_compacted(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    one = len(encode_record(_record(attachment_id="att-0")))
    for n in range(3 * journal_mod._COMPACT_AT // one):
        j.put(_record(attachment_id=f"att-{n}"))
        assert j._path("vol-1", "dom").stat().st_size <= journal_mod._COMPACT_AT
    assert j.get("vol-1", "dom") == _record(attachment_id=f"att-{n}")


def test_a_file_without_a_complete_record_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no complete record"):
        parse_record_file(b'{"volume_id": "vol-1", "dom')
    with pytest.raises(ValueError, match="no complete record"):
        parse_record_file(b"")
    (tmp_path / "r.json").write_bytes(encode_record(_record()) + b'{"torn')
    assert read_record_file(tmp_path / "r.json")["volume_id"] == "vol-1"


def test_a_record_whose_bytes_all_arrived_but_its_newline_is_the_record(tmp_path: Path) -> None:
    """Every byte of the object written, the crash came before the newline (and before put returned):
    the record counts, as after a crash right after put returned; it was written before the side effect
    it announces, which reconcile finds done or not done."""
    j = Journal(tmp_path)
    j.put(_record(attachment_id="att-1"))
    path = j._path("vol-1", "dom")
    with path.open("ab") as f:
        f.write(encode_record(_record(AttachmentState.ATTACHED, attachment_id="att-1"))[:-1])
    assert Journal(tmp_path).get("vol-1", "dom") == _record(AttachmentState.ATTACHED, attachment_id="att-1")
    j.put(_record(AttachmentState.DETACHING, attachment_id="att-1"))
    assert Journal(tmp_path).get("vol-1", "dom") == _record(AttachmentState.DETACHING, attachment_id="att-1")
