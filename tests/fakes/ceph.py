"""FakeCeph: the CephProbe seam (hostagent.host.ceph) with images in memory and the cluster's answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from blockwire.errors import BlockwireError, IdentityMismatch, PermissionDenied, Unavailable
from hostagent.host.ceph import CephAccess, RbdImage

FSID = "6b1c1a2e-1f0e-4c55-9a8e-2f7a3b4c5d6e"


@dataclass
class FakeCeph:
    """One cluster: `images` by (pool, name); `keys` by user; `down` makes every call UNAVAILABLE."""

    fsid: str = FSID
    images: dict[tuple[str, str], RbdImage] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    down: bool = False
    calls: list[tuple[str, str, float]] = field(default_factory=list)
    fail: BlockwireError | None = None

    def add(self, pool: str, name: str, image_id: str, size_bytes: int = 1 << 30) -> RbdImage:
        img = RbdImage(pool, name, image_id, size_bytes, self.fsid)
        self.images[(pool, name)] = img
        return img

    def image(self, access: CephAccess, pool: str, name: str, timeout: float) -> RbdImage:
        self.calls.append((pool, name, timeout))
        if self.fail is not None:
            raise self.fail
        if self.down:
            raise Unavailable(f"the Ceph cluster did not answer within {timeout:g}s")
        user = access.user or "admin"
        if self.keys and (access.key is None or self.keys.get(user) != access.key.reveal()):
            raise PermissionDenied(f"the cluster refused cephx user {user!r}")
        try:
            img = self.images[(pool, name)]
        except KeyError:
            raise IdentityMismatch(f"image {pool}/{name} does not exist") from None
        return RbdImage(pool, name, img.image_id, img.size_bytes, self.fsid)
