"""The volume identity (wwn/serial) and argument validation."""

from __future__ import annotations

import pytest

from blockwire.errors import InvalidArgument
from blockwire.model import Connector, Transport
from storagesvc import identity, paging, validate
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


@pytest.mark.parametrize("name", ["a", "vol-1", "A_b.c", "x" * 63])
def test_good_names(name: str) -> None:
    assert validate.name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".a", "a b", "x" * 64, "a/b", "é"])
def test_bad_names_name_the_field(name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate.name(name)
    assert err.value.field == "name"


@pytest.mark.parametrize("size", [0, -1, 1, 1024 * 1024 + 1, 1 << 61])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(InvalidArgument, match="size_bytes"):
        validate.size(size)


def test_zero_size_only_with_a_source() -> None:
    assert validate.size(0, allow_zero=True) == 0
    assert validate.size(2 << 20) == 2 << 20


@pytest.mark.parametrize(
    "iqn", ["iqn.2026-01.io.example:host-a", "iqn.1994-05.com.redhat:abc123", "eui.0123456789ABCDEF"]
)
def test_good_iqns(iqn: str) -> None:
    assert validate.iqn(iqn, "f") == iqn


@pytest.mark.parametrize(
    "iqn", ["", "iqn", "iqn.2026-13.io.example", "iqn.2026-01.Io.example", "host-a", "eui.12"]
)
def test_bad_iqns(iqn: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate.iqn(iqn, "connector.initiator_iqn")
    assert err.value.field == "connector.initiator_iqn"


@pytest.mark.parametrize("portal", ["127.0.0.1:3260", "[::1]:3260", "10.0.0.1:1"])
def test_good_portals(portal: str) -> None:
    assert validate.portal(portal) == portal


@pytest.mark.parametrize(
    "portal", ["127.0.0.1", "::1:3260", "host:3260", "127.0.0.1:0", "127.0.0.1:70000", "[1.2.3.4]:1"]
)
def test_bad_portals(portal: str) -> None:
    with pytest.raises(InvalidArgument, match="portal"):
        validate.portal(portal)


def test_labels() -> None:
    assert validate.labels({"team/app": "x"}) == {"team/app": "x"}
    with pytest.raises(InvalidArgument, match="labels"):
        validate.labels({"Upper": "x"})
    with pytest.raises(InvalidArgument, match="labels"):
        validate.labels({"k": "v" * 256})


def test_connector_needs_host_and_iqn_and_iscsi() -> None:
    good = Connector(host="h", initiator_iqn="iqn.2026-01.io.example:h")
    assert validate.iscsi_connector(good) is good
    with pytest.raises(InvalidArgument, match=r"connector\.host"):
        validate.iscsi_connector(Connector(host="", initiator_iqn=good.initiator_iqn))
    with pytest.raises(InvalidArgument, match=r"connector\.initiator_iqn"):
        validate.iscsi_connector(Connector(host="h"))
    with pytest.raises(InvalidArgument, match=r"connector\.transports"):
        validate.iscsi_connector(
            Connector(host="h", initiator_iqn=good.initiator_iqn, transports=(Transport.FC,))
        )


def test_page_size() -> None:
    assert validate.page_size(0) == 100
    with pytest.raises(InvalidArgument, match="page_size"):
        validate.page_size(1001)


def test_page_tokens_round_trip_and_refuse_forgeries() -> None:
    cursor = Cursor(1_700_000_000_000_000_000, VOLUME_ID)
    assert paging.decode(paging.encode(cursor)) == cursor
    assert paging.decode("") is None
    for bad in ("nope", "!!!", paging.encode(cursor)[:-3], "djI6MTox"):
        with pytest.raises(InvalidArgument, match="page_token"):
            paging.decode(bad)
