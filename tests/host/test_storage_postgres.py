"""Host tier: two real `blockwire-storage` daemons on one PostgreSQL catalog ([catalog] kind =
"postgresql"), one file backend directory and one tgtd, taking concurrent calls on the same volume:
exactly one wins, nothing is exported twice, the loser gets a clear status; a volume locked by another
process is ABORTED naming it; the PostgreSQL server restarted mid-run: calls fail with UNAVAILABLE
naming it, then succeed again, nothing lost."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from storagesvc.catalog.postgres import PostgresCatalog
from tests.host.daemons import Tgtd
from tests.postgres import PostgresServer
from tests.rig import Daemon

MIB = 1 << 20


def storage_config(tmp: Path, node: str, prefix: str, tgtd: Tgtd, dsn: str, password_file: str) -> Path:
    """A node's config: its own socket, the shared catalog, volume directory and tgtd."""
    (tmp / node).mkdir(parents=True, exist_ok=True)
    config = tmp / node / "storage.toml"
    portals = ", ".join(f'"{p}"' for p in tgtd.portals)
    config.write_text(
        f"""
[server]
unix_socket = "{tmp}/{node}/storage.sock"
log_format = "kv"
log_level = "DEBUG"

[service]
catalog_path = "{tmp}/{node}/unused.db"
iqn_prefix = "{prefix}"
lock_timeout = 5.0
export_check_interval = 0.0

[catalog]
kind = "postgresql"
dsn = "{dsn}"
password_file = "{password_file}"
connect_timeout = 2.0

[[backends]]
name = "file"
kind = "file"
path = "{tmp}/volumes"
exporter = "tgt"

[exporters.tgt]
control_port = {tgtd.control_port}
portals = [{portals}]
"""
    )
    return config


def targets(tgtd: Tgtd) -> list[tuple[int, str]]:
    out = tgtd.adm("--op", "show", "--mode", "target").stdout
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^Target (\d+): (\S+)$", out, re.M)]


@dataclass
class Nodes:
    server: PostgresServer
    dsn: str
    prefix: str
    tgtd: Tgtd
    daemons: tuple[Daemon, Daemon]
    volumes: Path  # the file backend's directory, shared

    def stub(self, i: int) -> storage_pb2_grpc.StorageServiceStub:
        return storage_pb2_grpc.StorageServiceStub(self.daemons[i].channel)

    def targets_of(self, volume_id: str) -> list[str]:
        return [iqn for _, iqn in targets(self.tgtd) if iqn.startswith(self.prefix) and volume_id in iqn]


@pytest.fixture
def nodes(postgres_server: PostgresServer, postgres_dsn: str, tgtd: Tgtd, tmp_path: Path) -> Iterator[Nodes]:
    prefix = f"iqn.2026-01.io.blockwire.pg{uuid.uuid4().hex[:10]}"
    daemons = tuple(
        Daemon.storage(
            storage_config(tmp_path, node, prefix, tgtd, postgres_dsn, postgres_server.password_file),
            tmp_path / node / "storage.sock",
            start_timeout=30,
            health_service="blockwire.v1.StorageService",
        )
        for node in ("n1", "n2")
    )
    started: list[Daemon] = []
    try:
        for d in daemons:
            started.append(d.start())
        yield Nodes(
            postgres_server, postgres_dsn, prefix, tgtd, (daemons[0], daemons[1]), tmp_path / "volumes"
        )
    finally:
        for d in started:
            d.stop()
        for tid, iqn in targets(tgtd):  # leave tgtd as we found it
            if iqn.startswith(prefix):
                tgtd.adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force", check=False)
                volume_id = iqn.rpartition(":")[2]
                for user in (f"in-{volume_id[:24]}", f"out-{volume_id[:24]}"):
                    tgtd.adm("--op", "delete", "--mode", "account", "--user", user, check=False)


def connector(host: str) -> pb.Connector:
    return pb.Connector(
        host=host,
        initiator_iqn=f"iqn.2026-01.io.blockwire.test:{host}",
        ips=["127.0.0.1"],
        transports=[pb.TRANSPORT_ISCSI],
    )


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Runs the calls at once (a barrier), each in its thread; each one's result or RpcError's code."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait(10)
        try:
            results[i] = calls[i]()
        except grpc.RpcError as exc:
            results[i] = (exc.code(), exc.details())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def create(nodes: Nodes, name: str, **kw: Any) -> pb.Volume:
    req = spb.CreateVolumeRequest(name=name, size_bytes=16 * MIB, **kw)
    return nodes.stub(0).CreateVolume(req, timeout=30).volume


def attach_call(nodes: Nodes, i: int, volume_id: str, host: str) -> Callable[[], pb.Attachment]:
    req = spb.CreateAttachmentRequest(volume_id=volume_id, connector=connector(host))
    return lambda: nodes.stub(i).CreateAttachment(req, timeout=30).attachment


def test_two_nodes_attaching_one_volume_exactly_one_wins_one_export(nodes: Nodes) -> None:
    for round_ in range(4):
        vol = create(nodes, f"race-{round_}")
        a, b = race(attach_call(nodes, 0, vol.id, "host-a"), attach_call(nodes, 1, vol.id, "host-b"))
        won = [r for r in (a, b) if isinstance(r, pb.Attachment)]
        lost = [r for r in (a, b) if not isinstance(r, pb.Attachment)]
        assert len(won) == 1, (a, b)
        assert len(lost) == 1
        code, details = lost[0]
        assert code == grpc.StatusCode.FAILED_PRECONDITION, lost
        assert vol.id in details
        assert "detach it there first" in details
        assert len(nodes.targets_of(vol.id)) == 1  # exported once
        listed = nodes.stub(1).ListAttachments(spb.ListAttachmentsRequest(volume_id=vol.id), timeout=30)
        assert [x.id for x in listed.attachments] == [won[0].id]


def test_two_nodes_creating_one_name_at_once_one_volume(nodes: Nodes) -> None:
    """A repeat (same parameters) through another node gets the same volume; other parameters get
    ALREADY_EXISTS; one file on the backend either way."""
    for round_ in range(4):
        same = spb.CreateVolumeRequest(name=f"name-{round_}", size_bytes=16 * MIB)
        a, b = race(
            lambda same=same: nodes.stub(0).CreateVolume(same, timeout=30).volume,
            lambda same=same: nodes.stub(1).CreateVolume(same, timeout=30).volume,
        )
        assert isinstance(a, pb.Volume), a
        assert isinstance(b, pb.Volume), b
        assert a.id == b.id
        other = spb.CreateVolumeRequest(name=f"other-{round_}", size_bytes=32 * MIB)
        c, d = race(
            lambda other=other: nodes.stub(0).CreateVolume(same_as(other, 16 * MIB), timeout=30).volume,
            lambda other=other: nodes.stub(1).CreateVolume(other, timeout=30).volume,
        )
        won = [r for r in (c, d) if isinstance(r, pb.Volume)]
        lost = [r for r in (c, d) if not isinstance(r, pb.Volume)]
        assert len(won) == 1, (c, d)
        assert lost[0][0] == grpc.StatusCode.ALREADY_EXISTS, lost
    listed = nodes.stub(0).ListVolumes(spb.ListVolumesRequest(), timeout=30).volumes
    assert len(listed) == 8
    files = sorted(p.name for p in (nodes.volumes / "volumes").iterdir())
    assert len(files) == 8, files


def test_two_nodes_snapshotting_one_name_at_once_one_snapshot(nodes: Nodes) -> None:
    vol = create(nodes, "snapped")
    for round_ in range(4):
        req = spb.CreateSnapshotRequest(volume_id=vol.id, name=f"snap-{round_}")
        a, b = race(
            lambda req=req: nodes.stub(0).CreateSnapshot(req, timeout=30).snapshot,
            lambda req=req: nodes.stub(1).CreateSnapshot(req, timeout=30).snapshot,
        )
        assert isinstance(a, pb.Snapshot), a
        assert isinstance(b, pb.Snapshot), b
        assert a.id == b.id
    listed = nodes.stub(1).ListSnapshots(spb.ListSnapshotsRequest(volume_id=vol.id), timeout=30)
    assert len(listed.snapshots) == 4
    assert len(list((nodes.volumes / "snapshots").iterdir())) == 4


def same_as(req: spb.CreateVolumeRequest, size: int) -> spb.CreateVolumeRequest:
    return spb.CreateVolumeRequest(name=req.name, size_bytes=size)


def test_two_nodes_attaching_a_multiattach_volume_share_one_export(nodes: Nodes) -> None:
    for round_ in range(3):
        vol = create(nodes, f"multi-{round_}", multiattach=True)
        a, b = race(attach_call(nodes, 0, vol.id, "host-a"), attach_call(nodes, 1, vol.id, "host-b"))
        assert isinstance(a, pb.Attachment), a
        assert isinstance(b, pb.Attachment), b
        assert a.id != b.id
        assert len(nodes.targets_of(vol.id)) == 1  # one export, reference counted
        iqns = {p.target_iqn for p in a.connection_info.iscsi.paths} | {
            p.target_iqn for p in b.connection_info.iscsi.paths
        }
        assert len(iqns) == 1


def test_delete_racing_an_attach_on_another_node_one_wins_consistently(nodes: Nodes) -> None:
    outcomes = set()
    for round_ in range(4):
        vol = create(nodes, f"del-{round_}")
        delete = spb.DeleteVolumeRequest(volume_id=vol.id)
        att, deleted = race(
            attach_call(nodes, 0, vol.id, "host-a"),
            lambda delete=delete: nodes.stub(1).DeleteVolume(delete, timeout=30),
        )
        got = nodes.stub(1).ListVolumes(spb.ListVolumesRequest(), timeout=30)
        present = vol.id in {v.id for v in got.volumes}
        if isinstance(att, pb.Attachment):  # the attach went first: the delete is refused
            outcomes.add("attach")
            assert deleted[0] == grpc.StatusCode.FAILED_PRECONDITION, deleted
            assert present
            assert len(nodes.targets_of(vol.id)) == 1
        else:  # the delete went first: the attach finds no volume
            outcomes.add("delete")
            assert att[0] == grpc.StatusCode.NOT_FOUND, att
            assert vol.id in att[1]
            assert not present
            assert nodes.targets_of(vol.id) == []
    assert outcomes  # (which one wins is the scheduler's; each round is consistent)


def test_a_volume_locked_by_another_process_is_aborted_naming_it(
    nodes: Nodes, postgres_server: PostgresServer
) -> None:
    vol = create(nodes, "locked")
    other = PostgresCatalog(nodes.dsn, password_file=postgres_server.password_file)
    try:
        with other.hold(f"volume {vol.id}", 5):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                nodes.stub(1).ExtendVolume(
                    spb.ExtendVolumeRequest(volume_id=vol.id, new_size_bytes=32 * MIB), timeout=30
                )
            assert info.value.code() == grpc.StatusCode.ABORTED
            assert vol.id in (info.value.details() or "")
            assert 4 < time.monotonic() - t0 < 20  # the daemon's lock_timeout (5 s)
        # released: the same call goes through
        nodes.stub(1).ExtendVolume(
            spb.ExtendVolumeRequest(volume_id=vol.id, new_size_bytes=32 * MIB), timeout=30
        )
    finally:
        other.close()
    got = nodes.stub(0).GetVolume(spb.GetVolumeRequest(volume_id=vol.id), timeout=30).volume
    assert got.size_bytes == 32 * MIB


def test_the_catalog_server_restarted_mid_run_unavailable_then_nothing_lost(nodes: Nodes) -> None:
    vols = [create(nodes, f"keep-{i}") for i in range(3)]
    atts = [attach_call(nodes, i % 2, v.id, f"host-{i}")() for i, v in enumerate(vols)]
    where = f"127.0.0.1:{nodes.server.port}"
    nodes.server.stop_server()
    try:
        for i, call in enumerate(
            (
                lambda: nodes.stub(0).GetVolume(spb.GetVolumeRequest(volume_id=vols[0].id), timeout=30),
                lambda: nodes.stub(1).CreateVolume(
                    spb.CreateVolumeRequest(name="during", size_bytes=16 * MIB), timeout=30
                ),
                lambda: nodes.stub(0).DeleteAttachment(
                    spb.DeleteAttachmentRequest(attachment_id=atts[0].id), timeout=30
                ),
            )
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (i, info.value.details())
            assert where in (info.value.details() or ""), info.value.details()
    finally:
        nodes.server.start_server()
    deadline = time.monotonic() + 30
    while True:  # the pools reconnect (with backoff): bounded
        try:
            listed = nodes.stub(1).ListVolumes(spb.ListVolumesRequest(), timeout=30)
            break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            assert time.monotonic() < deadline, "the daemon did not reconnect to PostgreSQL within 30 s"
    assert {v.name for v in listed.volumes} == {"keep-0", "keep-1", "keep-2"}
    for i, (v, a) in enumerate(zip(vols, atts, strict=True)):
        got = nodes.stub(i % 2).ListAttachments(spb.ListAttachmentsRequest(volume_id=v.id), timeout=30)
        assert [x.id for x in got.attachments] == [a.id]
        assert len(nodes.targets_of(v.id)) == 1
    # and everything works again, on both nodes
    for i, (v, a) in enumerate(zip(vols, atts, strict=True)):
        nodes.stub(1 - i % 2).DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a.id), timeout=30)
        nodes.stub(i % 2).DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=30)
        assert nodes.targets_of(v.id) == []
    assert nodes.stub(0).ListVolumes(spb.ListVolumesRequest(), timeout=30).volumes == []
    # the catalog's password is in no log line (an outage logs the pool's connection errors) or argv
    password = Path(nodes.server.password_file).read_text().strip()
    logs = [d.log.read_text() for d in nodes.daemons]
    assert any(f"port {nodes.server.port} failed" in log for log in logs)  # the outage was logged ...
    assert not [log for log in logs if password in log]  # ... without the password
    for d in nodes.daemons:
        assert d.proc is not None
        assert password not in Path(f"/proc/{d.proc.pid}/cmdline").read_text()
