"""blockwire.validate: each rule, and the boundary cases where storage's and the agent's validators
once disagreed (the module docstring says which rule won)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from blockwire import validate
from blockwire.errors import InvalidArgument
from blockwire.model import (
    Chap,
    ConnectionInfo,
    Connector,
    FcConnection,
    IoTune,
    IscsiConnection,
    IscsiPath,
    LocalConnection,
    NvmeofConnection,
    NvmeofPortal,
    RbdConnection,
    Transport,
)
from blockwire.secret import Secret

IQN = "iqn.2026-01.io.example:vol-1"
HOST_IQN = "iqn.2026-01.io.example:host-a"
WWN = "6001405abcdef0123456789abcdef012"


def field_of(fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(InvalidArgument) as err:
        fn(*args, **kwargs)  # type: ignore[operator]
    return err.value.field


# -- scalars ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "a", "x" * 255, "vm 1 (é)", "\U0001f4a9"])
def test_text_takes_printable_strings_up_to_255(value: str) -> None:
    assert validate.text(value, "f") == value


@pytest.mark.parametrize("value", ["x" * 256, "a\x00b", "a\nb", "\t", "\x1b[31m", "\u202eevil"])
def test_text_refuses_long_and_control_characters(value: str) -> None:
    assert field_of(validate.text, value, "serial") == "serial"


def test_text_takes_a_longer_bound() -> None:
    assert validate.text("/" + "a" * 4000, "f", validate.MAX_PATH)


@pytest.mark.parametrize("value", ["a", "vol-1", "A_b.c", "_x", "x" * 63])
def test_good_names(value: str) -> None:
    assert validate.name(value) == value


@pytest.mark.parametrize("value", ["", "-a", ".a", "a b", "x" * 64, "a/b", "é", "a\n"])
def test_bad_names_name_the_field(value: str) -> None:
    assert field_of(validate.name, value) == "name"
    assert field_of(validate.name, value, "backend") == "backend"


@pytest.mark.parametrize("value", ["0123456789abcdef0123456789abcdef", "vol-1", "_a", "a.b-c", "v" * 128])
def test_good_ids(value: str) -> None:
    assert validate.object_id(value, "volume_id") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "v" * 129,
        "a/../../b",
        "../x",
        "-x",  # the agent once took it as an attachment id
        ".x",
        "a b",  # storage once took any printable id (and answered NOT_FOUND)
        "é",
        "vol-1\n",
    ],
)
def test_bad_ids(value: str) -> None:
    assert field_of(validate.object_id, value, "snapshot_id") == "snapshot_id"


@pytest.mark.parametrize(
    "value", ["vm1", "instance-0000002a", "b3a5e5d4-1f43-4f4e-9d7c-0c8f3c1a2b3c", "vm (é)"]
)
def test_good_domains(value: str) -> None:
    assert validate.domain(value) == value


@pytest.mark.parametrize("value", ["a/b", "d" * 256, "vm1\x00", "vm\n"])
def test_bad_domains_everywhere(value: str) -> None:
    """'a/b' is what storage's CreateAttachment once took and the agent never did."""
    assert field_of(validate.domain, value) == "domain"
    assert field_of(validate.domain, value, required=False) == "domain"


def test_an_empty_domain_is_refused_only_where_it_is_required() -> None:
    assert field_of(validate.domain, "") == "domain"
    assert validate.domain("", required=False) == ""


@pytest.mark.parametrize("value", ["h", "host-a", "cn1.example.org", "cn1.example.org.", "my_host"])
def test_good_hosts(value: str) -> None:
    assert validate.host(value) == value


@pytest.mark.parametrize("value", ["", "a b", "a;b|c", "<host>", "-h", "h" * 254, "a..b"])
def test_bad_hosts(value: str) -> None:
    assert field_of(validate.host, value) == "host"


@pytest.mark.parametrize("value", ["10.0.0.1", "::1", "fe80::1%eth0", "fe80::1%eth0.100", "::ffff:1.2.3.4"])
def test_good_ip_addresses(value: str) -> None:
    assert validate.ip_address(value, "ips[0]") == value


@pytest.mark.parametrize(
    "value", ["", "1.2.3.4;id", "1.2.3.04", "host", "fe80::1%a;b", "1.2.3.4%eth0", "::1%"]
)
def test_bad_ip_addresses(value: str) -> None:
    assert field_of(validate.ip_address, value, "ips[0]") == "ips[0]"


# -- portals: IP:port only ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        ("127.0.0.1:3260", ("127.0.0.1", 3260)),
        ("[::1]:3260", ("::1", 3260)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        ("[fe80::1%eth0]:3260", ("fe80::1%eth0", 3260)),
    ],
)
def test_good_portals(value: str, parts: tuple[str, int]) -> None:
    assert validate.portal(value) == value
    assert validate.split_portal(value) == parts


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1",  # the agent once defaulted the port to 3260
        "storage.example:3260",  # the agent once took host names
        "evil;id:3260",
        "a\x00b:3260",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "127.0.0.1:3260;id",
        "127.0.0.1:3260\n",
        "127.0.0.1:٣٢٦٠",  # non-ASCII digits
        "[1.2.3.4]:1",
        "[fe80::1%a;b]:3260",  # both once took any zone id: ';' reached iscsiadm's -p
        "[::1]",
        "",
        "1" * 100,
    ],
)
def test_bad_portals(value: str) -> None:
    assert field_of(validate.portal, value, "paths[0].portal") == "paths[0].portal"


def test_unbracketed_ipv6_says_brackets() -> None:
    for value in ("::1", "::1:3260", "fe80::1:3260"):
        with pytest.raises(InvalidArgument, match="brackets"):
            validate.split_portal(value)


# -- iSCSI names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "iqn.2026-01.io.example:host-a",
        "iqn.1994-05.com.redhat:abc123",
        "iqn.2026-01.io.example",
        "iqn.2026-01.io.blockwire:storage:0123456789abcdef",
        "eui.0123456789ABCDEF",
        "iqn.2026-01.x:" + "a" * (223 - len("iqn.2026-01.x:")),
    ],
)
def test_good_iqns(value: str) -> None:
    assert validate.iqn(value, "f") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "iqn",
        "host-a",
        "eui.12",
        "iqn.2026-13.io.example",  # month 13: the QEMU connector's own rule once took it
        "iqn.2026-00.io.example",
        "iqn.2026-01.Io.example",  # upper case in the domain: likewise
        "iqn.2026-01.io.example:a;b",
        "iqn.2026-01.io.example:`id`",
        "iqn.2026-01.io.example:$(id)",
        "iqn.2026-01.io.example:a b",
        "iqn.2026-01.io.example<y>",  # the QEMU connector's rule took it (no space, no '/')
        "iqn.2026-01.io.example\n",
        "eui.0123456789abcdef\n",
        "iqn.2026-01.x:" + "a" * (224 - len("iqn.2026-01.x:")),
    ],
)
def test_bad_iqns(value: str) -> None:
    assert field_of(validate.iqn, value, "connector.initiator_iqn") == "connector.initiator_iqn"


def test_nqns() -> None:
    assert validate.nqn("nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427", "f")
    for bad in (
        "",
        "nqn.2014-08.org.nvmexpress",
        "testnqn",
        "nqn.2014-08.org.x:a b",
        "nqn.2014-08.x:" + "a" * 223,
    ):
        assert field_of(validate.nqn, bad, "f") == "f"


# -- LUNs, CHAP, WWNs, WWPNs -------------------------------------------------------------------------


def test_luns() -> None:
    assert validate.lun(0, "lun") == 0
    assert validate.lun(16383, "lun") == 16383
    for bad in (16384, -1, 2**32 - 1, True):
        assert field_of(validate.lun, bad, "lun") == "lun"


def test_chap() -> None:
    good = Chap("in-0123456789abcdef01234567", Secret("Abc123!~secret"))
    assert validate.chap(good, "chap") is good
    assert field_of(validate.chap, replace(good, username=""), "chap") == "chap.username"
    for user in ("u@10.0.0.9:3260/iqn.x/0#", "a b", "x" * 256, "é"):
        assert field_of(validate.chap, replace(good, username=user), "chap") == "chap.username"
    for secret in ("", "a b", "a\x00b", "é" * 12, "x" * 256):
        with pytest.raises(InvalidArgument) as err:
            validate.chap(replace(good, password=Secret(secret)), "chap")
        assert err.value.field == "chap.password"
        assert not secret or secret not in err.value.message


@pytest.mark.parametrize(
    "value",
    [WWN, WWN.upper(), "naa." + WWN, "0x" + WWN, "eui.0123456789abcdef", "60:01:40:5a:bc:de:f0:12", WWN[:16]],
)
def test_good_wwns(value: str) -> None:
    assert validate.wwn(value, "wwn") == value


@pytest.mark.parametrize(
    "value",
    [
        "6001405;id",
        "3" + WWN,  # a multipath WWID (with its designator type) is not a WWN
        WWN[:31],
        f" {WWN}",
        WWN + "\n",
        "naa.naa." + WWN,
        "x" * 65,
    ],
)
def test_bad_wwns(value: str) -> None:
    assert field_of(validate.wwn, value, "connection_info.wwn") == "connection_info.wwn"


def test_wwpns_have_one_normal_form() -> None:
    assert validate.normal_wwpn("0x500a09c0ffe1aa01\n") == "500a09c0ffe1aa01"
    assert validate.normal_wwpn("50:0A:09:C0:FF:E1:AA:01") == "500a09c0ffe1aa01"
    assert validate.wwpn("0x50:0a:09:c0:ff:e1:aa:01", "f")
    for bad in ("500a09c0ffe1aa0", "500a09c0ffe1aa0g", "500a09c0ffe1aa01;id", ""):
        assert field_of(validate.wwpn, bad, "f") == "f"


# -- labels, paths, sizes, pages, disks --------------------------------------------------------------


def test_labels() -> None:
    assert validate.labels({"team/app": "x"}) == {"team/app": "x"}
    assert validate.labels({"k" * 63: "é" * 255})
    assert field_of(validate.labels, {"Upper": "x"}).startswith("labels[")
    assert field_of(validate.labels, {"k": "v" * 256}) == "labels['k']"
    assert field_of(validate.labels, {"k": "\x00"}) == "labels['k']"
    assert field_of(validate.labels, {str(i): "" for i in range(65)}) == "labels"
    assert field_of(validate.labels, {"A": "b"}, "label_selector").startswith("label_selector[")


@pytest.mark.parametrize(
    "value", ["/dev/loop99", "/srv/images/debian.qcow2", "/", "/dev/disk/by-id/wwn-0x6001"]
)
def test_good_paths(value: str) -> None:
    assert validate.path(value, "local.path") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "relative/path",
        "/dev/../etc/shadow",
        "/srv/images/../../etc/shadow",
        "/a/./b",
        "//a",
        "/a/",
        "/a\x00b",
    ],
)
def test_bad_paths(value: str) -> None:
    """One rule for the agent's local paths and storage's image paths (once two copies)."""
    assert field_of(validate.path, value, "source_image.path") == "source_image.path"


def test_path_length() -> None:
    assert validate.path("/" + "a" * 4095, "p")
    assert field_of(validate.path, "/" + "a" * 4096, "p") == "p"


@pytest.mark.parametrize("value", [0, -1, 1, 1024 * 1024 + 1, 1 << 61])
def test_bad_sizes(value: int) -> None:
    with pytest.raises(InvalidArgument, match="size_bytes"):
        validate.size(value)


def test_zero_size_only_with_a_source() -> None:
    assert validate.size(0, allow_zero=True) == 0
    assert validate.size(2 << 20) == 2 << 20
    assert validate.size(1 << 60) == 1 << 60


def test_page_size() -> None:
    assert validate.page_size(0) == validate.DEFAULT_PAGE == 100
    assert validate.page_size(validate.MAX_PAGE) == 1000
    for bad in (1001, -1, 2**32 - 1):
        assert field_of(validate.page_size, bad) == "page_size"


def test_block_sizes_are_one_rule_for_disks_and_connection_info() -> None:
    """The agent's disk options once took any power of two >= 512; connection info only up to 64 KiB."""
    for good in (0, 512, 4096, 65536):
        assert validate.block_size(good, "disk.logical_block_size") == good
    for bad in (1, 256, 1000, 131072, 2**31):
        assert field_of(validate.block_size, bad, "disk.logical_block_size") == "disk.logical_block_size"


def test_disk_serial_and_target_dev() -> None:
    assert validate.disk_serial("", "disk.serial") == ""
    assert validate.disk_serial("SERIAL1.a-b_c", "disk.serial")
    assert field_of(validate.disk_serial, "bad serial!") == "disk.serial"
    assert field_of(validate.disk_serial, "x" * 21) == "disk.serial"
    for good in ("", "sda", "vdb", "hdc", "sdaaa"):
        assert validate.target_dev(good) == good
    for bad in ("xyz", "sd", "sdA", "xvda", "sdb\n", "sdaaaa"):
        assert field_of(validate.target_dev, bad) == "disk.target_dev"


def test_iotune() -> None:
    assert validate.iotune(IoTune(total_iops_sec=100, group_name="g1"), "disk.iotune")
    assert field_of(validate.iotune, IoTune(group_name="<x>"), "disk.iotune") == "disk.iotune.group_name"
    assert field_of(validate.iotune, IoTune(group_name="g" * 65), "qos") == "qos.group_name"
    assert field_of(validate.iotune, IoTune(read_iops_sec=-1), "qos") == "qos.read_iops_sec"
    assert validate.iotune(IoTune(total_bytes_sec=2**64 - 1), "qos")


def test_messages_quote_at_most_80_characters() -> None:
    huge = "A" * 10**6
    for fn, args in (
        (validate.name, (huge,)),
        (validate.object_id, (huge, "volume_id")),
        (validate.host, (huge,)),
        (validate.iqn, (huge, "f")),
        (validate.portal, (huge,)),
        (validate.wwpn, (huge, "f")),
        (validate.path, ("/" + huge, "f")),
        (validate.domain, ("/" + "A" * 200,)),
    ):
        with pytest.raises(InvalidArgument) as err:
            fn(*args)  # type: ignore[operator]
        assert "A" * 81 not in err.value.message, fn
        assert len(err.value.message) < 300, fn


# -- connectors ---------------------------------------------------------------------------------------


def test_connector_for_an_iscsi_export_needs_host_iqn_and_iscsi() -> None:
    good = Connector(host="h", initiator_iqn=HOST_IQN)
    assert validate.connector(good, transport=Transport.ISCSI) is good
    assert validate.connector(
        replace(good, transports=(Transport.ISCSI, Transport.LOCAL)), transport=Transport.ISCSI
    )
    assert field_of(validate.connector, replace(good, host=""), transport=Transport.ISCSI) == "connector.host"
    assert (
        field_of(validate.connector, Connector(host="h"), transport=Transport.ISCSI)
        == "connector.initiator_iqn"
    )
    assert validate.connector(Connector(host="h"))  # without an export in view, the IQN is optional
    assert (
        field_of(validate.connector, replace(good, transports=(Transport.FC,)), transport=Transport.ISCSI)
        == "connector.transports"
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"host": "<host>&'\""}, "connector.host"),
        ({"initiator_iqn": "iqn.2026-01.io.x:`id`"}, "connector.initiator_iqn"),
        ({"ips": ("1.2.3.4;id",)}, "connector.ips[0]"),
        ({"ips": ("10.0.0.1",) * 65}, "connector.ips"),
        ({"wwpns": ("0x500a09c0ffe1aa01",)}, "connector.wwpns[0]"),  # a connector's are normal already
        ({"wwnns": ("z" * 16,)}, "connector.wwnns[0]"),
        ({"nvme_host_nqn": "a\nb"}, "connector.nvme_host_nqn"),
        ({"platform": "x" * 10**6}, "connector.platform"),
    ],
)
def test_bad_connectors(change: dict[str, object], field: str) -> None:
    c = replace(Connector(host="h", initiator_iqn=HOST_IQN), **change)  # type: ignore[arg-type]
    assert field_of(validate.connector, c) == field


# -- whole connection info, every transport ---------------------------------------------------------


def iscsi(**change: object) -> ConnectionInfo:
    t = IscsiConnection(
        paths=(IscsiPath("127.0.0.1:3260", IQN, 1), IscsiPath("[::1]:3260", IQN, 1)),
        chap=Chap("in-0123", Secret("secretpass12")),
        mutual_chap=Chap("out-0123", Secret("secretpass34")),
        initiator_iqn=HOST_IQN,
    )
    return ConnectionInfo(
        transport=replace(t, **change),  # type: ignore[arg-type]
        volume_id="0123456789abcdef0123456789abcdef",
        attachment_id="fedcba9876543210fedcba9876543210",
        wwn=WWN,
        serial="0123456789abcdef0123",
        size_bytes=16 << 20,
    )


GOOD_TRANSPORTS = [
    iscsi(),
    ConnectionInfo(
        transport=FcConnection(
            target_wwpns=("500a09c0ffe1aa01", "0x50:0a:09:c0:ff:e1:aa:02"),
            lun=3,
            initiator_target_map={"10000000c9a1b2c3": ("500a09c0ffe1aa01",)},
        ),
        volume_id="vol-1",
        wwn=WWN,
    ),
    ConnectionInfo(
        transport=NvmeofConnection(
            subsystem_nqn="nqn.2026-01.io.example:vol-1",
            portals=(NvmeofPortal("10.0.0.1:4420"), NvmeofPortal("[fd00::1]:4420", "rdma")),
            namespace_uuid="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            namespace_id=1,
        ),
        volume_id="vol-1",
    ),
    ConnectionInfo(
        transport=RbdConnection(
            pool="volumes",
            image="volume-1b4e28ba",
            monitors=("10.0.0.1:6789", "10.0.0.2:6789"),
            user="cinder",
            key=Secret("AQBzZ2lkAAAAABAAdW5pdHRlc3Rpbmdvbmx5Lg=="),
        ),
        volume_id="vol-1",
    ),
    ConnectionInfo(transport=LocalConnection("/dev/loop99"), volume_id="embedded-demo"),
]


@pytest.mark.parametrize("info", GOOD_TRANSPORTS, ids=lambda i: i.kind.value)
def test_good_connection_info_of_every_transport(info: ConnectionInfo) -> None:
    assert validate.validate_connection_info(info) is info


BAD = [
    (iscsi(paths=()), "connection_info.iscsi.paths"),
    (iscsi(paths=(IscsiPath("127.0.0.1:3260", IQN, 1),) * 33), "connection_info.iscsi.paths"),
    (iscsi(paths=(IscsiPath("storage.example:3260", IQN, 1),)), "connection_info.iscsi.paths[0].portal"),
    (iscsi(paths=(IscsiPath("::1", IQN, 1),)), "connection_info.iscsi.paths[0].portal"),
    (
        iscsi(paths=(IscsiPath("127.0.0.1:3260", "iqn.2026-13.x", 1),)),
        "connection_info.iscsi.paths[0].target_iqn",
    ),
    (iscsi(paths=(IscsiPath("127.0.0.1:3260", IQN, 16384),)), "connection_info.iscsi.paths[0].lun"),
    (iscsi(initiator_iqn="$(id)"), "connection_info.iscsi.initiator_iqn"),
    (iscsi(chap=None), "connection_info.iscsi.mutual_chap"),
    (iscsi(chap=Chap("", Secret("secretpass12"))), "connection_info.iscsi.chap.username"),
    (iscsi(mutual_chap=Chap("", Secret("secretpass12"))), "connection_info.iscsi.mutual_chap.username"),
    (iscsi(chap=Chap("user1", Secret("a\x00b"))), "connection_info.iscsi.chap.password"),
    (replace(iscsi(), volume_id="a/../../b"), "connection_info.volume_id"),
    (replace(iscsi(), attachment_id="-x"), "connection_info.attachment_id"),
    (replace(iscsi(), wwn="6001405;id"), "connection_info.wwn"),
    (replace(iscsi(), serial="s\n"), "connection_info.serial"),
    (replace(iscsi(), size_bytes=-1), "connection_info.size_bytes"),
    (replace(iscsi(), logical_block_size=1000), "connection_info.logical_block_size"),
    (replace(iscsi(), physical_block_size=131072), "connection_info.physical_block_size"),
    (replace(iscsi(), qos=IoTune(group_name="g\x00")), "connection_info.qos.group_name"),
    (ConnectionInfo(transport=FcConnection((), 1)), "connection_info.fc.target_wwpns"),
    (ConnectionInfo(transport=FcConnection(("5;id",), 1)), "connection_info.fc.target_wwpns[0]"),
    (ConnectionInfo(transport=FcConnection(("500a09c0ffe1aa01",), 16384)), "connection_info.fc.lun"),
    (
        ConnectionInfo(transport=FcConnection(("500a09c0ffe1aa01",), 1, {"x": ("500a09c0ffe1aa01",)})),
        "connection_info.fc.initiator_target_map",
    ),
    (
        ConnectionInfo(transport=NvmeofConnection("testnqn", (NvmeofPortal("10.0.0.1:4420"),))),
        "connection_info.nvmeof.subsystem_nqn",
    ),
    (ConnectionInfo(transport=NvmeofConnection("nqn.2026-01.io.x:v", ())), "connection_info.nvmeof.portals"),
    (
        ConnectionInfo(
            transport=NvmeofConnection("nqn.2026-01.io.x:v", (NvmeofPortal("nvme.example:4420"),))
        ),
        "connection_info.nvmeof.portals[0].address",
    ),
    (
        ConnectionInfo(
            transport=NvmeofConnection("nqn.2026-01.io.x:v", (NvmeofPortal("10.0.0.1:4420", "fc"),))
        ),
        "connection_info.nvmeof.portals[0].transport",
    ),
    (
        ConnectionInfo(
            transport=NvmeofConnection(
                "nqn.2026-01.io.x:v", (NvmeofPortal("10.0.0.1:4420"),), namespace_uuid="x"
            )
        ),
        "connection_info.nvmeof.namespace_uuid",
    ),
    (ConnectionInfo(transport=RbdConnection("", "img", ("10.0.0.1:6789",))), "connection_info.rbd.pool"),
    (ConnectionInfo(transport=RbdConnection("p", "a/b", ("10.0.0.1:6789",))), "connection_info.rbd.image"),
    (ConnectionInfo(transport=RbdConnection("p", "i")), "connection_info.rbd.monitors"),
    (ConnectionInfo(transport=RbdConnection("p", "i", ("mon;id",))), "connection_info.rbd.monitors[0]"),
    (
        ConnectionInfo(transport=RbdConnection("p", "i", ("10.0.0.1:6789",), user="a b")),
        "connection_info.rbd.user",
    ),
    (
        ConnectionInfo(transport=RbdConnection("p", "i", ("10.0.0.1:6789",), key=Secret("not base64!"))),
        "connection_info.rbd.key",
    ),
    (ConnectionInfo(transport=LocalConnection("/dev/../etc/shadow")), "connection_info.local.path"),
    (ConnectionInfo(transport=LocalConnection("")), "connection_info.local.path"),
]


@pytest.mark.parametrize(("info", "field"), BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_connection_info_names_the_field(info: ConnectionInfo, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate.validate_connection_info(info)
    assert err.value.field == field
    assert "secretpass" not in err.value.message
    assert "AQBz" not in err.value.message


def test_connection_info_without_a_transport() -> None:
    info = ConnectionInfo(transport=None)  # type: ignore[arg-type]
    assert field_of(validate.validate_connection_info, info) == "connection_info"


def test_the_volume_id_is_optional_in_connection_info() -> None:
    """A host-only connect may not know it; HostAgent.attach requires it (tests/unit/hostagent)."""
    assert validate.validate_connection_info(replace(iscsi(), volume_id="", attachment_id=""))


def test_subsystem_nqns_take_the_free_form_linux_targets_accept() -> None:
    assert validate.subsystem_nqn("nqn.nvme-subsystem-1-8e6a4b5c-1d2f-4a3b-9c8d-7e6f5a4b3c2d", "f")
    assert validate.subsystem_nqn("nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427", "f")
    for bad in ("nvme-subsystem-1", "nqn.", "nqn.a b", "nqn.x;id", "nqn." + "a" * 300):
        assert field_of(validate.subsystem_nqn, bad, "f") == "f"
