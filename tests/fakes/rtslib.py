"""FakeRtslib: the part of rtslib-fb's API the LIO exporter uses, over an in-memory LIO (no configfs), for
the unit tier. Handed to `LioExporter(rtslib=...)` in place of the `rtslib_fb` module.

Kept as rtslib-fb 2.1 behaves: `Target`, `TPG` and `NodeACL` look up what exists or create it (mode
"any"); deleting a storage object deletes the LUNs that use it, deleting a LUN the mapped LUNs that point
at it, deleting a target its TPGs with their LUNs and ACLs. Storage objects get a directory under
`root` as their configfs path (for ``wwn/company_id``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(eq=False)
class StorageObject:
    fake: FakeRtslib
    name: str
    udev_path: str
    wwn: str
    readonly: bool = False

    @property
    def path(self) -> str:
        return str(self.fake.root / "core" / self.name)

    def delete(self) -> None:
        for target in list(self.fake.targets):
            for tpg in target.tpgs:
                for lun in list(tpg.luns):
                    if lun.storage_object is self:
                        lun.delete()
        self.fake.objects.remove(self)


@dataclass(eq=False)
class Lun:
    tpg: Tpg
    lun: int
    storage_object: StorageObject

    def delete(self) -> None:
        for acl in self.tpg.node_acls:
            acl.mapped_luns = [m for m in acl.mapped_luns if m.tpg_lun is not self]
        self.tpg.luns.remove(self)


@dataclass(eq=False)
class MappedLun:
    mapped_lun: int
    tpg_lun: Lun
    write_protect: bool


@dataclass(eq=False)
class NodeAcl:
    tpg: Tpg
    node_wwn: str
    chap_userid: str = ""
    chap_password: str = ""
    chap_mutual_userid: str = ""
    chap_mutual_password: str = ""
    mapped_luns: list[MappedLun] = field(default_factory=list)

    def delete(self) -> None:
        self.tpg.node_acls.remove(self)


@dataclass(eq=False)
class Tpg:
    target: Target
    tag: int
    luns: list[Lun] = field(default_factory=list)
    node_acls: list[NodeAcl] = field(default_factory=list)
    portals: set[tuple[str, int]] = field(default_factory=set)
    attributes: dict[str, str] = field(default_factory=dict)
    enable: bool = False

    def set_attribute(self, name: str, value: str) -> None:
        self.attributes[name] = value


@dataclass(eq=False)
class Target:
    fake: FakeRtslib
    wwn: str
    tpgs: list[Tpg] = field(default_factory=list)

    def delete(self) -> None:
        self.fake.targets.remove(self)


class FakeRtslib:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects: list[StorageObject] = []
        self.targets: list[Target] = []

    # -- the names of the rtslib_fb module

    def RTSRoot(self) -> Any:
        fake = self

        class Root:
            @property
            def storage_objects(self) -> list[StorageObject]:
                return list(fake.objects)

        return Root()

    def FabricModule(self, name: str) -> Any:
        assert name == "iscsi"
        fake = self

        class Fabric:
            @property
            def targets(self) -> list[Target]:
                return list(fake.targets)

        return Fabric()

    def _object(self, name: str, dev: str, wwn: str, readonly: bool) -> StorageObject:
        assert all(so.name != name for so in self.objects), f"storage object {name} exists"
        so = StorageObject(self, name, dev, wwn, readonly)
        Path(so.path, "wwn").mkdir(parents=True, exist_ok=True)
        self.objects.append(so)
        return so

    def BlockStorageObject(self, name: str, dev: str, wwn: str, readonly: bool = False) -> StorageObject:
        return self._object(name, dev, wwn, readonly)

    def FileIOStorageObject(
        self, name: str, dev: str, size: int, wwn: str, write_back: bool = False
    ) -> StorageObject:
        return self._object(name, dev, wwn, False)

    def Target(self, fabric: Any, wwn: str) -> Target:
        found = next((t for t in self.targets if t.wwn == wwn), None)
        if found is None:
            found = Target(self, wwn)
            self.targets.append(found)
        return found

    def TPG(self, target: Target, tag: int) -> Tpg:
        found = next((t for t in target.tpgs if t.tag == tag), None)
        if found is None:
            found = Tpg(target, tag)
            target.tpgs.append(found)
        return found

    def NetworkPortal(self, tpg: Tpg, ip: str, port: int) -> None:
        tpg.portals.add((ip, port))

    def LUN(self, tpg: Tpg, lun: int, storage_object: StorageObject) -> Lun:
        assert all(x.lun != lun for x in tpg.luns), f"LUN {lun} exists"
        made = Lun(tpg, lun, storage_object)
        tpg.luns.append(made)
        return made

    def NodeACL(self, tpg: Tpg, node_wwn: str) -> NodeAcl:
        found = next((a for a in tpg.node_acls if a.node_wwn == node_wwn), None)
        if found is None:
            found = NodeAcl(tpg, node_wwn)
            tpg.node_acls.append(found)
        return found

    def MappedLUN(
        self, acl: NodeAcl, mapped_lun: int, tpg_lun: Lun, write_protect: bool = False
    ) -> MappedLun:
        made = MappedLun(mapped_lun, tpg_lun, write_protect)
        acl.mapped_luns.append(made)
        return made
