"""blockwire.convert: every transport round-trips, and secrets can be left out."""

from __future__ import annotations

import pytest

from blockwire import model
from blockwire.convert import (
    connection_info_from_pb,
    connection_info_to_pb,
    connector_from_pb,
    connector_to_pb,
)
from blockwire.errors import InvalidArgument
from blockwire.secret import Secret
from blockwire.v1 import types_pb2 as pb

CHAP = model.Chap("user1", Secret("pw-123456789012"))
TRANSPORTS: list[model.TransportInfo] = [
    model.IscsiConnection(
        paths=(
            model.IscsiPath("127.0.0.1:3260", "iqn.2026-11.io.blockwire:vol-1", 1),
            model.IscsiPath("[::1]:3260", "iqn.2026-11.io.blockwire:vol-1", 1),
        ),
        chap=CHAP,
        mutual_chap=model.Chap("tgt", Secret("mutual-secret12")),
        initiator_iqn="iqn.1993-08.org.debian:01:abc",
    ),
    model.FcConnection(("5001405abcdef001",), 3, {"21000024ff000001": ("5001405abcdef001",)}),
    model.NvmeofConnection(
        "nqn.2026-11.io.blockwire:vol-1", (model.NvmeofPortal("127.0.0.1:4420"),), "u-1", 1
    ),
    model.RbdConnection("rbd", "vol-1", ("127.0.0.1:6789",), "admin", Secret("AQBkey==")),
    model.LocalConnection("/dev/loop3"),
]


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: type(t).__name__)
def test_connection_info_round_trips(transport: model.TransportInfo) -> None:
    info = model.ConnectionInfo(
        transport=transport,
        volume_id="v1",
        attachment_id="a1",
        wwn="360000000000000000e00000000010001",
        serial="beaf11",
        size_bytes=1 << 30,
        access_mode=model.AccessMode.READ_ONLY,
        discard=True,
        logical_block_size=4096,
        physical_block_size=4096,
        qos=model.IoTune(total_iops_sec=500, group_name="g"),
    )
    assert connection_info_from_pb(connection_info_to_pb(info)) == info


def test_secrets_can_be_left_out() -> None:
    info = model.ConnectionInfo(transport=TRANSPORTS[0])
    m = connection_info_to_pb(info, with_secrets=False)
    assert m.iscsi.chap.username == "user1"
    assert m.iscsi.chap.password == ""
    assert "pw-123456789012" not in str(m)


def test_missing_transport_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        connection_info_from_pb(pb.ConnectionInfo(), "request.connection_info")
    assert info.value.field == "request.connection_info"


def test_connector_round_trips() -> None:
    c = model.Connector(
        host="cn1",
        ips=("127.0.0.1",),
        initiator_iqn="iqn.1993-08.org.debian:01:abc",
        wwpns=("21000024ff000001",),
        wwnns=("20000024ff000001",),
        nvme_host_nqn="nqn.2014-08.org.nvmexpress:uuid:1",
        multipath=True,
        transports=(model.Transport.ISCSI, model.Transport.LOCAL),
        kernel_iscsi=True,
        platform="x86_64",
    )
    assert connector_from_pb(connector_to_pb(c)) == c
