"""ConnectorKind in the journal: records written while `connector_kind` was a plain string still load.

tests/data/journal/ holds records as the agent wrote them before the enum (commit f81fd7e): one per
kind, and one of an attach stopped before its connect began (empty kind).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hostagent.journal import Journal, from_json, to_json
from hostagent.model import ConnectorKind

OLD_RECORDS = Path(__file__).resolve().parents[2] / "data" / "journal"


def old_journal(tmp_path: Path) -> Journal:
    shutil.copytree(OLD_RECORDS, tmp_path / "attachments")
    return Journal(tmp_path)


def test_the_values_are_the_strings_the_journal_stores() -> None:
    assert [k.value for k in ConnectorKind] == [
        "iscsi-kernel",
        "iscsi-qemu",
        "fc",
        "local",
        "rbd-qemu",
        "rbd-kernel",
        "nvme-tcp",
    ]


def test_records_written_before_the_enum_load_with_their_kind(tmp_path: Path) -> None:
    kinds = {a.volume_id: a.connector_kind for a in old_journal(tmp_path).all()}
    assert kinds == {
        "vol-1": ConnectorKind.ISCSI_KERNEL,
        "vol-2": ConnectorKind.ISCSI_QEMU,
        "vol-3": ConnectorKind.FC,
        "vol-4": ConnectorKind.LOCAL,
        "vol-5": None,  # no connect began
    }


def test_a_record_is_written_back_as_it_was_read(tmp_path: Path) -> None:
    for p in sorted(OLD_RECORDS.glob("*.json")):
        stored = json.loads(p.read_text())
        assert to_json(from_json(stored)) == stored


def test_a_record_without_the_field_has_no_kind() -> None:
    stored = json.loads((OLD_RECORDS / "vol-1@vm1.json").read_text())
    del stored["connector_kind"]
    assert from_json(stored).connector_kind is None
