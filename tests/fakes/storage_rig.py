"""StorageRig: a real StorageService on a file backend in a directory, with a FakeExporter (no daemon)."""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from blockwire.runtime.clock import SystemClock
from blockwire.runtime.executor import Executor as CommandExecutor
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.rpc.servicer import StorageServicer
from storagesvc.service import Pool, StorageService
from tests.fakes.exporter import FakeExporter

IQN_PREFIX = "iqn.2026-01.io.blockwire.test"


@dataclass
class StorageRig:
    root: Path
    backend: FileBackend
    exporter: FakeExporter
    catalog: SqliteCatalog
    service: StorageService
    servicer: StorageServicer
    jobs: Executor

    @classmethod
    def make(cls, root: Path, *, jobs: Executor | None = None) -> StorageRig:
        backend = FileBackend("file", root / "file", CommandExecutor(), poll_interval=0.05)
        exporter = FakeExporter()
        catalog = SqliteCatalog(root / "catalog.db")
        jobs = jobs or ThreadPoolExecutor(max_workers=2)
        service = StorageService(
            catalog,
            {"file": Pool(backend, exporter, "fake")},
            SystemClock(),
            jobs,
            iqn_prefix=IQN_PREFIX,
            lock_timeout=5.0,
        )
        servicer = StorageServicer(service, watch_interval=0.1)
        return cls(root, backend, exporter, catalog, service, servicer, jobs)

    def files(self) -> list[str]:
        """Every volume and snapshot file on the backend."""
        return sorted(p.name for d in (self.backend.volumes, self.backend.snapshots) for p in d.iterdir())

    def close(self) -> None:
        self.jobs.shutdown(wait=True)
        self.catalog.close()
