"""The in-process LUN reader's pure half: raw VPD 0x83 / 0x80 and READ CAPACITY (16) data parsed, on pages
recorded from tgt (tests/data/recorded/libiscsi_tgt_*.hex) and on pages built byte by byte; and libiscsi's
error text mapped to the error tree as for the tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockwire.errors import NotFound, PermissionDenied, Unavailable
from blockwire.model import Chap
from hostagent.timing import TimedLunReader
from hostagent.tools.libiscsi import (
    BadPage,
    Lun,
    RawDesignator,
    classify,
    identities,
    page_length,
    parse_readcapacity16_raw,
    parse_vpd80_raw,
    parse_vpd83,
    parse_vpd83_raw,
    raw_identities,
)
from tests.fakes.clock import FakeClock

RECORDED = Path(__file__).resolve().parents[2] / "data" / "recorded"
WWN = "6001405aabbccddeeff0011223344000"


def recorded(name: str) -> bytes:
    return bytes.fromhex((RECORDED / name).read_text().strip())


def descriptor(code_set: int, association: int, dtype: int, value: bytes, protocol: int = 0) -> bytes:
    return bytes([protocol << 4 | code_set, association << 4 | dtype, 0, len(value)]) + value


def page83(*descriptors: bytes, qualifier: int = 0) -> bytes:
    body = b"".join(descriptors)
    return bytes([qualifier << 5, 0x83]) + len(body).to_bytes(2, "big") + body


def test_tgt_page_83_gives_the_naa_designator_in_hex() -> None:
    found = parse_vpd83_raw(recorded("libiscsi_tgt_vpd83.hex"))
    assert [(d.type_name, d.code_set, d.association) for d in found] == [
        ("T10_VENDOR_ID", 2, 0),
        ("NAA", 1, 0),
        ("NAA", 1, 0),
    ]
    assert found[2].value.hex() == WWN
    ids = raw_identities(found)
    assert WWN in ids
    assert ids == [WWN, "3000000100000001"]  # the T10 id carries the same 32 characters: listed once


def test_binary_naa_with_nul_bytes_is_read_whole() -> None:
    """The tools print a binary designator as text, cut at its first NUL; the raw parse does not."""
    naa = bytes.fromhex("60000000000000000e00000000010000")
    data = page83(descriptor(1, 0, 3, naa))
    assert raw_identities(parse_vpd83_raw(data)) == [naa.hex()]
    text = "Code Set:(1) BINARY\nDesignator Type:(3) NAA\nDesignator:[`]\n"
    assert identities(parse_vpd83(text)) == []  # what iscsi-inq's text gives for the same designator


def test_only_the_logical_units_designators_are_its_identity() -> None:
    port = bytes.fromhex("6001405aabbccddeeff0011223344999")
    lu = bytes.fromhex(WWN)
    data = page83(descriptor(1, 1, 3, port), descriptor(1, 2, 3, port), descriptor(1, 0, 3, lu))
    assert raw_identities(parse_vpd83_raw(data)) == [WWN]


def test_eui64_and_textual_identities() -> None:
    eui = bytes.fromhex("0011223344556677")
    data = page83(
        descriptor(1, 0, 2, eui),
        descriptor(3, 0, 8, b"naa." + WWN.upper().encode() + b"\0\0\0\0"),
        descriptor(2, 0, 1, b"IET     not-hex-at-all"),
        descriptor(1, 0, 4, b"\0\0\0\1"),  # relative target port: not an identity
    )
    assert raw_identities(parse_vpd83_raw(data)) == ["0011223344556677", WWN]


def test_a_cut_page_is_never_read_past() -> None:
    whole = page83(descriptor(1, 0, 3, bytes.fromhex(WWN)), descriptor(1, 0, 2, bytes(8)))
    assert page_length(whole) == len(whole)
    cut = whole[:-3]  # the buffer was shorter than the page says
    assert [d.type for d in parse_vpd83_raw(cut)] == [3]
    lying = whole[:4] + bytes([1, 3, 0, 200]) + bytes(10)  # a descriptor longer than the page
    assert parse_vpd83_raw(lying) == []


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x00\x83", "shorter than its header"),
        (bytes([0, 0x80, 0, 0]), "answered page 0x80"),
        (page83(qualifier=3), "peripheral qualifier 3"),
    ],
)
def test_bad_pages_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(BadPage, match=words):
        parse_vpd83_raw(data)


def test_tgt_serial_and_capacity() -> None:
    assert parse_vpd80_raw(recorded("libiscsi_tgt_vpd80.hex")) == "SERIAL1"
    assert parse_readcapacity16_raw(recorded("libiscsi_tgt_readcapacity16.hex")) == 16 * 1024 * 1024
    assert parse_vpd80_raw(bytes([0, 0x80, 0, 6]) + b"AB12\0\0") == "AB12"


def test_capacity_needs_its_twelve_bytes_and_a_block_length() -> None:
    assert parse_readcapacity16_raw((7).to_bytes(8, "big") + (4096).to_bytes(4, "big")) == 8 * 4096
    with pytest.raises(BadPage):
        parse_readcapacity16_raw(bytes(11))
    with pytest.raises(BadPage, match="block length 0"):
        parse_readcapacity16_raw(bytes(32))


def test_designator_names() -> None:
    assert RawDesignator(3, 1, 0, b"").type_name == "NAA"
    assert RawDesignator(15, 1, 0, b"").type_name == "TYPE_15"


WHERE = "iscsi://u@127.0.0.1:3260/iqn.x:t/1"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        # libiscsi's own words, as the in-process reader and iscsi-inq get them from a real tgtd
        ("Failed to log in to target. Status: Authentication failure(513)", PermissionDenied),
        ("Failed to log in to target. Status: Target not found(515)", NotFound),
        ("Login Failed. SENSE KEY:ILLEGAL_REQUEST(5) ASCQ:LOGICAL_UNIT_NOT_SUPPORTED(0x2500)", NotFound),
        ("SENSE KEY:ILLEGAL_REQUEST(5) ASCQ:LOGICAL_UNIT_NOT_SUPPORTED(0x2500)", NotFound),
        (
            "Failed to connect to iSCSI socket. iscsi_service: socket error Connection refused(111).",
            Unavailable,
        ),
        ("SENSE KEY:NOT_READY(2) ASCQ:MEDIUM_NOT_PRESENT(0x3a00)", Unavailable),
        ("", Unavailable),
    ],
)
def test_libiscsi_errors_map_as_for_the_tools(text: str, error: type[Exception]) -> None:
    exc = classify(text, WHERE)
    assert type(exc) is error
    assert WHERE in exc.message


class _Reader:
    """A LunReader at its Protocol seam: answers, or fails as a refused login does."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def identities(self, lun: Lun, chap: Chap | None, initiator: str) -> list[str]:
        self.clock.advance(0.002)
        return [WWN]

    def serial(self, lun: Lun, chap: Chap | None, initiator: str) -> str:
        self.clock.advance(0.001)
        raise classify("Authentication failure(513)", "here")

    def size(self, lun: Lun, chap: Chap | None, initiator: str) -> int:
        return 1 << 20


class _Steps:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    def observe(self, step: str, seconds: float) -> None:
        self.seen.append((step, round(seconds, 6)))


def test_in_process_reads_are_the_identity_step() -> None:
    clock, steps = FakeClock(), _Steps()
    timed = TimedLunReader(_Reader(clock), steps, clock)
    lun = Lun("127.0.0.1", 3260, "iqn.x:t", 1)
    assert timed.identities(lun, None, "iqn.x:i") == [WWN]
    with pytest.raises(PermissionDenied):
        timed.serial(lun, None, "iqn.x:i")  # a failed read is timed too
    assert timed.size(lun, None, "iqn.x:i") == 1 << 20
    assert steps.seen == [("identity", 0.002), ("identity", 0.001), ("identity", 0.0)]
