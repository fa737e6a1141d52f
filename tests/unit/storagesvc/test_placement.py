"""The create flow's placement: explicit backend, default backend, the scheduler's ranking across file
backends in tmp_path, and rescheduling to the next backend when the chosen one fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.errors import FailedPrecondition, Unavailable
from blockwire.runtime.executor import Executor
from blockwire.runtime.failpoints import Failpoints
from storagesvc import placement
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.model import CreateVolumeSpec
from storagesvc.scheduler import SchedulerSettings
from storagesvc.service import Pool, StorageService
from tests.fakes.clock import FakeClock
from tests.fakes.exporter import FakeExporter
from tests.fakes.jobs import InlineJobs

MIB = 1 << 20


class BrokenBackend(FileBackend):
    """A file backend whose storage fails every create (after the catalog record was written)."""

    def create(self, volume_id: str, size_bytes: int) -> None:
        raise Unavailable(f"backend {self.name}: storage unreachable")


class Rig:
    def __init__(
        self, root: Path, broken: tuple[str, ...] = (), default_backend: str = "", **settings: object
    ) -> None:
        self.backends = {
            n: (BrokenBackend if n in broken else FileBackend)(n, root / n, Executor(), poll_interval=0.01)
            for n in ("a", "b", "c")
        }
        self.catalog = SqliteCatalog(root / "c.db")
        self.service = StorageService(
            self.catalog,
            {n: Pool(b, FakeExporter(), "fake") for n, b in self.backends.items()},
            FakeClock(),
            InlineJobs(),
            iqn_prefix="iqn.2026-01.io.blockwire.unit",
            default_backend=default_backend,
            lock_timeout=0.5,
            failpoints=Failpoints(),
            scheduler=SchedulerSettings(**settings),  # type: ignore[arg-type]
        )

    def create(self, name: str, size: int = 4 * MIB, **kw: object) -> str:
        return self.service.create_volume(CreateVolumeSpec(name=name, size_bytes=size, **kw)).backend  # type: ignore[arg-type]

    def files(self) -> dict[str, list[str]]:
        return {n: sorted(p.name for p in b.volumes.iterdir()) for n, b in self.backends.items()}


@pytest.fixture
def make(tmp_path: Path) -> Iterator[type[Rig]]:
    rigs: list[Rig] = []

    def build(**kw: object) -> Rig:
        rig = Rig(tmp_path / f"r{len(rigs)}", **kw)  # type: ignore[arg-type]
        rigs.append(rig)
        return rig

    yield build  # type: ignore[misc]
    for r in rigs:
        r.catalog.close()


def test_the_scheduler_spreads_volumes_that_name_no_backend(make: type[Rig]) -> None:
    rig = make()
    placed = [rig.create(f"v{i}") for i in range(6)]
    # equal room and count: by name; then the emptiest (thin: provisioned bytes) first
    assert placed == ["a", "b", "c", "a", "b", "c"]


def test_explicit_and_default_backend_are_kept(make: type[Rig]) -> None:
    rig = make(default_backend="c")
    assert [rig.create(f"v{i}") for i in range(3)] == ["c", "c", "c"]
    assert rig.create("x", backend="a") == "a"
    # a repeat that names no backend returns the volume wherever it is
    assert rig.create("x") == "a"


def test_capabilities_from_settings_steer_placement(make: type[Rig]) -> None:
    rig = make(capabilities={"b": {"disk_type": "ssd"}}, zones={"c": "az2"})
    state = placement.backend_state(rig.service.ctx, "b")
    assert state.capabilities["disk_type"] == "ssd"
    assert state.capabilities["transport"] == "iscsi"
    svc = rig.service
    svc.create_volume_type("ssd", "", {"disk_type": "ssd"})
    svc.create_volume_type("zoned", "", {"availability_zone": "az2"})
    svc.create_volume_type("nvme", "", {"disk_type": "nvme"})
    assert rig.create("ssd", volume_type="ssd") == "b"
    assert rig.create("zoned", volume_type="zoned") == "c"
    with pytest.raises(FailedPrecondition, match="without disk_type='nvme'"):
        rig.create("none", volume_type="nvme")
    assert rig.catalog.volume_by_name("none") is None
    # extra specs come from the type only: a caller's own are ignored
    assert rig.create("own", extra_specs={"disk_type": "nvme"}) == "a"


def test_the_default_volume_type_applies_when_none_is_named(make: type[Rig]) -> None:
    rig = make(default_volume_type="pinned")
    with pytest.raises(FailedPrecondition, match="default volume type pinned"):
        rig.create("v")
    rig.service.create_volume_type("pinned", "", {"volume_backend_name": "c"})
    assert rig.create("v") == "c"
    made = rig.catalog.volume_by_name("v")
    assert made is not None
    assert made.volume_type == "pinned"
    with pytest.raises(FailedPrecondition, match="is the default"):
        rig.service.delete_volume_type("pinned")


def test_a_failed_create_is_rescheduled_to_the_next_backend_and_leaves_nothing(make: type[Rig]) -> None:
    rig = make(broken=("a",))
    assert rig.create("v") == "b"
    assert rig.files()["a"] == []
    assert [v.name for v in rig.catalog.list_volumes(after=None, limit=10)] == ["v"]


def test_rescheduling_is_bounded_and_the_error_names_each_attempt(make: type[Rig]) -> None:
    rig = make(broken=("a", "b"), max_attempts=2)
    with pytest.raises(Unavailable) as err:
        rig.create("v")
    assert "attempt 1 on backend a: backend a: storage unreachable" in err.value.message
    assert "attempt 2 on backend b: backend b: storage unreachable" in err.value.message
    assert rig.catalog.volume_by_name("v") is None
    assert rig.files() == {"a": [], "b": [], "c": []}
    # with a third attempt, c takes it
    rig3 = make(broken=("a", "b"), max_attempts=3)
    assert rig3.create("v") == "c"


def test_an_explicit_backend_that_fails_is_not_rescheduled(make: type[Rig]) -> None:
    rig = make(broken=("a",))
    with pytest.raises(Unavailable, match=r"^backend a: storage unreachable$"):
        rig.create("v", backend="a")
    assert rig.catalog.volume_by_name("v") is None
