"""Disk XML from typed specs, and back (STYLE.md rule 12).

`DiskSpec` mirrors libvirt's <disk> element, nested like the XML (KubeVirt's schema style), so writing
and reading are symmetric: `parse_disk(disk_xml(spec)) == spec`, including <auth> and <iotune>. Pure: no
libvirt import, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TypeVar

from lxml import etree

from blockwire.errors import InvalidArgument
from blockwire.model import IoTune
from hostagent.model import Bus, Cache, Discard, Io

E = TypeVar("E", Bus, Cache, Io, Discard)
_IOTUNE_FIELDS = tuple(f.name for f in fields(IoTune))


@dataclass(frozen=True)
class BlockSource:
    """<disk type='block'>: a host block device."""

    dev: str


@dataclass(frozen=True)
class FileSource:
    """<disk type='file'>: a host file."""

    file: str


@dataclass(frozen=True)
class NetHost:
    name: str
    port: int = 0


@dataclass(frozen=True)
class Auth:
    """<auth username=...><secret type=... usage=.../></auth>: the password lives in a libvirt secret."""

    username: str
    secret_type: str  # "iscsi" or "ceph"
    usage: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class NetworkSource:
    """<disk type='network'>: QEMU connects by itself (iSCSI through libiscsi, RBD through librbd)."""

    protocol: str  # "iscsi" or "rbd"
    name: str  # "IQN/LUN" for iSCSI, "pool/image" for RBD
    hosts: tuple[NetHost, ...] = ()
    initiator_iqn: str = ""
    auth: Auth | None = None


Source = BlockSource | FileSource | NetworkSource


@dataclass(frozen=True)
class DiskEncryption:
    """<encryption format='luks' engine='qemu'><secret type='passphrase' uuid=.../></encryption>: QEMU
    decrypts a LUKS1 volume with the passphrase in the libvirt secret (usage type 'volume'). The element is
    the same for block, file and network disks; written at disk level, read there or inside <source>."""

    secret_uuid: str
    format: str = "luks"
    engine: str = "qemu"


# virtio-scsi addresses LUNs 0..16383 behind target 0; libvirt's default address for a disk without one is
# derived from its target name, seven units a controller (the LSI limit), and past that it tries to
# hot-plug a new controller, which a running q35 domain refuses. So the agent gives SCSI disks explicit
# addresses on the domain's virtio-scsi controllers, as Nova does.
VIRTIO_SCSI_MAX_UNIT = 16383


@dataclass(frozen=True)
class DriveAddress:
    """<address type='drive' controller= bus= target= unit=/>."""

    controller: int = 0
    bus: int = 0
    target: int = 0
    unit: int = 0


@dataclass(frozen=True)
class DiskSpec:
    """One <disk>. Every field is written and read back; defaults are omitted from the XML."""

    source: Source
    target_dev: str
    bus: Bus = Bus.SCSI
    device: str = "disk"
    driver_type: str = "raw"
    cache: Cache | None = Cache.NONE
    io: Io | None = None
    discard: Discard | None = None
    iotune: IoTune = field(default_factory=IoTune)
    serial: str = ""
    wwn: str = ""
    read_only: bool = False
    shareable: bool = False
    logical_block_size: int = 0
    physical_block_size: int = 0
    address: DriveAddress | None = None
    boot_order: int = 0
    encryption: DiskEncryption | None = None


@dataclass(frozen=True)
class LiveDisk:
    """A disk read from a domain's live XML: the spec plus what libvirt added."""

    spec: DiskSpec
    alias: str = ""


def _disk_type(source: Source) -> str:
    if isinstance(source, BlockSource):
        return "block"
    if isinstance(source, FileSource):
        return "file"
    return "network"


def _source_element(disk: etree._Element, src: Source) -> None:
    if isinstance(src, BlockSource):
        etree.SubElement(disk, "source", dev=src.dev)
    elif isinstance(src, FileSource):
        etree.SubElement(disk, "source", file=src.file)
    else:
        source = etree.SubElement(disk, "source", protocol=src.protocol, name=src.name)
        for host in src.hosts:
            h = etree.SubElement(source, "host", name=host.name)
            if host.port:
                h.set("port", str(host.port))
        if src.initiator_iqn:
            initiator = etree.SubElement(source, "initiator")
            etree.SubElement(initiator, "iqn", name=src.initiator_iqn)
        if src.auth is not None:
            auth = etree.SubElement(source, "auth", username=src.auth.username)
            secret = etree.SubElement(auth, "secret", type=src.auth.secret_type)
            if src.auth.usage:
                secret.set("usage", src.auth.usage)
            if src.auth.uuid:
                secret.set("uuid", src.auth.uuid)


def _encryption_element(disk: etree._Element, encryption: DiskEncryption) -> None:
    enc = etree.SubElement(disk, "encryption", format=encryption.format)
    if encryption.engine:
        enc.set("engine", encryption.engine)
    etree.SubElement(enc, "secret", type="passphrase", uuid=encryption.secret_uuid)


def disk_element(spec: DiskSpec) -> etree._Element:
    disk = etree.Element("disk", type=_disk_type(spec.source), device=spec.device)
    driver = etree.SubElement(disk, "driver", name="qemu", type=spec.driver_type)
    if spec.cache is not None:
        driver.set("cache", spec.cache.value)
    if spec.io is not None:
        driver.set("io", spec.io.value)
    if spec.discard is not None:
        driver.set("discard", spec.discard.value)
    _source_element(disk, spec.source)
    if spec.encryption is not None:
        _encryption_element(disk, spec.encryption)
    if spec.logical_block_size or spec.physical_block_size:
        blockio = etree.SubElement(disk, "blockio")
        if spec.logical_block_size:
            blockio.set("logical_block_size", str(spec.logical_block_size))
        if spec.physical_block_size:
            blockio.set("physical_block_size", str(spec.physical_block_size))
    etree.SubElement(disk, "target", dev=spec.target_dev, bus=spec.bus.value)
    _tail_elements(disk, spec)
    return disk


def _tail_elements(disk: etree._Element, spec: DiskSpec) -> None:
    if not spec.iotune.is_empty():
        iotune = etree.SubElement(disk, "iotune")
        for name in _IOTUNE_FIELDS:
            value = getattr(spec.iotune, name)
            if value:
                etree.SubElement(iotune, name).text = str(value)
    if spec.boot_order:
        etree.SubElement(disk, "boot", order=str(spec.boot_order))
    if spec.read_only:
        etree.SubElement(disk, "readonly")
    if spec.shareable:
        etree.SubElement(disk, "shareable")
    if spec.serial:
        etree.SubElement(disk, "serial").text = spec.serial
    if spec.wwn:
        etree.SubElement(disk, "wwn").text = spec.wwn
    if spec.address is not None:
        a = spec.address
        etree.SubElement(
            disk,
            "address",
            type="drive",
            controller=str(a.controller),
            bus=str(a.bus),
            target=str(a.target),
            unit=str(a.unit),
        )


def with_source(
    disk: etree._Element, source: Source, encryption: DiskEncryption | None = None
) -> etree._Element:
    """A copy of a <disk> element that opens `source` instead: its type and <source> (with <auth>,
    <initiator>) replaced, everything else (target, address, serial, driver, iotune, boot, alias) kept, so
    that the guest sees the same disk. For a live migration's destination XML. `encryption`: an
    encrypted volume's <encryption> on this host (its own secret), replacing the source host's."""
    copy = etree.fromstring(etree.tostring(disk))
    copy.set("type", _disk_type(source))
    index = len(copy)
    replaced = [copy.find("source"), copy.find("auth")]
    if encryption is not None:
        replaced.append(copy.find("encryption"))
    for old in replaced:
        if old is not None:
            index = min(index, copy.index(old))
            copy.remove(old)
    scratch = etree.Element("disk")
    _source_element(scratch, source)
    if encryption is not None:
        _encryption_element(scratch, encryption)
    for offset, element in enumerate(list(scratch)):
        copy.insert(index + offset, element)
    return copy


def replace_disk_sources(
    domain_xml: str, sources: dict[str, Source], encryptions: Mapping[str, DiskEncryption] | None = None
) -> str:
    """The domain XML with the disks at the given target names opening the given sources (`with_source`,
    with `encryptions` of the same target names); InvalidArgument naming a target the domain has no disk
    at."""
    root = _parse_domain(domain_xml)
    disks = {t.get("dev", ""): d for d in root.findall("devices/disk") if (t := d.find("target")) is not None}
    for target, source in sources.items():
        disk = disks.get(target)
        if disk is None:
            raise InvalidArgument("domain_xml", f"the domain has no disk at {target}")
        parent = disk.getparent()
        assert parent is not None
        parent.replace(disk, with_source(disk, source, (encryptions or {}).get(target)))
    return etree.tostring(root, encoding="unicode")


def _parse_domain(domain_xml: str) -> etree._Element:
    try:  # a caller's text: no entities resolved, nothing fetched
        return etree.fromstring(domain_xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise InvalidArgument("domain_xml", f"not well-formed XML: {exc}") from None


def domain_uuid(domain_xml: str) -> str:
    """The <uuid> of a domain's XML ("" when it has none)."""
    return (_parse_domain(domain_xml).findtext("uuid") or "").strip()


def disk_at(domain_xml: str, target_dev: str) -> LiveDisk:
    """The disk of a domain's XML at a target name; InvalidArgument when there is none."""
    for d in _parse_domain(domain_xml).findall("devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == target_dev:
            return parse_disk_element(d)
    raise InvalidArgument("domain_xml", f"the domain has no disk at {target_dev}")


def moved_disk_xml(
    domain_xml: str, target_dev: str, source: Source, encryption: DiskEncryption | None = None
) -> str:
    """The disk at `target_dev` of a domain's XML, opening `source` instead (`with_source`)."""
    for d in _parse_domain(domain_xml).findall("devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == target_dev:
            return etree.tostring(with_source(d, source, encryption), pretty_print=True, encoding="unicode")
    raise InvalidArgument("domain_xml", f"the domain has no disk at {target_dev}")


def disk_xml(spec: DiskSpec) -> str:
    """The <disk> element for `spec`, pretty-printed (golden files compare this text)."""
    return etree.tostring(disk_element(spec), pretty_print=True, encoding="unicode")


def _enum(cls: type[E], value: str | None, field_name: str) -> E | None:
    if value is None:
        return None
    try:
        return cls(value)
    except ValueError:
        raise InvalidArgument(field_name, f"unknown value {value!r}") from None


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _parse_source(disk: etree._Element) -> Source:
    kind = disk.get("type", "")
    source = disk.find("source")
    if kind == "block":
        return BlockSource(dev=source.get("dev", "") if source is not None else "")
    if kind == "file":
        return FileSource(file=source.get("file", "") if source is not None else "")
    if kind != "network" or source is None:
        raise InvalidArgument("disk.type", f"unsupported disk type {kind!r}")
    hosts = tuple(NetHost(h.get("name", ""), _int(h.get("port"))) for h in source.findall("host"))
    iqn = source.find("initiator/iqn")
    # libvirt accepts <auth> inside <source> (written here) or directly under <disk> (older configs).
    auth_el = source.find("auth")
    if auth_el is None:
        auth_el = disk.find("auth")
    auth = None
    if auth_el is not None:
        secret = auth_el.find("secret")
        auth = Auth(
            username=auth_el.get("username", ""),
            secret_type=secret.get("type", "") if secret is not None else "",
            usage=secret.get("usage", "") if secret is not None else "",
            uuid=secret.get("uuid", "") if secret is not None else "",
        )
    return NetworkSource(
        protocol=source.get("protocol", ""),
        name=source.get("name", ""),
        hosts=hosts,
        initiator_iqn=iqn.get("name", "") if iqn is not None else "",
        auth=auth,
    )


def parse_disk_element(disk: etree._Element) -> LiveDisk:
    target = disk.find("target")
    driver = disk.find("driver")
    iotune_el = disk.find("iotune")
    iotune = IoTune()
    if iotune_el is not None:
        values: dict[str, int | str] = {}
        for name in _IOTUNE_FIELDS:
            el = iotune_el.find(name)
            if el is not None and el.text:
                values[name] = el.text.strip() if name == "group_name" else _int(el.text.strip())
        iotune = IoTune(**values)  # type: ignore[arg-type]
    blockio = disk.find("blockio")
    alias = disk.find("alias")
    address_el = disk.find("address[@type='drive']")
    boot = disk.find("boot")
    address = None
    if address_el is not None:
        address = DriveAddress(
            *(_int(address_el.get(k, "0")) for k in ("controller", "bus", "target", "unit"))
        )
    spec = DiskSpec(
        source=_parse_source(disk),
        target_dev=target.get("dev", "") if target is not None else "",
        bus=_enum(Bus, target.get("bus") if target is not None else None, "disk.target.bus") or Bus.SCSI,
        device=disk.get("device", "disk"),
        driver_type=driver.get("type", "raw") if driver is not None else "raw",
        cache=_enum(Cache, driver.get("cache") if driver is not None else None, "disk.driver.cache"),
        io=_enum(Io, driver.get("io") if driver is not None else None, "disk.driver.io"),
        discard=_enum(Discard, driver.get("discard") if driver is not None else None, "disk.driver.discard"),
        iotune=iotune,
        serial=(disk.findtext("serial") or "").strip(),
        wwn=(disk.findtext("wwn") or "").strip(),
        read_only=disk.find("readonly") is not None,
        shareable=disk.find("shareable") is not None,
        logical_block_size=_int(blockio.get("logical_block_size")) if blockio is not None else 0,
        physical_block_size=_int(blockio.get("physical_block_size")) if blockio is not None else 0,
        address=address,
        boot_order=_int(boot.get("order")) if boot is not None else 0,
        encryption=_parse_encryption(disk),
    )
    return LiveDisk(spec=spec, alias=alias.get("name", "") if alias is not None else "")


def _parse_encryption(disk: etree._Element) -> DiskEncryption | None:
    enc = disk.find("encryption")
    if enc is None:
        enc = disk.find("source/encryption")
    if enc is None:
        return None
    secret = enc.find("secret")
    return DiskEncryption(
        secret_uuid=secret.get("uuid", "") if secret is not None else "",
        format=enc.get("format", ""),
        engine=enc.get("engine", ""),
    )


def parse_disk(xml: str) -> DiskSpec:
    """A <disk> element's text back into the spec."""
    return parse_disk_element(etree.fromstring(xml.encode())).spec


def parse_domain_disks(domain_xml: str) -> list[LiveDisk]:
    """Every <disk> of a domain's XML (live or persistent), in document order."""
    root = etree.fromstring(domain_xml.encode())
    return [parse_disk_element(d) for d in root.findall("devices/disk")]


def next_drive_address(domain_xml: str, *other_xmls: str) -> DriveAddress | None:
    """The first free unit behind target 0 of the domain's first virtio-scsi controller, or None when the
    domain has no virtio-scsi controller (libvirt then picks, as before). Units used in `other_xmls` (the
    persistent definition, when the disk goes there too) are taken as well."""
    root = etree.fromstring(domain_xml.encode())
    controllers = sorted(
        _int(c.get("index", "0"))
        for c in root.findall("devices/controller[@type='scsi']")
        if c.get("model") == "virtio-scsi"
    )
    if not controllers:
        return None
    controller = controllers[0]
    used = {
        _int(a.get("unit", "0"))
        for tree in (root, *(etree.fromstring(x.encode()) for x in other_xmls))
        for a in tree.findall("devices/*/address[@type='drive']")
        if _int(a.get("controller", "0")) == controller
        and _int(a.get("bus", "0")) == 0
        and _int(a.get("target", "0")) == 0
    }
    for unit in range(VIRTIO_SCSI_MAX_UNIT + 1):
        if unit not in used:
            return DriveAddress(controller=controller, unit=unit)
    raise InvalidArgument("disk", f"virtio-scsi controller {controller} has no free unit left")


def target_prefix(bus: Bus) -> str:
    return "vd" if bus is Bus.VIRTIO else "sd"


def _index_name(index: int) -> str:
    """0 -> "a", 25 -> "z", 26 -> "aa" (libvirt's disk naming)."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("a") + rem) + name
    return name


def next_target_dev(bus: Bus, used: set[str], preferred: str = "") -> str:
    """The preferred name if free, else the first free name on the bus's prefix ("sda", "sdb", ...)."""
    if preferred:
        if preferred in used:
            raise InvalidArgument("disk.target_dev", f"{preferred} is already used by the domain")
        return preferred
    prefix = target_prefix(bus)
    for i in range(18278):  # up to "zzz", libvirt's own limit
        name = prefix + _index_name(i)
        if name not in used:
            return name
    raise InvalidArgument("disk.target_dev", "no free target device name left on the domain")
