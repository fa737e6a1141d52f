"""Hostile input to every StorageService RPC, through the generated stub, against the real servicer and
service (file backend in a temporary directory, the real tgt exporter driving a FakeTgtd).

Each property: the answer is OK or INVALID_ARGUMENT naming the field (or NOT_FOUND / FAILED_PRECONDITION
/ ALREADY_EXISTS / RESOURCE_EXHAUSTED where the input is well-formed), never INTERNAL or UNKNOWN; status
messages stay short; and every tgtadm argv element that came from a request matches the validator's
pattern (nothing reaches a command line unvalidated).
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockwire.runtime.clock import SystemClock
from blockwire.runtime.executor import Executor
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.rpc.servicer import StorageServicer
from storagesvc.service import Pool, StorageService
from storagesvc.targets.tgt import TgtExporter
from tests.fakes.grpc_server import serve
from tests.fakes.hostile import (
    MIB,
    SAFE_ARG,
    STRICT_IQN,
    call,
    check_status,
    hostile_size,
    hostile_text,
    hostile_u32,
)
from tests.fakes.tgtd import FakeTgtd

C = grpc.StatusCode
IQN_PREFIX = "iqn.2026-01.io.blockwire.hostile"
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
LABEL_KEY = re.compile(r"[a-z0-9._/-]{1,63}")
HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")
GOOD_IQN = "iqn.2026-01.io.example:host-a"
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(repr=False)
class Rig:
    stub: storage_pb2_grpc.StorageServiceStub
    tgtd: FakeTgtd
    root: Path
    volume_id: str
    address: str


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("hostile-storage")
    tgtd = FakeTgtd()
    backend = FileBackend("file", root / "file", Executor(), poll_interval=0.05)
    exporter = TgtExporter(tgtd, ("127.0.0.1:3260", "127.0.0.2:3260"), control_port=9)
    catalog = SqliteCatalog(root / "catalog.db")
    jobs = ThreadPoolExecutor(max_workers=2)
    service = StorageService(
        catalog,
        {"file": Pool(backend, exporter, "tgt")},
        SystemClock(),
        jobs,
        iqn_prefix=IQN_PREFIX,
        lock_timeout=5.0,
    )
    service.reconcile()
    with serve(StorageServicer(service, watch_interval=0.05)) as running:
        channel = grpc.insecure_channel(
            running.address, options=[("grpc.max_receive_message_length", 8 * MIB)]
        )
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        vol = stub.CreateVolume(spb.CreateVolumeRequest(name="hostile-base", size_bytes=MIB), timeout=10)
        yield Rig(stub, tgtd, root, vol.volume.id, running.address)
        channel.close()
    jobs.shutdown(wait=True)
    catalog.close()


def check_argv(rig: Rig) -> None:
    """Every tgtadm argument the service built is one the validators allow; nothing else got through."""
    for argv in rig.tgtd.argvs:
        opts = dict(itertools.pairwise(argv))
        for flag, value in opts.items():
            if flag == "--initiator-name":
                assert STRICT_IQN.fullmatch(value), argv
            elif flag == "-T":
                assert value.startswith(IQN_PREFIX + ":"), argv
                assert STRICT_IQN.fullmatch(value), argv
            elif flag == "-b":
                assert value.startswith(str(rig.root)), argv
                assert ".." not in value, argv
            elif flag == "--password":
                assert value.isalnum(), "CHAP secrets are generated alphanumerics"
        for a in argv:
            assert "\x00" not in a
            assert "\n" not in a
            assert a in ("--password",) or SAFE_ARG.fullmatch(a) or a.isalnum(), argv


ids = st.one_of(hostile_text, st.just(uuid.uuid4().hex))
labels = st.dictionaries(hostile_text, hostile_text, max_size=3)


@SETTINGS
@given(
    name=st.one_of(hostile_text, st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z")),
    size=hostile_size,
    backend=st.one_of(st.just(""), st.just("file"), hostile_text),
    labels=labels,
    source=st.sampled_from(["none", "snapshot", "volume", "image"]),
    source_value=hostile_text,
    fmt=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_create_volume(
    rig: Rig,
    name: str,
    size: int,
    backend: str,
    labels: dict[str, str],
    source: str,
    source_value: str,
    fmt: int,
) -> None:
    req = spb.CreateVolumeRequest(name=name, size_bytes=size, backend=backend, labels=labels)
    if source == "snapshot":
        req.source_snapshot_id = source_value
    elif source == "volume":
        req.source_volume_id = source_value
    elif source == "image":
        req.source_image.path = source_value
        req.source_image.format = fmt  # type: ignore[assignment]
    resp, err = call(rig.stub.CreateVolume, req)
    check_status(
        err,
        {
            C.OK,
            C.INVALID_ARGUMENT,
            C.NOT_FOUND,
            C.ALREADY_EXISTS,
            C.RESOURCE_EXHAUSTED,
            C.FAILED_PRECONDITION,
        },
        ("name", "size_bytes", "backend", "labels", "source_snapshot_id", "source_volume_id", "source_image"),
    )
    if err is None:
        assert isinstance(resp, spb.CreateVolumeResponse)
        v = resp.volume
        assert NAME.fullmatch(v.name), v.name[:100]
        assert all(LABEL_KEY.fullmatch(k) and val.isprintable() for k, val in v.labels.items())
        if source == "none":
            rig.stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=10)
    check_argv(rig)


@SETTINGS
@given(volume_id=ids, rpc=st.sampled_from(["GetVolume", "DeleteVolume", "WatchVolume"]))
def test_volume_by_id(rig: Rig, volume_id: str, rpc: str) -> None:
    if rpc == "WatchVolume":
        try:
            for _ in rig.stub.WatchVolume(spb.WatchVolumeRequest(volume_id=volume_id), timeout=5):
                pass
            err = None
        except grpc.RpcError as e:
            err = e
    else:
        req = getattr(spb, f"{rpc}Request")(volume_id=volume_id)
        _, err = call(getattr(rig.stub, rpc), req)
    check_status(err, {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND}, ("volume_id",))


@SETTINGS
@given(volume_id=st.one_of(ids, st.just("base")), size=hostile_size)
def test_extend_volume(rig: Rig, volume_id: str, size: int) -> None:
    vid = rig.volume_id if volume_id == "base" else volume_id
    _, err = call(rig.stub.ExtendVolume, spb.ExtendVolumeRequest(volume_id=vid, new_size_bytes=size))
    check_status(
        err,
        {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
        ("volume_id", "new_size_bytes"),
    )


@SETTINGS
@given(
    page_size=hostile_u32,
    page_token=st.one_of(hostile_text, st.binary(max_size=60).map(lambda b: b.hex())),
    selector=labels,
    volume_id=hostile_text,
    host=hostile_text,
    which=st.sampled_from(["volumes", "snapshots", "attachments"]),
)
def test_listings(
    rig: Rig, page_size: int, page_token: str, selector: dict[str, str], volume_id: str, host: str, which: str
) -> None:
    if which == "volumes":
        req: object = spb.ListVolumesRequest(
            page_size=page_size, page_token=page_token, label_selector=selector
        )
        _, err = call(rig.stub.ListVolumes, req)
    elif which == "snapshots":
        req = spb.ListSnapshotsRequest(volume_id=volume_id, page_size=page_size, page_token=page_token)
        _, err = call(rig.stub.ListSnapshots, req)
    else:
        req = spb.ListAttachmentsRequest(
            volume_id=volume_id, host=host, page_size=page_size, page_token=page_token
        )
        _, err = call(rig.stub.ListAttachments, req)
    check_status(
        err, {C.OK, C.INVALID_ARGUMENT}, ("page_size", "page_token", "label_selector", "volume_id", "host")
    )


@SETTINGS
@given(volume_id=st.one_of(ids, st.just("base")), name=hostile_text, labels=labels)
def test_snapshots(rig: Rig, volume_id: str, name: str, labels: dict[str, str]) -> None:
    vid = rig.volume_id if volume_id == "base" else volume_id
    resp, err = call(
        rig.stub.CreateSnapshot, spb.CreateSnapshotRequest(volume_id=vid, name=name, labels=labels)
    )
    check_status(
        err,
        {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
        ("volume_id", "name", "labels"),
    )
    sid = resp.snapshot.id if isinstance(resp, spb.CreateSnapshotResponse) else name
    for rpc in ("GetSnapshot", "DeleteSnapshot"):
        _, err = call(getattr(rig.stub, rpc), getattr(spb, f"{rpc}Request")(snapshot_id=sid))
        check_status(err, {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND}, ("snapshot_id",))


connectors = st.builds(
    pb.Connector,
    host=st.one_of(st.just("host-a"), hostile_text),
    ips=st.lists(hostile_text, max_size=2),
    initiator_iqn=st.one_of(st.just(GOOD_IQN), hostile_text),
    wwpns=st.lists(hostile_text, max_size=2),
    wwnns=st.lists(hostile_text, max_size=1),
    nvme_host_nqn=hostile_text,
    nvme_host_id=hostile_text,
    transports=st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=3),
    platform=hostile_text,
)


@SETTINGS
@given(
    connector=st.one_of(st.none(), connectors),
    volume_id=st.one_of(ids, st.just("base")),
    mode=st.integers(min_value=0, max_value=2**31 - 1),
    transport=st.integers(min_value=0, max_value=2**31 - 1),
    domain=hostile_text,
    target_dev=hostile_text,
    host_device=hostile_text,
)
def test_attachments(
    rig: Rig,
    connector: pb.Connector | None,
    volume_id: str,
    mode: int,
    transport: int,
    domain: str,
    target_dev: str,
    host_device: str,
) -> None:
    vid = rig.volume_id if volume_id == "base" else volume_id
    req = spb.CreateAttachmentRequest(volume_id=vid, access_mode=mode, transport=transport, domain=domain)  # type: ignore[arg-type]
    if connector is not None:
        req.connector.CopyFrom(connector)
    resp, err = call(rig.stub.CreateAttachment, req)
    check_status(
        err,
        {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION},
        ("volume_id", "connector", "access_mode", "transport", "domain"),
    )
    check_argv(rig)
    if isinstance(resp, spb.CreateAttachmentResponse):
        c = resp.attachment.connector
        assert STRICT_IQN.fullmatch(c.initiator_iqn), c
        assert HOST.fullmatch(c.host), c
        assert resp.attachment.domain.isprintable()
        assert len(resp.attachment.domain) <= 255
    aid = resp.attachment.id if isinstance(resp, spb.CreateAttachmentResponse) else volume_id
    complete = spb.CompleteAttachmentRequest(
        attachment_id=aid, target_dev=target_dev, host_device=host_device
    )
    _, err = call(rig.stub.CompleteAttachment, complete)
    check_status(
        err,
        {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION},
        ("attachment_id", "target_dev", "host_device"),
    )
    for rpc in ("GetAttachment", "DeleteAttachment"):
        _, err = call(getattr(rig.stub, rpc), getattr(spb, f"{rpc}Request")(attachment_id=aid))
        check_status(err, {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND}, ("attachment_id",))
    if err is None and isinstance(resp, spb.CreateAttachmentResponse):
        assert (
            rig.stub.ListAttachments(spb.ListAttachmentsRequest(volume_id=vid), timeout=10).attachments == []
        )
    check_argv(rig)


@SETTINGS
@given(backend=st.one_of(hostile_text, st.just("file")))
def test_capacity_and_stats(rig: Rig, backend: str) -> None:
    _, err = call(rig.stub.GetCapacity, spb.GetCapacityRequest(backend=backend))
    check_status(err, {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND}, ("backend",))
    _, err = call(rig.stub.GetBackendStats, spb.GetBackendStatsRequest())
    check_status(err, {C.OK}, ())


def test_surrogates_cannot_be_sent() -> None:
    """Lone surrogates are not UTF-8: protobuf refuses them on the client, so no server ever sees one."""
    with pytest.raises((ValueError, UnicodeError)):
        spb.CreateVolumeRequest(name="a\ud800b").SerializeToString()


def test_unknown_fields_and_truncated_messages_are_refused_cleanly(rig: Rig) -> None:
    """Raw bytes that are not a CreateVolumeRequest: the server answers, and nothing is INTERNAL."""
    channel = grpc.insecure_channel(rig.address)
    raw = channel.unary_unary(
        "/blockwire.v1.StorageService/CreateVolume",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    for payload in (
        b"\x0a\xff\xff\xff\xff\x0f",
        b"\x0a\x05ab",
        b"\xff" * 16,
        b"\x12\x00" * 100,
        b"\x0a\x02\xc3\x28",
    ):
        try:
            raw(payload, timeout=5)
            code = C.OK
        except grpc.RpcError as err:
            code = err.code()
        assert code not in (C.UNKNOWN,), payload
    channel.close()


def _create_attachment(rig: Rig, **connector: object) -> spb.CreateAttachmentRequest:
    c = pb.Connector(host="host-a", initiator_iqn=GOOD_IQN)
    for k, v in connector.items():
        setattr(c, k, v) if not isinstance(v, list) else getattr(c, k).extend(v)
    return spb.CreateAttachmentRequest(volume_id=rig.volume_id, connector=c)


KNOWN = [
    ("CreateVolume", lambda r: spb.CreateVolumeRequest(name="vol\n", size_bytes=MIB), "name"),
    (
        "CreateVolume",
        lambda r: spb.CreateVolumeRequest(name="v", size_bytes=MIB, labels={"a\n": "b"}),
        "labels",
    ),
    (
        "CreateVolume",
        lambda r: spb.CreateVolumeRequest(name="v", size_bytes=MIB, labels={"a": "\x00"}),
        "labels",
    ),
    (
        "CreateVolume",
        lambda r: spb.CreateVolumeRequest(name="v", size_bytes=MIB, backend="A" * 10**6),
        "backend",
    ),
    (
        "CreateVolume",
        lambda r: spb.CreateVolumeRequest(name="v", source_image=pb.ImageSource(path="/srv/../etc/shadow")),
        "source_image.path",
    ),
    (
        "CreateVolume",
        lambda r: spb.CreateVolumeRequest(name="v", source_image=pb.ImageSource(path="/srv/a\x00b")),
        "source_image.path",
    ),
    (
        "CreateAttachment",
        lambda r: _create_attachment(r, initiator_iqn="iqn.2026-01.io.example\n"),
        "connector",
    ),
    ("CreateAttachment", lambda r: _create_attachment(r, initiator_iqn="iqn.2026-01.io.x:a;id"), "connector"),
    ("CreateAttachment", lambda r: _create_attachment(r, initiator_iqn="iqn.2026-01.io.x:`id`"), "connector"),
    (
        "CreateAttachment",
        lambda r: _create_attachment(r, initiator_iqn="iqn.2026-01.io.x:$(id)"),
        "connector",
    ),
    (
        "CreateAttachment",
        lambda r: _create_attachment(r, initiator_iqn="eui.0123456789abcdef\n"),
        "connector",
    ),
    ("CreateAttachment", lambda r: _create_attachment(r, host="<host>&'\""), "connector"),
    ("CreateAttachment", lambda r: _create_attachment(r, host="a;b|c"), "connector"),
    ("CreateAttachment", lambda r: _create_attachment(r, ips=["1.2.3.4;id"]), "connector"),
    ("CreateAttachment", lambda r: _create_attachment(r, platform="x" * 10**6), "connector"),
    (
        "CreateAttachment",
        lambda r: spb.CreateAttachmentRequest(
            volume_id=r.volume_id,
            connector=pb.Connector(host="h", initiator_iqn=GOOD_IQN),
            domain="d" * 10**6,
        ),
        "domain",
    ),
    (
        "CompleteAttachment",
        lambda r: spb.CompleteAttachmentRequest(attachment_id="x", target_dev="a\nb"),
        "target_dev",
    ),
    ("ListVolumes", lambda r: spb.ListVolumesRequest(label_selector={"A": "b"}), "label_selector"),
    ("ListAttachments", lambda r: spb.ListAttachmentsRequest(host="a b"), "host"),
    ("ListSnapshots", lambda r: spb.ListSnapshotsRequest(volume_id="v" * 10**6), "volume_id"),
    ("GetCapacity", lambda r: spb.GetCapacityRequest(backend="b" * 10**6), "backend"),
]


@pytest.mark.parametrize(("rpc", "make", "field"), KNOWN, ids=[f"{k[0]}-{i}" for i, k in enumerate(KNOWN)])
def test_known_hostile_values_are_refused(rig: Rig, rpc: str, make: object, field: str) -> None:
    _, err = call(getattr(rig.stub, rpc), make(rig))  # type: ignore[operator]
    assert err is not None, f"{rpc} accepted it"
    check_status(err, {C.INVALID_ARGUMENT}, (field,))
    check_argv(rig)
