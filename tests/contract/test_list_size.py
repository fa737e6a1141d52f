"""List RPCs stay under gRPC's 4 MiB receive limit whatever the labels: a page is cut by encoded size
(`storagesvc.rpc.servicer.bounded`) and goes on with a page token, so a default ListVolumes over
volumes with the largest labels `blockwire.validate` accepts succeeds, and paging returns every volume
exactly once (before, the client got RESOURCE_EXHAUSTED, which reads as "out of space")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockwire import validate
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from storagesvc.model import Page
from storagesvc.rpc import convert
from storagesvc.rpc.servicer import MAX_PAGE_BYTES, bounded
from tests.contract.conftest import _serve
from tests.fakes.storage_rig import StorageRig

MIB = 1 << 20
GRPC_RECEIVE_LIMIT = 4 * MIB
WIDE = "\U0001d538"  # MATHEMATICAL DOUBLE-STRUCK CAPITAL A: printable, 4 bytes in UTF-8


def largest_labels(i: int) -> dict[str, str]:
    """As many labels as validate.labels takes, each key 63 characters, each value 255 four-byte ones."""
    labels = {f"{n:02d}-{i:06d}".ljust(63, "k"): WIDE * 255 for n in range(64)}
    assert validate.labels(labels) == labels
    return labels


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[StorageRig, Any]]:
    rig = StorageRig.make(tmp_path)
    try:
        for channel in _serve(storage_pb2_grpc.add_StorageServiceServicer_to_server, rig.servicer):
            yield rig, storage_pb2_grpc.StorageServiceStub(channel)
    finally:
        rig.close()


def test_list_volumes_with_the_largest_labels_pages_under_the_receive_limit(
    served: tuple[StorageRig, Any],
) -> None:
    _, stub = served
    count = validate.DEFAULT_PAGE  # one default page of these is ~7 MB
    created = set()
    for i in range(count):
        v = stub.CreateVolume(
            spb.CreateVolumeRequest(name=f"big-{i}", size_bytes=MIB, labels=largest_labels(i)), timeout=30
        ).volume
        created.add(v.id)
    one = stub.GetVolume(spb.GetVolumeRequest(volume_id=next(iter(created))), timeout=10).volume
    assert one.ByteSize() * count > GRPC_RECEIVE_LIMIT  # the default page would not fit

    first = stub.ListVolumes(spb.ListVolumesRequest(), timeout=30)  # default page size
    assert first.next_page_token
    assert 1 <= len(first.volumes) < count
    assert first.ByteSize() <= MAX_PAGE_BYTES + 1024

    for page_size in (0, validate.MAX_PAGE):
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = stub.ListVolumes(spb.ListVolumesRequest(page_size=page_size, page_token=token), timeout=30)
            assert page.ByteSize() < GRPC_RECEIVE_LIMIT
            assert page.volumes
            seen += [v.id for v in page.volumes]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(created)  # every volume exactly once
        assert pages >= 3
    # a label selector pages the same way
    selected = stub.ListVolumes(spb.ListVolumesRequest(label_selector=largest_labels(7)), timeout=30)
    assert [v.name for v in selected.volumes] == ["big-7"]
    assert not selected.next_page_token


def test_the_size_cut_keeps_at_least_one_item_and_its_token_goes_on(served: tuple[StorageRig, Any]) -> None:
    """The one cut every list RPC uses (volumes, snapshots, attachments), on labelled snapshots."""
    rig, stub = served
    vol = stub.CreateVolume(spb.CreateVolumeRequest(name="src", size_bytes=MIB), timeout=30).volume
    for i in range(3):
        stub.CreateSnapshot(
            spb.CreateSnapshotRequest(volume_id=vol.id, name=f"s{i}", labels=largest_labels(i)), timeout=30
        )
    page = rig.service.list_snapshots(vol.id, 0, "")
    assert len(page.items) == 3
    assert not page.next_token
    size = convert.snapshot_to_pb(page.items[0]).ByteSize()

    kept, token = bounded(page, convert.snapshot_to_pb, max_bytes=2 * size + 20)
    assert [m.name for m in kept] == ["s0", "s1"]
    rest = rig.service.list_snapshots(vol.id, 0, token)  # the token of a cut page goes on after it
    assert [s.name for s in rest.items] == ["s2"]
    kept, token = bounded(page, convert.snapshot_to_pb, max_bytes=1)  # never an empty page
    assert [m.name for m in kept] == ["s0"]
    assert [s.name for s in rig.service.list_snapshots(vol.id, 0, token).items] == ["s1", "s2"]
    kept, token = bounded(Page(page.items, "next"), convert.snapshot_to_pb)  # small pages are left alone
    assert (len(kept), token) == (3, "next")
    listed = stub.ListSnapshots(spb.ListSnapshotsRequest(volume_id=vol.id), timeout=30)
    assert [s.name for s in listed.snapshots] == ["s0", "s1", "s2"]
