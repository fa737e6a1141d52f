"""The `file` backend: sparse raw files in a directory.

* volumes: ``<path>/volumes/<id>.raw``; snapshots: ``<path>/snapshots/<id>.raw`` (mode 0600);
* snapshots and clones: ``cp --reflink=auto --sparse=always``, a constant-time reflink where the
  filesystem offers it (XFS with reflink, btrfs), a sparse full copy otherwise (ext4). A snapshot is a
  file of its own, so volumes can be deleted while their snapshots live on;
* images: ``qemu-img convert`` (qcow2 or raw) into a new file; progress is the allocated size of the
  destination, polled while qemu-img runs.

Space accounting: a new volume must fit into `oversubscription_ratio` times the filesystem's total
size minus what volumes already provision, and into that ratio times the free space. ENOSPC during a
write is RESOURCE_EXHAUSTED too, and the half-written file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from blockwire.errors import InvalidArgument, NotFound, ResourceExhausted
from blockwire.runtime.executor import CommandFailed, Runner
from storagesvc.backends.base import ImageInfo, ProgressFn, Space
from storagesvc.model import MIB, ImageFormat, ImageSource

log = logging.getLogger(__name__)

ENOSPC_TEXT = "No space left on device"


def _enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return isinstance(exc, CommandFailed) and ENOSPC_TEXT in exc.stderr


class FileBackend:
    kind = "file"
    snapshots_depend_on_volume = False

    def __init__(
        self,
        name: str,
        path: str | Path,
        runner: Runner,
        *,
        oversubscription_ratio: float = 1.0,
        copy_timeout: float = 3600.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.name = name
        self.root = Path(path)
        self.runner = runner
        self.ratio = oversubscription_ratio
        self.copy_timeout = copy_timeout
        self.poll_interval = poll_interval
        self.volumes = self.root / "volumes"
        self.snapshots = self.root / "snapshots"
        for d in (self.volumes, self.snapshots):
            d.mkdir(parents=True, exist_ok=True)

    def _vol(self, volume_id: str) -> Path:
        return self.volumes / f"{volume_id}.raw"

    def _snap(self, snapshot_id: str) -> Path:
        return self.snapshots / f"{snapshot_id}.raw"

    def device_path(self, volume_id: str) -> str:
        return str(self._vol(volume_id))

    def space(self) -> Space:
        st = os.statvfs(self.root)
        return Space(total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize)

    def max_volume_bytes(self, provisioned_bytes: int) -> int:
        s = self.space()
        limit = min(int(s.free_bytes * self.ratio), int(s.total_bytes * self.ratio) - provisioned_bytes)
        return max(0, limit - limit % MIB)

    def exists(self, volume_id: str) -> bool:
        return self._vol(volume_id).exists()

    def _guarded(self, dst: Path, what: str, work: Callable[[], None]) -> None:
        """Runs `work` that fills `dst`; on any failure removes `dst` and maps ENOSPC."""
        try:
            work()
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            if _enospc(exc):
                raise ResourceExhausted(f"backend {self.name}: out of space while {what}") from exc
            raise

    def create(self, volume_id: str, size_bytes: int) -> None:
        dst = self._vol(volume_id)

        def work() -> None:
            fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.ftruncate(fd, size_bytes)
            finally:
                os.close(fd)

        self._guarded(dst, "creating a volume", work)

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._vol(volume_id).unlink()

    def extend(self, volume_id: str, size_bytes: int) -> None:
        path = self._vol(volume_id)
        if not path.exists():
            raise NotFound(f"backend {self.name} has no file for volume {volume_id}")
        try:
            os.truncate(path, size_bytes)
        except OSError as exc:
            if _enospc(exc):
                raise ResourceExhausted(f"backend {self.name}: out of space while extending") from exc
            raise

    def _copy(self, src: Path, dst: Path, size_bytes: int, what: str) -> None:
        if not src.exists():
            raise NotFound(f"backend {self.name} has no file {src.name}")

        def work() -> None:
            self.runner.run(
                ["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(dst)],
                timeout=self.copy_timeout,
            )
            os.chmod(dst, 0o600)
            if size_bytes > dst.stat().st_size:
                os.truncate(dst, size_bytes)

        self._guarded(dst, what, work)

    def snapshot(self, volume_id: str, snapshot_id: str) -> None:
        self._copy(self._vol(volume_id), self._snap(snapshot_id), 0, "taking a snapshot")

    def delete_snapshot(self, snapshot_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._snap(snapshot_id).unlink()

    def create_from_snapshot(self, snapshot_id: str, volume_id: str, size_bytes: int) -> None:
        self._copy(self._snap(snapshot_id), self._vol(volume_id), size_bytes, "copying a snapshot")

    def clone(self, source_volume_id: str, volume_id: str, size_bytes: int) -> None:
        self._copy(self._vol(source_volume_id), self._vol(volume_id), size_bytes, "cloning a volume")

    def inspect_image(self, image: ImageSource) -> ImageInfo:
        return inspect_image(self.runner, image)

    def create_from_image(
        self, image: ImageSource, info: ImageInfo, volume_id: str, size_bytes: int, progress: ProgressFn
    ) -> None:
        dst = self._vol(volume_id)
        argv = ["qemu-img", "convert", "-f", info.format, "-O", "raw", "-S", "4k", image.path, str(dst)]

        def allocated() -> int:
            try:
                return dst.stat().st_blocks * 512
            except FileNotFoundError:
                return 0

        def work() -> None:
            run_polled(
                lambda: self.runner.run(argv, timeout=self.copy_timeout),
                lambda: progress(min(allocated(), info.virtual_size), info.virtual_size),
                self.poll_interval,
            )
            os.chmod(dst, 0o600)
            if size_bytes > dst.stat().st_size:
                os.truncate(dst, size_bytes)
            progress(info.virtual_size, info.virtual_size)

        self._guarded(dst, "copying an image", work)


def inspect_image(runner: Runner, image: ImageSource) -> ImageInfo:
    """`qemu-img info` of an image; INVALID_ARGUMENT when it is missing, unreadable or of another format."""
    field = "source_image.path"
    if not os.path.isabs(image.path):
        raise InvalidArgument(field, "must be an absolute path on the storage host")
    if not os.path.isfile(image.path):
        raise InvalidArgument(field, f"{image.path} is not a file on the storage host")
    argv = ["qemu-img", "info", "--output=json"]
    if image.format is not ImageFormat.PROBE:
        argv += ["-f", image.format.value]
    try:
        out = runner.run([*argv, image.path], timeout=60).stdout
    except CommandFailed as exc:
        raise InvalidArgument(field, f"qemu-img cannot read it: {exc.message}") from exc
    data = json.loads(out)
    fmt = data.get("format", "")
    if fmt not in ("raw", "qcow2"):
        raise InvalidArgument(field, f"format {fmt!r} is not supported (raw or qcow2)")
    if image.format is not ImageFormat.PROBE and fmt != image.format.value:
        raise InvalidArgument("source_image.format", f"the image is {fmt}, not {image.format.value}")
    if data.get("backing-filename"):
        raise InvalidArgument(field, "images with a backing file are not supported; flatten it first")
    return ImageInfo(format=fmt, virtual_size=int(data["virtual-size"]))


def run_polled(work: Callable[[], object], poll: Callable[[], None], interval: float) -> None:
    """Runs `work` in a thread and calls `poll` every `interval` seconds until it ends (waiting on its
    completion event, not sleeping); re-raises what `work` raised."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
            failure.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, name="polled-copy", daemon=True)
    thread.start()
    while not done.wait(interval):
        try:
            poll()
        except Exception:
            log.debug("progress poll failed", exc_info=True)
    thread.join()
    if failure:
        raise failure[0]
