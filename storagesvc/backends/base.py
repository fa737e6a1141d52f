"""The backend interface: where a volume's bytes live (files, thin LVs, ...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from blockwire.model import Transport, TransportInfo
from storagesvc.model import ImageSource

ProgressFn = Callable[[int, int], None]
"""Called with (done_bytes, total_bytes) while a long copy runs."""


@dataclass(frozen=True)
class Space:
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "raw" or "qcow2"
    virtual_size: int


class Backend(Protocol):
    """Volume storage. Every create either completes or leaves nothing behind; deletes of what is gone
    succeed. Raises ResourceExhausted when out of space, Unavailable when the storage cannot be reached."""

    name: str
    kind: str
    #: True when a snapshot needs its volume (deleting the volume is refused while snapshots exist).
    snapshots_depend_on_volume: bool

    def space(self) -> Space: ...

    def max_volume_bytes(self, provisioned_bytes: int) -> int:
        """Largest new volume this backend accepts now."""
        ...

    def create(self, volume_id: str, size_bytes: int) -> None: ...

    def delete(self, volume_id: str) -> None: ...

    def exists(self, volume_id: str) -> bool: ...

    def extend(self, volume_id: str, size_bytes: int) -> None: ...

    def snapshot(self, volume_id: str, snapshot_id: str) -> None: ...

    def delete_snapshot(self, snapshot_id: str) -> None: ...

    def create_from_snapshot(self, snapshot_id: str, volume_id: str, size_bytes: int) -> None: ...

    def clone(self, source_volume_id: str, volume_id: str, size_bytes: int) -> None: ...

    def inspect_image(self, image: ImageSource) -> ImageInfo: ...

    def create_from_image(
        self, image: ImageSource, info: ImageInfo, volume_id: str, size_bytes: int, progress: ProgressFn
    ) -> None: ...

    def device_path(self, volume_id: str) -> str:
        """What an exporter serves: a file or block device path."""
        ...


@runtime_checkable
class DirectBackend(Protocol):
    """A backend whose volumes hosts open themselves, with no target to export (rbd: QEMU's librbd or
    the kernel's rbd). An attachment gets `connection(...)` instead of an export."""

    transport: Transport

    def connection(self, volume_id: str, host: str) -> TransportInfo:
        """How `host` reaches the volume, with its identity (an RBD image's id) read now."""
        ...

    def write_header(self, volume_id: str, data: bytes) -> None:
        """Writes `data` at offset 0 of the volume (an encrypted volume's LUKS header)."""
        ...
