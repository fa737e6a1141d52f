"""StorageService on a file backend in tmp_path, a FakeExporter, inline jobs and a FakeClock."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blockwire.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from blockwire.model import AccessMode, Connector, IscsiConnection
from blockwire.runtime.executor import Executor
from blockwire.runtime.failpoints import Failpoints
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.model import (
    Attachment,
    AttachmentState,
    CreateVolumeSpec,
    ImageSource,
    Volume,
    VolumeSource,
    VolumeState,
)
from storagesvc.service import Pool, StorageService
from storagesvc.stats import percentile
from storagesvc.targets.base import TargetSpec
from tests.fakes.clock import FakeClock
from tests.fakes.exporter import FakeExporter
from tests.fakes.jobs import InlineJobs

MIB = 1 << 20
PREFIX = "iqn.2026-01.io.blockwire.unit"
HOST_A = Connector(host="a", initiator_iqn="iqn.2026-01.io.example:a")
HOST_B = Connector(host="b", initiator_iqn="iqn.2026-01.io.example:b")


class Rig:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.backend = FileBackend("file", root / "file", Executor(), poll_interval=0.01)
        self.exporter = FakeExporter()
        self.catalog = SqliteCatalog(root / "c.db")
        self.clock = FakeClock()
        self.service = StorageService(
            self.catalog,
            {"file": Pool(self.backend, self.exporter, "fake")},
            self.clock,
            InlineJobs(),
            iqn_prefix=PREFIX,
            lock_timeout=0.5,
            failpoints=Failpoints(),
        )

    def files(self) -> list[str]:
        return sorted(p.name for d in (self.backend.volumes, self.backend.snapshots) for p in d.iterdir())

    def volume(self, name: str = "v", size: int = 4 * MIB, **kw: object) -> str:
        return self.service.create_volume(CreateVolumeSpec(name=name, size_bytes=size, **kw)).id  # type: ignore[arg-type]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.catalog.close()


def test_create_is_idempotent_by_name_and_conflicts_on_other_parameters(rig: Rig) -> None:
    spec = CreateVolumeSpec(name="v", size_bytes=4 * MIB, labels={"a": "b"})
    v = rig.service.create_volume(spec)
    assert v.state is VolumeState.AVAILABLE
    assert rig.service.create_volume(spec).id == v.id
    assert (rig.backend.volumes / f"{v.id}.raw").stat().st_size == 4 * MIB
    with pytest.raises(AlreadyExists):
        rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=8 * MIB, labels={"a": "b"}))
    with pytest.raises(AlreadyExists):
        rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB))
    assert len(rig.files()) == 1


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (CreateVolumeSpec(name="", size_bytes=MIB), "name"),
        (CreateVolumeSpec(name="v", size_bytes=MIB + 1), "size_bytes"),
        (CreateVolumeSpec(name="v", size_bytes=0), "size_bytes"),
        (CreateVolumeSpec(name="v", size_bytes=MIB, backend="nope"), "backend"),
        (CreateVolumeSpec(name="v", size_bytes=MIB, labels={"BAD": ""}), "labels"),
        (
            CreateVolumeSpec(name="v", size_bytes=0, source=VolumeSource(image=ImageSource("rel.img"))),
            "source_image",
        ),
    ],
)
def test_invalid_create_names_the_field_and_leaves_nothing(
    rig: Rig, spec: CreateVolumeSpec, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        rig.service.create_volume(spec)
    assert err.value.field.startswith(field)
    assert rig.files() == []
    assert rig.catalog.list_volumes(after=None, limit=10) == []


def test_out_of_space_is_resource_exhausted_and_leaves_nothing(rig: Rig) -> None:
    with pytest.raises(ResourceExhausted):
        rig.volume(size=1 << 59)
    assert rig.files() == []
    assert rig.catalog.list_volumes(after=None, limit=10) == []


def test_unknown_ids(rig: Rig) -> None:
    with pytest.raises(NotFound):
        rig.service.get_volume("f" * 32)
    with pytest.raises(NotFound):
        rig.service.create_attachment("f" * 32, HOST_A, AccessMode.READ_WRITE)
    with pytest.raises(NotFound):
        rig.service.create_volume(CreateVolumeSpec("c", 0, source=VolumeSource(snapshot_id="f" * 32)))
    rig.service.delete_volume("f" * 32)  # deletes of what is gone succeed
    rig.service.delete_attachment("f" * 32)
    rig.service.delete_snapshot("f" * 32)


def test_connection_info_that_fails_the_agents_checks_is_never_announced(rig: Rig) -> None:
    """Storage runs blockwire.validate on what it announces: a portal the config could not hold (a host
    name) is a bug, INTERNAL, and the export it began is undone."""
    vid = rig.volume()
    rig.exporter.portals = ("storage.example:3260",)
    with pytest.raises(Internal, match=r"connection_info\.iscsi\.paths\[0\]\.portal"):
        rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    assert rig.catalog.list_attachments(volume_id=vid, after=None, limit=10) == []
    assert rig.exporter.targets == {}
    assert rig.service.get_volume(vid).state is VolumeState.AVAILABLE


def test_attach_life_cycle(rig: Rig) -> None:
    vid = rig.volume()
    a = rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    assert a.state is AttachmentState.ATTACHING
    v = rig.service.get_volume(vid)
    assert v.state is VolumeState.ATTACHING
    assert v.attachment_ids == (a.id,)
    info = a.connection_info
    assert info is not None
    assert isinstance(info.transport, IscsiConnection)
    assert info.wwn == v.wwn
    assert [p.portal for p in info.transport.paths] == list(rig.exporter.portals)
    target = rig.exporter.targets[f"{PREFIX}:{vid}"]
    assert target.initiators == {HOST_A.initiator_iqn}
    assert target.spec.wwn == v.wwn
    assert info.transport.chap is not None
    assert len(info.transport.chap.password.reveal()) == 16
    # a repeat returns the same attachment and connection info
    assert rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE) == a
    done = rig.service.complete_attachment(a.id, "sdb", "/dev/sdc")
    assert done.state is AttachmentState.ATTACHED
    assert rig.service.complete_attachment(a.id) == done
    assert rig.service.get_volume(vid).state is VolumeState.IN_USE
    with pytest.raises(FailedPrecondition):
        rig.service.delete_volume(vid)
    rig.service.delete_attachment(a.id)
    rig.service.delete_attachment(a.id)
    assert rig.exporter.targets == {}
    after = rig.service.get_volume(vid)
    assert after.state is VolumeState.AVAILABLE
    assert after.export is None
    with pytest.raises(NotFound):
        rig.service.complete_attachment(a.id)


def commits(rig: Rig, call: Callable[[], object]) -> int:
    """How many commits (fsyncs) the catalog's writer made during `call`: a transaction is one, a write
    outside one is one."""
    statements: list[str] = []
    rig.catalog._db.set_trace_callback(statements.append)
    try:
        call()
    finally:
        rig.catalog._db.set_trace_callback(None)
    n, inside = 0, False
    for statement in statements:
        head = statement.split(None, 1)[0].upper()
        if head == "BEGIN":
            inside = True
        elif head in ("COMMIT", "ROLLBACK"):
            inside, n = False, n + (head == "COMMIT")
        elif head in ("INSERT", "UPDATE", "DELETE") and not inside:
            n += 1
    return n


def test_each_phase_of_an_attachment_is_one_commit(rig: Rig) -> None:
    """CreateAttachment: RESERVED (before the target) and ATTACHING; CompleteAttachment: ATTACHED;
    DeleteAttachment: DETACHING (before the target goes) and the rows after."""
    vid = rig.volume()
    created: list[Attachment] = []
    assert (
        commits(
            rig, lambda: created.append(rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE))
        )
        == 2
    )
    assert commits(rig, lambda: rig.service.complete_attachment(created[0].id)) == 1
    assert commits(rig, lambda: rig.service.delete_attachment(created[0].id)) == 2
    # a failed export: the record (one commit) undone in one more, nothing left
    rig.exporter.fail_on.add("ensure_target")
    with pytest.raises(Unavailable):
        rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    assert rig.catalog.attachments_of(vid) == []
    assert rig.service.get_volume(vid).state is VolumeState.AVAILABLE
    assert rig.service.get_volume(vid).export is None


def test_conflicting_attachments(rig: Rig) -> None:
    vid = rig.volume()
    rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    with pytest.raises(FailedPrecondition, match="not created multiattach"):
        rig.service.create_attachment(vid, HOST_B, AccessMode.READ_WRITE)
    with pytest.raises(FailedPrecondition, match="already attached"):
        rig.service.create_attachment(vid, HOST_A, AccessMode.READ_ONLY)


def test_multiattach_shares_one_target_with_an_acl_entry_per_host(rig: Rig) -> None:
    vid = rig.volume(multiattach=True)
    a = rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    b = rig.service.create_attachment(vid, HOST_B, AccessMode.READ_WRITE)
    target = rig.exporter.targets[f"{PREFIX}:{vid}"]
    assert target.initiators == {HOST_A.initiator_iqn, HOST_B.initiator_iqn}
    rig.service.delete_attachment(a.id)
    assert target.initiators == {HOST_B.initiator_iqn}
    assert rig.service.get_volume(vid).state is VolumeState.ATTACHING
    rig.service.delete_attachment(b.id)
    assert rig.exporter.targets == {}


def test_a_second_domain_of_one_host_is_a_second_attachment_only_for_multiattach(rig: Rig) -> None:
    vid = rig.volume()
    a = rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE, "vm1")
    assert rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE, "vm1") == a
    with pytest.raises(FailedPrecondition, match=r"domain 'vm1' on host a .*not created multiattach"):
        rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE, "vm2")
    assert a.connection_info is not None
    assert not a.connection_info.multiattach


def test_multiattach_on_two_domains_of_one_host_keeps_the_export_until_the_last(rig: Rig) -> None:
    vid = rig.volume(multiattach=True)
    a = rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE, "vm1")
    b = rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE, "vm2")
    assert a.id != b.id
    assert b.connection_info is not None
    assert b.connection_info.multiattach
    target = rig.exporter.targets[f"{PREFIX}:{vid}"]
    rig.service.delete_attachment(a.id)
    assert target.initiators == {HOST_A.initiator_iqn}  # vm2 logs in with the same initiator
    assert rig.exporter.targets
    rig.service.delete_attachment(b.id)
    assert rig.exporter.targets == {}
    assert rig.service.get_volume(vid).state is VolumeState.AVAILABLE


@pytest.mark.parametrize("failing", ["ensure_target", "allow"])
def test_a_failed_export_leaves_no_target_no_acl_no_record(rig: Rig, failing: str) -> None:
    vid = rig.volume()
    rig.exporter.fail_on.add(failing)
    with pytest.raises(Unavailable):
        rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    assert rig.exporter.targets == {}
    v = rig.service.get_volume(vid)
    assert v.state is VolumeState.AVAILABLE
    assert v.export is None
    assert v.attachment_ids == ()
    # and the next try works
    assert (
        rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE).state is AttachmentState.ATTACHING
    )


def test_a_failed_teardown_stays_detaching_and_a_repeat_finishes_it(rig: Rig) -> None:
    vid = rig.volume()
    a = rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    rig.exporter.fail_on.add("remove_target")
    with pytest.raises(Unavailable):
        rig.service.delete_attachment(a.id)
    assert rig.service.get_attachment(a.id).state is AttachmentState.DETACHING
    rig.service.delete_attachment(a.id)
    assert rig.exporter.targets == {}
    assert rig.service.get_volume(vid).state is VolumeState.AVAILABLE


def test_paging_walks_everything_once(rig: Rig) -> None:
    ids = []
    for i in range(5):
        ids.append(rig.volume(name=f"v{i}"))
        rig.clock.advance(1)
    seen, token = [], ""
    for _ in range(10):
        page = rig.service.list_volumes(2, token, {})
        seen += [v.id for v in page.items]
        token = page.next_token
        if not token:
            break
    assert seen == ids
    with pytest.raises(InvalidArgument, match="page_token"):
        rig.service.list_volumes(2, "garbage", {})


def test_snapshot_clone_and_copy_carry_the_content(rig: Rig) -> None:
    vid = rig.volume()
    (rig.backend.volumes / f"{vid}.raw").write_bytes(b"hello" + bytes(4 * MIB - 5))
    snap = rig.service.create_snapshot(vid, "s", {})
    assert rig.service.create_snapshot(vid, "s", {}) == snap
    with pytest.raises(AlreadyExists):
        rig.service.create_snapshot(vid, "s", {"x": "y"})
    (rig.backend.volumes / f"{vid}.raw").write_bytes(b"later" + bytes(4 * MIB - 5))
    copy = rig.service.create_volume(CreateVolumeSpec("c", 8 * MIB, source=VolumeSource(snapshot_id=snap.id)))
    clone = rig.service.create_volume(CreateVolumeSpec("k", 0, source=VolumeSource(volume_id=vid)))
    assert rig.service.get_volume(copy.id).state is VolumeState.AVAILABLE
    assert (rig.backend.volumes / f"{copy.id}.raw").read_bytes()[:5] == b"hello"
    assert (rig.backend.volumes / f"{copy.id}.raw").stat().st_size == 8 * MIB
    assert (rig.backend.volumes / f"{clone.id}.raw").read_bytes()[:5] == b"later"
    assert clone.size_bytes == 4 * MIB
    with pytest.raises(InvalidArgument, match="size_bytes"):
        rig.service.create_volume(CreateVolumeSpec("small", MIB, source=VolumeSource(volume_id=vid)))
    rig.service.delete_volume(vid)  # file snapshots do not depend on their volume
    rig.service.delete_snapshot(snap.id)
    assert sorted(rig.files()) == sorted([f"{copy.id}.raw", f"{clone.id}.raw"])


def test_image_copy_reports_progress_and_ends_available(rig: Rig, tmp_path: Path) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(b"IMG!" * (MIB // 4) * 3)  # 3 MiB
    v = rig.service.create_volume(
        CreateVolumeSpec("i", 0, source=VolumeSource(image=ImageSource(str(image))))
    )
    got = rig.service.get_volume(v.id)
    assert got.state is VolumeState.AVAILABLE
    assert got.size_bytes == 3 * MIB
    assert got.progress.done_bytes == got.progress.total_bytes == 3 * MIB
    assert (rig.backend.volumes / f"{v.id}.raw").read_bytes()[:8] == b"IMG!IMG!"
    watched = list(rig.service.watch_volume(v.id))
    assert [w.state for w in watched] == [VolumeState.AVAILABLE]


def test_a_failed_copy_ends_in_error_without_a_file(rig: Rig, tmp_path: Path) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(bytes(MIB))
    rig.backend.runner = _FailingConvert(rig.backend.runner)
    v = rig.service.create_volume(
        CreateVolumeSpec("i", 0, source=VolumeSource(image=ImageSource(str(image))))
    )
    got = rig.service.get_volume(v.id)
    assert got.state is VolumeState.ERROR
    assert "convert" in got.error_message
    assert rig.files() == []
    rig.service.delete_volume(v.id)
    assert rig.catalog.get_volume(v.id) is None


class _FailingConvert:
    def __init__(self, inner: object) -> None:
        self.inner = inner

    def run(self, argv: list[object], **kw: object) -> object:
        from blockwire.runtime.executor import CommandFailed  # noqa: PLC0415

        if argv[:2] == ["qemu-img", "convert"]:
            raise CommandFailed(["qemu-img", "convert"], 1, "qemu-img: convert failed")
        return self.inner.run(argv, **kw)  # type: ignore[attr-defined]


def test_watch_streams_until_settled(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.service.jobs = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    inner = r.backend.clone

    def slow_clone(src: str, dst: str, size: int) -> None:
        release.wait(10)
        inner(src, dst, size)

    r.backend.clone = slow_clone  # type: ignore[method-assign]
    vid = r.volume()
    v = r.service.create_volume(CreateVolumeSpec("k", 0, source=VolumeSource(volume_id=vid)))
    stream = r.service.watch_volume(v.id, interval=0.05)
    assert next(stream).state is VolumeState.CREATING
    release.set()
    states = [w.state for w in stream]
    assert states[-1] is VolumeState.AVAILABLE
    r.service.jobs.shutdown(wait=True)
    r.catalog.close()


def test_extend_grows_the_file_and_the_export(rig: Rig) -> None:
    vid = rig.volume()
    rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    assert rig.service.extend_volume(vid, 8 * MIB).size_bytes == 8 * MIB
    assert rig.service.extend_volume(vid, 8 * MIB).size_bytes == 8 * MIB
    assert (rig.backend.volumes / f"{vid}.raw").stat().st_size == 8 * MIB
    assert "resize" in rig.exporter.calls
    with pytest.raises(FailedPrecondition):
        rig.service.extend_volume(vid, 4 * MIB)
    with pytest.raises(InvalidArgument, match="new_size_bytes"):
        rig.service.extend_volume(vid, 8 * MIB + 1)
    assert rig.service.get_volume(vid).state is VolumeState.ATTACHING


def test_calls_on_one_volume_are_serialized_and_others_run_in_parallel(rig: Rig) -> None:
    slow, fast = rig.volume("slow"), rig.volume("fast")
    entered, release = threading.Event(), threading.Event()
    inner = rig.exporter.ensure_target

    def blocking(spec: TargetSpec) -> None:
        if spec.volume_id == slow:
            entered.set()
            release.wait(10)
        inner(spec)

    rig.exporter.ensure_target = blocking  # type: ignore[method-assign]
    worker = threading.Thread(
        target=rig.service.create_attachment, args=(slow, HOST_A, AccessMode.READ_WRITE)
    )
    worker.start()
    assert entered.wait(10)
    # another volume proceeds while the slow one holds its lock ...
    assert (
        rig.service.create_attachment(fast, HOST_A, AccessMode.READ_WRITE).state is AttachmentState.ATTACHING
    )
    # ... the same volume waits, and gives up with ABORTED after lock_timeout
    from blockwire.errors import Aborted  # noqa: PLC0415

    with pytest.raises(Aborted):
        rig.service.create_attachment(slow, HOST_B, AccessMode.READ_WRITE)
    release.set()
    worker.join(10)
    assert rig.service.get_volume(slow).state is VolumeState.ATTACHING


def test_the_lock_map_keeps_nothing_after_calls_with_made_up_ids(rig: Rig) -> None:
    """Every call on a volume takes its lock: ids nobody issued (random, or of no volume) must not grow
    the map; nor may calls that wait, time out (ABORTED) or fail."""
    import uuid  # noqa: PLC0415

    from blockwire.errors import Aborted  # noqa: PLC0415

    real = rig.volume("real")
    for _ in range(200):
        made_up = uuid.uuid4().hex
        rig.service.delete_volume(made_up)  # gone: OK
        with pytest.raises(NotFound):
            rig.service.extend_volume(made_up, 8 * MIB)
        with pytest.raises(NotFound):
            rig.service.create_attachment(made_up, HOST_A, AccessMode.READ_WRITE)
        with pytest.raises(NotFound):
            rig.service.create_snapshot(made_up, f"s-{made_up[:8]}", {})
        with pytest.raises(AlreadyExists):
            rig.service.create_volume(CreateVolumeSpec(name="real", size_bytes=8 * MIB))
    # a holder, a waiter that gives up, and a waiter that gets the lock
    got = threading.Event()
    with rig.service.locks.hold(real, "test"):
        with pytest.raises(Aborted):
            rig.service.extend_volume(real, 8 * MIB)
        waiter = threading.Thread(target=lambda: (rig.service.extend_volume(real, 8 * MIB), got.set()))
        waiter.start()
    waiter.join(10)
    assert got.is_set()
    assert rig.service.get_volume(real).size_bytes == 8 * MIB
    assert rig.service.locks._locks == {}
    assert len(rig.service.locks) == 0


def test_reconcile_rebuilds_known_exports_and_removes_unknown_ones(rig: Rig) -> None:
    vid = rig.volume()
    a = rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    stray = rig.volume("stray")
    rig.exporter.targets.clear()  # the target daemon restarted
    rig.exporter.ensure_target(
        TargetSpec(stray, f"{PREFIX}:{'e' * 32}", "/x", "6" + "0" * 31, "0" * 20, readonly=False)
    )
    rig.exporter.ensure_target(TargetSpec(stray, "iqn.2026-01.io.someone.else:x", "/x", "6" * 32, "0", False))
    rig.service.reconcile()
    assert set(rig.exporter.targets) == {f"{PREFIX}:{vid}", "iqn.2026-01.io.someone.else:x"}
    assert rig.exporter.targets[f"{PREFIX}:{vid}"].initiators == {HOST_A.initiator_iqn}
    assert rig.exporter.started == 1
    assert rig.service.get_attachment(a.id).state is AttachmentState.ATTACHING


def test_reconcile_undoes_an_attachment_caught_half_way(rig: Rig) -> None:
    vid = rig.volume()
    a = rig.service.create_attachment(vid, HOST_A, AccessMode.READ_WRITE)
    from dataclasses import replace  # noqa: PLC0415

    rig.catalog.update_attachment(replace(a, state=AttachmentState.RESERVED))  # as a crash would leave it
    rig.service.reconcile()
    with pytest.raises(NotFound):
        rig.service.get_attachment(a.id)
    assert rig.exporter.targets == {}
    assert rig.service.get_volume(vid).state is VolumeState.AVAILABLE


def test_capacity_and_stats(rig: Rig) -> None:
    rig.volume(size=4 * MIB)
    (cap,) = rig.service.capacity()
    assert cap.provisioned_bytes == 4 * MIB
    assert 0 < cap.max_volume_bytes <= cap.free_bytes
    with pytest.raises(NotFound):
        rig.service.capacity("nope")
    backends, ops = rig.service.backend_stats()
    assert backends[0].volume_count == 1
    assert backends[0].portals == rig.exporter.portals
    assert {o.operation for o in ops} >= {"create_volume"}


def test_percentile() -> None:
    samples = sorted(float(i) for i in range(1, 101))
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 95) == 95.0
    assert percentile([], 50) == 0.0


def test_a_type_deleted_while_a_volume_of_it_is_created_never_leaves_a_volume_without_its_type(
    rig: Rig,
) -> None:
    """The two interleavings a second storage node can produce, played in one process: DeleteVolumeType
    between the create's type lookup and its record (the create fails and leaves nothing), and a create's
    record between the delete's count and its removal (the delete puts the type back and fails)."""
    svc, catalog = rig.service, rig.catalog
    vtype = svc.create_volume_type("gold", "", {})
    insert_volume = catalog.insert_volume

    def delete_type_meanwhile(volume: Volume) -> None:
        insert_volume(volume)
        catalog.delete_volume_type(vtype.id)  # another node's DeleteVolumeType, after its count

    catalog.insert_volume = delete_type_meanwhile  # type: ignore[method-assign]
    with pytest.raises(FailedPrecondition, match="volume type gold was deleted"):
        svc.create_volume(CreateVolumeSpec(name="v1", size_bytes=4 * MIB, volume_type="gold"))
    catalog.insert_volume = insert_volume  # type: ignore[method-assign]
    assert catalog.volume_by_name("v1") is None
    assert rig.files() == []

    vtype = svc.create_volume_type("gold", "", {})
    delete_volume_type = catalog.delete_volume_type

    def create_meanwhile(type_id: str) -> None:
        # another node's create recorded its volume after the delete counted none
        svc.create_volume(CreateVolumeSpec(name="v2", size_bytes=4 * MIB, volume_type="gold"))
        delete_volume_type(type_id)

    catalog.delete_volume_type = create_meanwhile  # type: ignore[method-assign]
    with pytest.raises(FailedPrecondition, match="used by 1 volume"):
        svc.delete_volume_type("gold")
    catalog.delete_volume_type = delete_volume_type  # type: ignore[method-assign]
    assert svc.get_volume_type("gold").id == vtype.id
    v2 = catalog.volume_by_name("v2")
    assert v2 is not None
    assert v2.volume_type == "gold"
