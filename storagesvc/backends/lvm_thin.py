"""The `lvm-thin` backend: thin LVs in a thin pool, through lvcreate/lvremove/lvextend/lvs.

* volume ``<vg>/vol-<id>``, snapshot ``<vg>/snap-<id>`` (a thin snapshot: instant, shares blocks, and
  keeps LVM's activation-skip flag so it is never opened by accident);
* a volume from a snapshot, or a clone, is a thin snapshot of it created with ``-kn`` (activated like a
  volume); thin snapshots do not depend on their origin, so volumes can be deleted while snapshots
  of them live on;
* images: ``qemu-img convert -n`` onto the activated LV; progress from the LV's data_percent;
* space: the pool's size and data usage (`lvs`); thin volumes may oversubscribe the pool up to
  `oversubscription_ratio`. LVM's "Insufficient free space" is RESOURCE_EXHAUSTED.

Needs device-mapper (thin-pool target): in this project only the guest tier has it.
"""

from __future__ import annotations

import logging

from blockwire.errors import NotFound, ResourceExhausted
from blockwire.runtime.executor import CommandFailed, Result, Runner
from storagesvc.backends.base import ImageInfo, ProgressFn, Space
from storagesvc.backends.file import inspect_image, run_polled
from storagesvc.model import MIB, ImageSource

log = logging.getLogger(__name__)

LVM_FAILED = 5  # the exit code of every failed LVM command
_NO_SPACE = (
    "Insufficient free space",
    "insufficient free space",
    "No space left",
    "Cannot create new thin volume",
)
_MISSING = ("Failed to find logical volume", "not found")


class LvmThinBackend:
    kind = "lvm-thin"
    snapshots_depend_on_volume = False

    def __init__(
        self,
        name: str,
        vg: str,
        pool: str,
        runner: Runner,
        *,
        oversubscription_ratio: float = 1.0,
        timeout: float = 120.0,
        copy_timeout: float = 3600.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.name = name
        self.vg = vg
        self.pool = pool
        self.runner = runner
        self.ratio = oversubscription_ratio
        self.timeout = timeout
        self.copy_timeout = copy_timeout
        self.poll_interval = poll_interval

    def _lv(self, volume_id: str) -> str:
        return f"{self.vg}/vol-{volume_id}"

    def _snap(self, snapshot_id: str) -> str:
        return f"{self.vg}/snap-{snapshot_id}"

    def device_path(self, volume_id: str) -> str:
        return f"/dev/{self._lv(volume_id)}"

    def _run(self, *argv: str, what: str) -> Result:
        try:
            return self.runner.run(list(argv), timeout=self.timeout)
        except CommandFailed as exc:
            if any(t in exc.stderr for t in _NO_SPACE):
                raise ResourceExhausted(f"backend {self.name}: out of space while {what}") from exc
            raise

    def _remove(self, lv: str) -> None:
        try:
            self.runner.run(["lvremove", "-q", "-y", lv], timeout=self.timeout)
        except CommandFailed as exc:
            if not any(t in exc.stderr for t in _MISSING):
                raise

    def space(self) -> Space:
        out = self._run(
            "lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size,data_percent",
            f"{self.vg}/{self.pool}", what="reading the pool",
        ).stdout.split()  # fmt: skip
        size = int(float(out[0]))
        used = float(out[1]) if len(out) > 1 else 0.0
        return Space(total_bytes=size, free_bytes=int(size * (100.0 - used) / 100.0))

    def max_volume_bytes(self, provisioned_bytes: int) -> int:
        s = self.space()
        limit = min(int(s.total_bytes * self.ratio) - provisioned_bytes, int(s.free_bytes * self.ratio))
        return max(0, limit - limit % MIB)

    def exists(self, volume_id: str) -> bool:
        try:
            self.runner.run(["lvs", "--noheadings", self._lv(volume_id)], timeout=self.timeout)
        except CommandFailed:
            return False
        return True

    def create(self, volume_id: str, size_bytes: int) -> None:
        lv = self._lv(volume_id)
        try:
            self._run(
                "lvcreate", "-q", "-y", "-V", f"{size_bytes // MIB}m", "-T", f"{self.vg}/{self.pool}",
                "-n", f"vol-{volume_id}", what="creating a volume",
            )  # fmt: skip
        except BaseException:
            self._remove(lv)  # lvcreate can leave a half-made LV behind
            raise

    def delete(self, volume_id: str) -> None:
        self._remove(self._lv(volume_id))

    def extend(self, volume_id: str, size_bytes: int) -> None:
        if not self.exists(volume_id):
            raise NotFound(f"backend {self.name} has no LV for volume {volume_id}")
        self._run("lvextend", "-q", "-L", f"{size_bytes // MIB}m", self._lv(volume_id), what="extending")

    def _thin_copy(self, origin: str, volume_id: str, size_bytes: int, what: str) -> None:
        lv = self._lv(volume_id)
        try:
            self._run("lvcreate", "-q", "-y", "-s", "-kn", "-n", f"vol-{volume_id}", origin, what=what)
            self._run("lvchange", "-q", "-ay", lv, what=what)
            current = int(
                float(
                    self._run(
                        "lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", lv, what=what
                    ).stdout.strip()
                )
            )
            if size_bytes > current:
                self._run("lvextend", "-q", "-L", f"{size_bytes // MIB}m", lv, what=what)
        except BaseException:
            self._remove(lv)
            raise

    def snapshot(self, volume_id: str, snapshot_id: str) -> None:
        snap = self._snap(snapshot_id)
        try:
            self._run(
                "lvcreate",
                "-q",
                "-y",
                "-s",
                "-n",
                f"snap-{snapshot_id}",
                self._lv(volume_id),
                what="taking a snapshot",
            )
        except BaseException:
            self._remove(snap)
            raise

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._remove(self._snap(snapshot_id))

    def create_from_snapshot(self, snapshot_id: str, volume_id: str, size_bytes: int) -> None:
        self._thin_copy(self._snap(snapshot_id), volume_id, size_bytes, "copying a snapshot")

    def clone(self, source_volume_id: str, volume_id: str, size_bytes: int) -> None:
        self._thin_copy(self._lv(source_volume_id), volume_id, size_bytes, "cloning a volume")

    def inspect_image(self, image: ImageSource) -> ImageInfo:
        return inspect_image(self.runner, image)

    def create_from_image(
        self, image: ImageSource, info: ImageInfo, volume_id: str, size_bytes: int, progress: ProgressFn
    ) -> None:
        self.create(volume_id, size_bytes)
        lv = self._lv(volume_id)

        def poll() -> None:
            out = self.runner.run(["lvs", "--noheadings", "-o", "data_percent", lv], timeout=self.timeout)
            done = int(size_bytes * float(out.stdout.strip() or 0) / 100.0)
            progress(min(done, info.virtual_size), info.virtual_size)

        try:
            argv = [
                "qemu-img",
                "convert",
                "-n",
                "--target-is-zero",
                "-f",
                info.format,
                "-O",
                "raw",
                image.path,
                self.device_path(volume_id),
            ]
            run_polled(lambda: self._run(*argv, what="copying an image"), poll, self.poll_interval)
        except BaseException:
            self._remove(lv)
            raise
        progress(info.virtual_size, info.virtual_size)
