"""Hostile input to every HostAgentService RPC, through the generated stub, against the real servicer
over fakes (tests/fakes/hostile_agent.py), with QEMU's initiator and with the kernel's.

Each property: the answer is OK or INVALID_ARGUMENT naming the field, or a code for well-formed input
that finds nothing (NOT_FOUND; FAILED_PRECONDITION for an identity the fake LUN does not have;
DEADLINE_EXCEEDED for a device that never appears; UNAVAILABLE for a login the fake host never
completes), never INTERNAL or UNKNOWN; every command-line argument that came from the request matches
a validator's pattern; the disk XML the hypervisor received parses, and the request's values come back
out of it exactly; no CHAP secret is in any XML or status message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from blockwire.errors import InvalidArgument
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from hostagent.rpc.servicer import HostAgentServicer
from tests.fakes.grpc_server import serve
from tests.fakes.hostile import MIB, SAFE_ARG, STRICT_IQN, call, check_status, hostile_text, hostile_u32
from tests.fakes.hostile_agent import HOST_IQN, HostileAgent, hostile_agent

C = grpc.StatusCode
TARGET = "iqn.2026-01.io.blockwire:vol-1"
WELL_FORMED_MISS = {C.NOT_FOUND, C.FAILED_PRECONDITION, C.DEADLINE_EXCEEDED, C.UNAVAILABLE}
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PORTAL = re.compile(r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}")
URL = re.compile(
    r"iscsi://([A-Za-z0-9._:-]+@)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}/(?P<iqn>[^/]+)/\d+"
)


@dataclass(repr=False)
class Rig:
    stub: hostagent_pb2_grpc.HostAgentServiceStub
    fakes: HostileAgent
    flavour: str


@pytest.fixture(scope="module", params=["qemu", "kernel"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    fakes = hostile_agent(tmp_path_factory.mktemp(f"hostile-agent-{request.param}"), request.param)
    with serve(HostAgentServicer(fakes.agent)) as running:
        channel = grpc.insecure_channel(
            running.address, options=[("grpc.max_receive_message_length", 8 * MIB)]
        )
        yield Rig(hostagent_pb2_grpc.HostAgentServiceStub(channel), fakes, request.param)
        channel.close()


def check_commands(rig: Rig) -> None:
    """Every argv element is a tool's word or a value a validator allowed (CHAP secrets go to iscsiadm
    as the value of node.session.auth.password*, and are printable ASCII)."""
    for argv in rig.fakes.runner.revealed:
        for i, a in enumerate(argv):
            assert "\x00" not in a
            assert "\n" not in a
            prev = argv[i - 1] if i else ""
            if prev == "-v" and "password" in argv[i - 2]:
                assert re.fullmatch(r"[!-~]{1,255}", a), "secrets are printable ASCII"
            elif prev in ("-T", "-i"):
                assert STRICT_IQN.fullmatch(a), argv
            elif prev == "-p":
                assert PORTAL.fullmatch(a), argv
            elif a.startswith("iscsi://"):
                m = URL.fullmatch(a)
                assert m, argv
                assert STRICT_IQN.fullmatch(m["iqn"]), argv
            else:
                assert SAFE_ARG.fullmatch(a), argv


def check_xml(rig: Rig, secrets: list[str]) -> None:
    for xml in rig.fakes.hv.attached_xml:
        disk = etree.fromstring(xml.encode())
        text = etree.tostring(disk, encoding="unicode")
        for s in secrets:
            assert s not in text, "a CHAP secret reached the disk XML"
        assert disk.find("source/auth/secret") is None or disk.find("source/auth/secret").get("usage")


def _detach_all(rig: Rig) -> None:
    for a in rig.fakes.agent.list_attachments():
        rig.fakes.agent.detach(a.domain, a.volume_id, force=True)
    rig.fakes.hv.attached_xml.clear()


chap = st.builds(
    pb.ChapCredentials,
    username=st.one_of(st.just("user1"), hostile_text),
    password=st.one_of(st.just("secretpass12"), hostile_text),
)
iscsi_paths = st.lists(
    st.builds(
        pb.IscsiPath,
        portal=st.one_of(
            st.sampled_from(["127.0.0.1:3260", "[::1]:3260", "storage.example:3260"]), hostile_text
        ),
        target_iqn=st.one_of(st.just(TARGET), hostile_text),
        lun=st.one_of(st.just(1), hostile_u32),
    ),
    min_size=0,
    max_size=2,
)


@st.composite
def connection_infos(draw: st.DrawFn) -> pb.ConnectionInfo:
    info = pb.ConnectionInfo(
        volume_id=draw(st.one_of(st.just("vol-1"), hostile_text)),
        attachment_id=draw(st.one_of(st.just(""), hostile_text)),
        wwn=draw(st.one_of(st.just(""), st.just("6001405abcdef0123456789abcdef012"), hostile_text)),
        serial=draw(st.one_of(st.just(""), hostile_text)),
        size_bytes=draw(st.integers(min_value=0, max_value=2**64 - 1)),
        access_mode=draw(st.integers(min_value=0, max_value=2**31 - 1)),  # type: ignore[arg-type]
        logical_block_size=draw(hostile_u32),
        physical_block_size=draw(hostile_u32),
    )
    info.qos.group_name = draw(st.one_of(st.just(""), hostile_text))
    kind = draw(st.sampled_from(["iscsi", "local", "fc", "nvmeof", "rbd", "none"]))
    if kind == "iscsi":
        info.iscsi.paths.extend(draw(iscsi_paths))
        info.iscsi.initiator_iqn = draw(st.one_of(st.just(""), st.just(HOST_IQN), hostile_text))
        if draw(st.booleans()):
            info.iscsi.chap.CopyFrom(draw(chap))
        if draw(st.booleans()):
            info.iscsi.mutual_chap.CopyFrom(draw(chap))
    elif kind == "local":
        info.local.path = draw(
            st.one_of(st.sampled_from(["/dev/loop99", "/dev/../etc/shadow"]), hostile_text)
        )
    elif kind == "fc":
        info.fc.target_wwpns.extend(
            draw(st.lists(st.one_of(st.just("500a09c0ffe1aa01"), hostile_text), max_size=2))
        )
        info.fc.lun = draw(hostile_u32)
    elif kind == "nvmeof":
        info.nvmeof.subsystem_nqn = draw(hostile_text)
    elif kind == "rbd":
        info.rbd.pool = draw(hostile_text)
    return info


disks = st.builds(
    pb.DiskOptions,
    bus=st.integers(min_value=0, max_value=8),
    cache=st.integers(min_value=0, max_value=8),
    io=st.integers(min_value=0, max_value=8),
    discard=st.integers(min_value=0, max_value=8),
    serial=st.one_of(st.just(""), hostile_text),
    target_dev=st.one_of(st.just(""), st.just("sdz"), hostile_text),
    logical_block_size=hostile_u32,
    physical_block_size=hostile_u32,
    iotune=st.builds(pb.IoTune, group_name=st.one_of(st.just(""), hostile_text)),
)


def _secrets(info: pb.ConnectionInfo) -> list[str]:
    return [p for p in (info.iscsi.chap.password, info.iscsi.mutual_chap.password) if len(p) >= 4]


@SETTINGS
@given(
    domain=st.one_of(st.just("vm1"), hostile_text),
    info=connection_infos(),
    disk=disks,
    by_id=st.booleans(),
    volume_id=st.one_of(st.just("vol-1"), hostile_text),
    mode=st.integers(min_value=0, max_value=3),
)
def test_attach_volume(
    rig: Rig,
    domain: str,
    info: pb.ConnectionInfo,
    disk: pb.DiskOptions,
    by_id: bool,
    volume_id: str,
    mode: int,
) -> None:
    req = hpb.AttachVolumeRequest(domain=domain, disk=disk, access_mode=mode)  # type: ignore[arg-type]
    if by_id:
        req.volume_id = volume_id
    else:
        req.connection_info.CopyFrom(info)
    resp, err = call(rig.stub.AttachVolume, req)
    try:
        check_status(
            err,
            {C.OK, C.INVALID_ARGUMENT, *WELL_FORMED_MISS},
            ("domain", "volume", "volume_id", "connection_info", "disk", "access_mode"),
        )
        for s in _secrets(info):
            if s in domain or s in volume_id:
                continue  # the same text drawn as a name too: the message may quote the name
            assert err is None or s not in (err.details() or "")
        check_commands(rig)
        check_xml(rig, _secrets(info))
        if isinstance(resp, hpb.AttachVolumeResponse):
            (xml,) = rig.fakes.hv.attached_xml
            parsed = etree.fromstring(xml.encode())
            source = parsed.find("source")
            assert source is not None
            if info.WhichOneof("transport") == "iscsi":
                path = info.iscsi.paths[0]
                assert source.get("name") == f"{path.target_iqn}/{path.lun}"
                assert parsed.find("source/initiator/iqn").get("name") == (
                    info.iscsi.initiator_iqn or HOST_IQN
                )
                if info.iscsi.HasField("chap"):
                    assert parsed.find("source/auth").get("username") == info.iscsi.chap.username
            if disk.serial:
                assert parsed.findtext("serial") == disk.serial
            if disk.iotune.group_name:
                assert parsed.findtext("iotune/group_name") == disk.iotune.group_name
    finally:
        _detach_all(rig)


@SETTINGS
@given(
    info=connection_infos(), force=st.booleans(), rpc=st.sampled_from(["ConnectVolume", "DisconnectVolume"])
)
def test_connect_and_disconnect(rig: Rig, info: pb.ConnectionInfo, force: bool, rpc: str) -> None:
    if rpc == "ConnectVolume":
        _, err = call(rig.stub.ConnectVolume, hpb.ConnectVolumeRequest(connection_info=info))
    else:
        _, err = call(
            rig.stub.DisconnectVolume, hpb.DisconnectVolumeRequest(connection_info=info, force=force)
        )
    check_status(err, {C.OK, C.INVALID_ARGUMENT, *WELL_FORMED_MISS}, ("connection_info",))
    check_commands(rig)


@SETTINGS
@given(
    domain=st.one_of(st.just("vm1"), st.just(""), hostile_text),
    volume_id=st.one_of(st.just("vol-1"), hostile_text),
    size=st.integers(min_value=0, max_value=2**64 - 1),
    rpc=st.sampled_from(["DetachVolume", "ExtendVolume", "GetAttachment", "ListAttachments"]),
)
def test_by_volume_and_domain(rig: Rig, domain: str, volume_id: str, size: int, rpc: str) -> None:
    if rpc == "DetachVolume":
        _, err = call(rig.stub.DetachVolume, hpb.DetachVolumeRequest(domain=domain, volume_id=volume_id))
    elif rpc == "ExtendVolume":
        req = hpb.HostAgentServiceExtendVolumeRequest(volume_id=volume_id, new_size_bytes=size)
        _, err = call(rig.stub.ExtendVolume, req)
    elif rpc == "GetAttachment":
        req2 = hpb.HostAgentServiceGetAttachmentRequest(volume_id=volume_id, domain=domain)
        _, err = call(rig.stub.GetAttachment, req2)
    else:
        _, err = call(rig.stub.ListAttachments, hpb.HostAgentServiceListAttachmentsRequest(domain=domain))
    check_status(err, {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND}, ("domain", "volume_id"))
    check_commands(rig)


@SETTINGS
@given(
    domain=hostile_text,
    volume_id=hostile_text,
    types=st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=3),
)
def test_watch_events_filters(rig: Rig, domain: str, volume_id: str, types: list[int]) -> None:
    req = hpb.WatchEventsRequest(domain=domain, volume_id=volume_id, types=types)  # type: ignore[arg-type]
    try:
        for _ in rig.stub.WatchEvents(req, timeout=0.3):
            pass
        err = None
    except grpc.RpcError as e:
        err = e
    if err is not None and err.code() is C.DEADLINE_EXCEEDED:
        return  # a valid filter: the stream stays open until the caller goes
    check_status(err, {C.INVALID_ARGUMENT}, ("domain", "volume_id", "types"))


def _attach(rig: Rig, domain: str = "vm1", **fields: object) -> hpb.AttachVolumeRequest:
    info = pb.ConnectionInfo(volume_id="vol-9")
    info.iscsi.paths.add(portal="127.0.0.1:3260", target_iqn=TARGET, lun=1)
    info.iscsi.chap.username, info.iscsi.chap.password = "user1", "secretpass12"
    for path, value in fields.items():
        obj: object = info
        *parents, last = path.split(".")
        for p in parents:
            obj = getattr(obj, p)[0] if p == "paths" else getattr(obj, p)
        setattr(obj, last, value)
    return hpb.AttachVolumeRequest(domain=domain, connection_info=info)


def _cinder(data: object, domain: str = "vm1") -> hpb.AttachVolumeRequest:
    """An attach with Cinder's connection info: `data` as JSON text, or a dict to serialize."""
    text = data if isinstance(data, str) else json.dumps({"driver_volume_type": "iscsi", "data": data})
    return hpb.AttachVolumeRequest(domain=domain, cinder_connection_info=text, allow_unverified_identity=True)


_CINDER = {"target_portal": "127.0.0.1:3260", "target_iqn": TARGET, "target_lun": 1, "volume_id": "vol-9"}

KNOWN = [
    (lambda: _cinder("{not json"), "cinder_connection_info"),
    (lambda: _cinder("[]"), "cinder_connection_info"),
    (
        lambda: _cinder({**_CINDER, "target_portal": "evil;id:3260"}),
        "cinder_connection_info.iscsi.paths[0].portal",
    ),
    (
        lambda: _cinder({**_CINDER, "target_iqn": "iqn.2026-01.x<y>"}),
        "cinder_connection_info.iscsi.paths[0].target_iqn",
    ),
    (lambda: _cinder({**_CINDER, "volume_id": "a/../../b"}), "cinder_connection_info.volume_id"),
    (
        lambda: _cinder({**_CINDER, "auth_method": "CHAP", "auth_username": "u", "auth_password": "a\x00b"}),
        "cinder_connection_info.iscsi.chap.password",
    ),
    (lambda: _cinder({**_CINDER, "surprise": 1}), "cinder_connection_info.data"),
    (
        lambda: _attach(None, **{"iscsi.paths.portal": "evil;id:3260"}),
        "connection_info.iscsi.paths[0].portal",
    ),  # type: ignore[arg-type]
    (lambda: _attach(None, **{"iscsi.paths.portal": "a\x00b:3260"}), "connection_info.iscsi.paths[0].portal"),  # type: ignore[arg-type]
    (
        lambda: _attach(None, **{"iscsi.paths.target_iqn": "iqn.2026-01.x:a;b"}),
        "connection_info.iscsi.paths[0].target_iqn",
    ),  # type: ignore[arg-type]
    (
        lambda: _attach(None, **{"iscsi.paths.target_iqn": "iqn.2026-01.x<y>"}),
        "connection_info.iscsi.paths[0].target_iqn",
    ),  # type: ignore[arg-type]
    (lambda: _attach(None, **{"iscsi.paths.lun": 16384}), "connection_info.iscsi.paths[0].lun"),  # type: ignore[arg-type]
    (
        lambda: _attach(None, **{"iscsi.initiator_iqn": "iqn.2026-01.x:\x00"}),
        "connection_info.iscsi.initiator_iqn",
    ),  # type: ignore[arg-type]
    (lambda: _attach(None, **{"iscsi.initiator_iqn": "$(id)"}), "connection_info.iscsi.initiator_iqn"),  # type: ignore[arg-type]
    (
        lambda: _attach(None, **{"iscsi.chap.username": "u@10.0.0.9:3260/iqn.x/0#"}),
        "connection_info.iscsi.chap.username",
    ),  # type: ignore[arg-type]
    (lambda: _attach(None, **{"iscsi.chap.password": "a\x00b"}), "connection_info.iscsi.chap.password"),  # type: ignore[arg-type]
    (lambda: _attach(None, **{"volume_id": "a/../../b"}), "connection_info.volume_id"),  # type: ignore[arg-type]
    (lambda: _attach(None, **{"volume_id": "v" * 1000}), "connection_info.volume_id"),  # type: ignore[arg-type]
    (lambda: _attach(None, **{"wwn": "6001405;id"}), "connection_info.wwn"),  # type: ignore[arg-type]
    (lambda: _attach(None, **{"qos.group_name": "g\x00"}), "connection_info.qos.group_name"),  # type: ignore[arg-type]
    (lambda: _attach(None, domain="d" * 10**6), "domain"),  # type: ignore[arg-type]
    (lambda: _attach(None, domain="vm1\x00"), "domain"),  # type: ignore[arg-type]
    (
        lambda: hpb.AttachVolumeRequest(
            domain="vm1",
            connection_info=pb.ConnectionInfo(
                volume_id="v", local=pb.LocalConnection(path="/dev/../etc/shadow")
            ),
        ),
        "connection_info.local.path",
    ),
    (lambda: hpb.AttachVolumeRequest(domain="vm1", volume_id="x" * 10**6), "volume_id"),
    (lambda: hpb.AttachVolumeRequest(domain="vm1", volume_id="../x"), "volume_id"),
    (
        lambda: hpb.AttachVolumeRequest(
            domain="vm1", volume_id="v", disk=pb.DiskOptions(iotune=pb.IoTune(group_name="<x>"))
        ),
        "disk.iotune.group_name",
    ),
    (lambda: hpb.DetachVolumeRequest(domain="d" * 10**6, volume_id="v"), "domain"),
    (lambda: hpb.DetachVolumeRequest(domain="vm1", volume_id="v" * 10**6), "volume_id"),
]


@pytest.mark.parametrize(
    ("domain", "volume_id"),
    [
        ("vm1/x", "vol-1"),
        ("d" * 300, "vol-1"),
        ("vm1\x00", "vol-1"),
        ("", "vol-1"),
        ("vm1", "../x"),
        ("vm1", "a b"),
    ],
)
def test_a_direct_call_is_refused_as_the_rpc_is(rig: Rig, domain: str, volume_id: str) -> None:
    """An embedder calling HostAgent directly gets the InvalidArgument a gRPC caller gets."""
    agent = rig.fakes.agent
    for rpc, request, direct in (
        (
            rig.stub.AttachVolume,
            hpb.AttachVolumeRequest(domain=domain, volume_id=volume_id),
            lambda: agent.attach(domain, volume_id=volume_id),
        ),
        (
            rig.stub.DetachVolume,
            hpb.DetachVolumeRequest(domain=domain, volume_id=volume_id),
            lambda: agent.detach(domain, volume_id),
        ),
    ):
        _, err = call(rpc, request)
        with pytest.raises(InvalidArgument) as refused:
            direct()
        assert err is not None
        assert err.code() is C.INVALID_ARGUMENT
        assert err.details() == refused.value.message
        assert err.details().partition(":")[0] == refused.value.field in ("domain", "volume_id")
    check_commands(rig)


@pytest.mark.parametrize(("make", "field"), KNOWN, ids=[k[1] for k in KNOWN])
def test_known_hostile_values_are_refused(rig: Rig, make: object, field: str) -> None:
    req = make()  # type: ignore[operator]
    rpc = rig.stub.DetachVolume if isinstance(req, hpb.DetachVolumeRequest) else rig.stub.AttachVolume
    _, err = call(rpc, req)
    try:
        assert err is not None, "accepted"
        check_status(err, {C.INVALID_ARGUMENT}, (field,))
        assert err.details().partition(":")[0] == field
        check_commands(rig)
    finally:
        _detach_all(rig)
