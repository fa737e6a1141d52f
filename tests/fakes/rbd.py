"""FakeRbd: an in-memory Ceph pool behind the rbd backend's `RbdCluster` / `RbdSession` seam.

It keeps librbd's rules that the backend relies on: an image with snapshots cannot be removed; a clone
needs a protected snapshot; a protected snapshot cannot be removed and one with clones cannot be
unprotected; a flatten cuts a clone from its parent; rename onto an existing name fails. Failures are
injected per operation (`fail["clone"] = "no-space"`) or for the whole cluster (`down`, `denied`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from storagesvc.backends.base import Space
from storagesvc.backends.rbd import ClusterError, Parent

FSID = "3f1c9a52-6a57-4c0e-9d0b-1f2e3d4c5b6a"


@dataclass
class FakeImage:
    id: str
    size: int
    snaps: dict[str, bool] = field(default_factory=dict)  # name -> protected
    parent: Parent | None = None
    data: dict[int, bytes] = field(default_factory=dict)  # offset -> bytes written


@dataclass
class FakeRbd:
    images: dict[str, FakeImage] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    users: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # name -> (key, caps)
    space: Space | None = None
    fail: dict[str, str] = field(default_factory=dict)  # operation -> ClusterError kind
    down: bool = False
    denied: bool = False
    calls: list[str] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(0x1000))

    @contextlib.contextmanager
    def session(self) -> Iterator[FakeSession]:
        if self.down:
            raise ClusterError("unreachable", "[errno 110] RADOS timed out (error connecting to the cluster)")
        if self.denied:
            raise ClusterError(
                "permission", "[errno 13] RADOS permission denied (error connecting to the cluster)"
            )
        yield FakeSession(self)

    def children_of(self, image: str, snap: str) -> list[str]:
        return [n for n, im in self.images.items() if im.parent == Parent(image, snap)]


class FakeSession:
    def __init__(self, rbd: FakeRbd) -> None:
        self.rbd = rbd

    def _op(self, name: str) -> None:
        self.rbd.calls.append(name)
        kind = self.rbd.fail.get(name)
        if kind:
            raise ClusterError(kind, f"injected failure of {name}")

    def _get(self, image: str) -> FakeImage:
        try:
            return self.rbd.images[image]
        except KeyError:
            raise ClusterError("not-found", f"[errno 2] image {image} not found") from None

    def fsid(self) -> str:
        self._op("fsid")
        return FSID

    def pool_space(self) -> Space | None:
        self._op("pool_space")
        return self.rbd.space

    def exists(self, image: str) -> bool:
        self._op("exists")
        return image in self.rbd.images

    def image_id(self, image: str) -> str:
        self._op("image_id")
        return self._get(image).id

    def size(self, image: str) -> int:
        return self._get(image).size

    def create(self, image: str, size: int) -> None:
        self._op("create")
        if image in self.rbd.images:
            raise ClusterError("exists", f"image {image} exists")
        self.rbd.images[image] = FakeImage(f"{next(self.rbd._ids):x}", size)

    def remove(self, image: str) -> None:
        self._op("remove")
        im = self._get(image)
        if im.snaps:
            raise ClusterError("has-snapshots", f"image {image} has snapshots")
        del self.rbd.images[image]

    def rename(self, src: str, dst: str) -> None:
        self._op("rename")
        if dst in self.rbd.images:
            raise ClusterError("exists", f"image {dst} exists")
        self.rbd.images[dst] = self.rbd.images.pop(src)
        for im in self.rbd.images.values():
            if im.parent is not None and im.parent.image == src:
                im.parent = Parent(dst, im.parent.snap)

    def resize(self, image: str, size: int) -> None:
        self._op("resize")
        self._get(image).size = size

    def snaps(self, image: str) -> list[str]:
        return list(self._get(image).snaps)

    def snap_create(self, image: str, snap: str) -> None:
        self._op("snap_create")
        im = self._get(image)
        if snap in im.snaps:
            raise ClusterError("exists", f"snapshot {image}@{snap} exists")
        im.snaps[snap] = False

    def snap_protect(self, image: str, snap: str) -> None:
        self._op("snap_protect")
        self._get(image).snaps[snap] = True

    def snap_remove(self, image: str, snap: str) -> None:
        self._op("snap_remove")
        im = self._get(image)
        if snap not in im.snaps:
            raise ClusterError("not-found", f"no snapshot {image}@{snap}")
        if self.rbd.children_of(image, snap):
            raise ClusterError("busy", f"snapshot {image}@{snap} has clones")
        del im.snaps[snap]

    def children(self, image: str, snap: str) -> list[str]:
        return self.rbd.children_of(image, snap)

    def parent(self, image: str) -> Parent | None:
        return self._get(image).parent

    def clone(self, parent: str, snap: str, child: str) -> None:
        self._op("clone")
        p = self._get(parent)
        if not p.snaps.get(snap):
            raise ClusterError("invalid", f"{parent}@{snap} is not protected")
        if child in self.rbd.images:
            raise ClusterError("exists", f"image {child} exists")
        self.rbd.images[child] = FakeImage(f"{next(self.rbd._ids):x}", p.size, parent=Parent(parent, snap))

    def flatten(self, image: str) -> None:
        self._op("flatten")
        self._get(image).parent = None

    def write(self, image: str, chunks: Iterable[tuple[int, bytes]]) -> None:
        im = self._get(image)
        for offset, data in chunks:
            self._op("write")
            im.data[offset] = data

    def meta_get(self, key: str) -> str | None:
        return self.rbd.meta.get(key)

    def meta_set(self, key: str, value: str) -> None:
        self._op("meta_set")
        self.rbd.meta[key] = value

    def meta_remove(self, key: str) -> None:
        self.rbd.meta.pop(key, None)

    def host_key(self, user: str, caps: tuple[str, ...]) -> str:
        self._op("host_key")
        key, _ = self.rbd.users.setdefault(
            user, (f"AQ{len(self.rbd.users):02d}fakekeyfakekeyfakekeyfakekeyfake==", caps)
        )
        return key
