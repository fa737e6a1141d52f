"""The volume identity (wwn/serial) and page tokens. Argument checks: tests/unit/test_validate.py."""

from __future__ import annotations

import pytest

from blockwire.errors import InvalidArgument
from storagesvc import identity, paging
from storagesvc.catalog import Cursor

VOLUME_ID = "0123456789abcdef0123456789abcdef"


def tgt_naa6(scsi_id: str) -> str:
    """tgt's usr/spc.c update_vpd_83: one nibble per character (non-hex -> 0), right-aligned in 128 bits,
    top nibble forced to 6."""
    value = 0
    for ch in scsi_id:
        value = ((value << 4) | (int(ch, 16) if ch in "0123456789abcdefABCDEF" else 0)) & ((1 << 128) - 1)
    value = (value & ~(0xF << 124)) | (0x6 << 124)
    return f"{value:032x}"


def lio_naa6(unit_serial: str, company_id: int = 0x001405) -> str:
    """LIO's spc_gen_naa_6h_vendor_specific: 6, company id, then at most 25 hex digits of the serial."""
    digits = [c for c in unit_serial.lower() if c in "0123456789abcdef"][:25]
    return f"6{company_id:06x}" + "".join(digits).ljust(25, "0")


def test_wwn_is_naa6_with_the_oui_and_the_serial() -> None:
    wwn = identity.wwn_for(VOLUME_ID, "001405")
    assert wwn == "6001405" + VOLUME_ID[:20] + "00000"
    assert identity.serial_for(VOLUME_ID) == VOLUME_ID[:20]
    assert len(wwn) == 32


def test_tgt_and_lio_announce_exactly_the_wwn() -> None:
    wwn = identity.wwn_for(VOLUME_ID, "001405")
    assert tgt_naa6(wwn) == wwn  # tgt: scsi_id=<wwn>
    assert lio_naa6(identity.serial_for(VOLUME_ID)) == wwn  # LIO: unit serial = serial
    other = identity.wwn_for(VOLUME_ID, "abcdef")
    assert lio_naa6(identity.serial_for(VOLUME_ID), 0xABCDEF) == other
    assert tgt_naa6("IET     00010001") == "60000000000000000e00000000010001"  # tgt's default, recorded


def test_page_tokens_round_trip_and_refuse_forgeries() -> None:
    cursor = Cursor(1_700_000_000_000_000_000, VOLUME_ID)
    assert paging.decode(paging.encode(cursor)) == cursor
    assert paging.decode("") is None
    for bad in ("nope", "!!!", paging.encode(cursor)[:-3], "djI6MTox"):
        with pytest.raises(InvalidArgument, match="page_token"):
            paging.decode(bad)
