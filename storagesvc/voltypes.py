"""Volume types and QoS specs: create, get, list, update, delete, associate; what a type gives a new volume
(placement extra specs, multiattach, encryption) and what its QoS specs give an attachment (IoTune).

Volume type extra specs (README "Volume types, QoS specs and the scheduler"):
* unscoped keys and `capabilities:<name>` are placement rules the scheduler checks against each
  backend's capabilities (storagesvc.scheduler, with its operators); `volume_backend_name` and
  `availability_zone` pin the backend or the zone;
* `multiattach` and `encryption`, when `<is> True` (or true), are also properties of every volume of
  the type: it is created multiattach, or encrypted (LUKS1, a fresh key) whatever the request says;
* any other scope is refused (INVALID_ARGUMENT naming the key): a typo must not pass silently.

QoS specs keys: `{total,read,write}_{bytes,iops}_sec` and their `_per_gb` variants (multiplied by the
volume's size in GiB, rounded up, when an attachment is made), whole numbers; a limit and its per-GB
variant are exclusive, and so are a total and a read or write limit of the same unit (QEMU refuses
both). `consumer`: "front-end" (the hypervisor applies them: libvirt <iotune>), "back-end" (recorded;
no backend of ours enforces limits yet, so nothing reaches the disk) or "both".

Names are the idempotency keys and never change; a reference is an id or a name.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TypeVar

from blockwire import validate
from blockwire.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from blockwire.model import IoTune
from storagesvc import paging, scheduler
from storagesvc.catalog import Conflict
from storagesvc.context import Context
from storagesvc.model import Page, QosSpecs, Volume, VolumeType

log = logging.getLogger(__name__)

GIB = 1 << 30
CONSUMERS = ("front-end", "back-end", "both")
PROPERTY_SPECS = ("multiattach", "encryption")
QOS_LIMITS = tuple(f"{kind}_{unit}_sec" for unit in ("bytes", "iops") for kind in ("total", "read", "write"))
QOS_KEYS = QOS_LIMITS + tuple(f"{k}_per_gb" for k in QOS_LIMITS)
MAX_SPECS = 64
MAX_DESCRIPTION = 255
SPEC_KEY_RE = re.compile(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?")
R = TypeVar("R")
_ID_RE = re.compile(r"[0-9a-f]{32}")


def check_extra_specs(specs: Mapping[str, str], field: str = "extra_specs") -> dict[str, str]:
    """A type's extra specs, or INVALID_ARGUMENT naming the bad key."""
    if len(specs) > MAX_SPECS:
        raise InvalidArgument(field, f"at most {MAX_SPECS} extra specs")
    for key, value in specs.items():
        where = f"{field}[{key}]"
        if not (len(key) <= 255 and SPEC_KEY_RE.fullmatch(key)):
            raise InvalidArgument(
                where, "a key is [A-Za-z0-9_.-] with at most one scope: 'capabilities:name'"
            )
        if len(value) > 255 or not value.strip():
            raise InvalidArgument(where, "a value is 1-255 characters")
        scope, sep, _ = key.partition(":")
        if sep and scope not in scheduler.CAPABILITY_SCOPES:
            raise InvalidArgument(where, f"unknown scope {scope!r}: unscoped keys or 'capabilities:' only")
        if key in PROPERTY_SPECS and _flag(value) is None:
            raise InvalidArgument(where, "'<is> True' or '<is> False'")
    scheduler.compile_specs(specs)
    return dict(specs)


def _flag(value: str) -> bool | None:
    v = value.strip()
    if v.startswith("<is>"):
        v = v[4:].strip()
    low = v.lower()
    return True if low == "true" else False if low == "false" else None


def type_says(vtype: VolumeType | None, prop: str) -> bool:
    """Whether a volume of this type has the property (multiattach, encryption)."""
    return vtype is not None and _flag(vtype.extra_specs.get(prop, "")) is True


def check_qos(consumer: str, specs: Mapping[str, str], field: str = "specs") -> dict[str, str]:
    """QoS specs, or INVALID_ARGUMENT naming the bad key."""
    if consumer not in CONSUMERS:
        raise InvalidArgument("consumer", f"{validate.quote(consumer)}: one of {', '.join(CONSUMERS)}")
    for key, value in specs.items():
        where = f"{field}[{key}]"
        if key not in QOS_KEYS:
            raise InvalidArgument(where, f"unknown limit; one of {', '.join(QOS_KEYS)}")
        if not (value.isascii() and value.isdigit() and len(value) <= 19):
            raise InvalidArgument(
                where, f"{validate.quote(value)} is not a whole number of at most 19 digits"
            )
    for limit in QOS_LIMITS:
        if limit in specs and f"{limit}_per_gb" in specs:
            raise InvalidArgument(f"{field}[{limit}_per_gb]", f"give {limit} or {limit}_per_gb, not both")
    for unit in ("bytes", "iops"):
        totals = [k for k in specs if k.startswith(f"total_{unit}_sec")]
        rw = [k for k in specs if k.startswith((f"read_{unit}_sec", f"write_{unit}_sec"))]
        if totals and rw:
            raise InvalidArgument(
                f"{field}[{rw[0]}]", f"a total {unit} limit and a read or write one are exclusive (QEMU)"
            )
    return dict(specs)


def iotune(qos: QosSpecs | None, size_bytes: int) -> IoTune:
    """The front-end limits for a volume of `size_bytes` (per-GB limits times its GiB, rounded up)."""
    if qos is None or qos.consumer == "back-end":
        return IoTune()
    gib = -(-size_bytes // GIB)
    values = {}
    for limit in QOS_LIMITS:
        if limit in qos.specs:
            values[limit] = int(qos.specs[limit])
        elif f"{limit}_per_gb" in qos.specs:
            values[limit] = int(qos.specs[f"{limit}_per_gb"]) * gib
    return IoTune(**{k: min(v, (1 << 64) - 1) for k, v in values.items()})  # type: ignore[arg-type]


class VolumeTypes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # -- volume types

    def create_type(
        self, name: str, description: str, extra_specs: Mapping[str, str], qos_specs: str = ""
    ) -> VolumeType:
        ctx = self.ctx
        validate.name(name)
        _description(description)
        specs = check_extra_specs(extra_specs)
        with ctx.locks.hold(f"type:{name}", f"volume type {name}"):
            qos_id = self.qos(qos_specs, "qos_specs").id if qos_specs else ""
            existing = ctx.catalog.volume_type_by_name(name)
            if existing is not None:
                if (existing.description, dict(existing.extra_specs), existing.qos_specs_id) != (
                    description,
                    specs,
                    qos_id,
                ):
                    raise AlreadyExists(f"volume type {name} exists ({existing.id}) with other parameters")
                return existing
            now = ctx.now()
            vtype = VolumeType(
                id=ctx.new_id(),
                name=name,
                create_time=now,
                update_time=now,
                description=description,
                extra_specs=specs,
                qos_specs_id=qos_id,
            )
            try:
                ctx.catalog.insert_volume_type(vtype)
            except Conflict:
                raise AlreadyExists(f"volume type name {name} is taken") from None
            log.info("volume type %s (%s) created", vtype.id, name)
            return vtype

    def vtype(self, ref: str, field: str = "volume_type") -> VolumeType:
        """A type by id or name; NOT_FOUND when there is none."""
        found = self._find_type(ref, field)
        if found is None:
            raise NotFound(f"volume type {ref} does not exist")
        return found

    def _find_type(self, ref: str, field: str) -> VolumeType | None:
        catalog = self.ctx.catalog
        return _by_ref(
            ref, field, "a volume type's id or name", catalog.get_volume_type, catalog.volume_type_by_name
        )

    def page_types(self, page_size: int, page_token: str) -> Page[VolumeType]:
        return paging.listing(
            page_size, page_token, lambda after, n: self.ctx.catalog.list_volume_types(after=after, limit=n)
        )

    def update_type(
        self, ref: str, description: str | None, extra_specs: Mapping[str, str] | None
    ) -> VolumeType:
        """Replaces the description and/or the extra specs (None: kept). Volumes made before keep what
        they were given; new volumes get the new specs."""
        ctx = self.ctx
        if description is not None:
            _description(description)
        specs = check_extra_specs(extra_specs) if extra_specs is not None else None
        vtype = self.vtype(ref)
        with ctx.locks.hold(f"type:{vtype.name}", f"volume type {vtype.name}"):
            vtype = self.vtype(vtype.id)
            changed = replace(
                vtype,
                description=vtype.description if description is None else description,
                extra_specs=vtype.extra_specs if specs is None else specs,
            )
            if changed == vtype:
                return vtype
            changed = replace(changed, update_time=ctx.now())
            ctx.catalog.update_volume_type(changed)
            return changed

    def set_qos(self, ref: str, qos_ref: str) -> VolumeType:
        """Associates the type with QoS specs ("": none): a type has at most one."""
        ctx = self.ctx
        vtype = self.vtype(ref)
        with ctx.locks.hold(f"type:{vtype.name}", f"volume type {vtype.name}"):
            vtype = self.vtype(vtype.id)
            qos_id = self.qos(qos_ref, "qos_specs").id if qos_ref else ""
            if vtype.qos_specs_id == qos_id:
                return vtype
            changed = replace(vtype, qos_specs_id=qos_id, update_time=ctx.now())
            ctx.catalog.update_volume_type(changed)
            return changed

    def delete_type(self, ref: str) -> None:
        ctx = self.ctx
        vtype = self._find_type(ref, "volume_type")
        if vtype is None:
            return
        with ctx.locks.hold(f"type:{vtype.name}", f"volume type {vtype.name}"):
            if vtype.name == ctx.scheduler.default_volume_type:
                raise FailedPrecondition(
                    f"volume type {vtype.name} is the default ([scheduler] default_volume_type); "
                    "configure another first"
                )
            used = ctx.catalog.count_volumes_of_type(vtype.name)
            if not used:
                ctx.catalog.delete_volume_type(vtype.id)
                # A create of this type (here or on another node) may have recorded its volume between
                # the count and the delete: counted again after it, such a volume puts the type back
                # (the create, which looks for the type after recording its volume, may fail instead;
                # never both succeed)
                used = ctx.catalog.count_volumes_of_type(vtype.name)
                if used:
                    with contextlib.suppress(Conflict):  # a new type of the name: the volumes have one
                        ctx.catalog.insert_volume_type(vtype)
            if used:
                raise FailedPrecondition(
                    f"volume type {vtype.name} is used by {used} volume(s); delete them first"
                )
            log.info("volume type %s (%s) deleted", vtype.id, vtype.name)

    def for_create(self, name: str) -> VolumeType | None:
        """The type a new volume gets: the named one, else the configured default, else none."""
        if name:
            return self.vtype(name)
        default = self.ctx.scheduler.default_volume_type
        if not default:
            return None
        found = self.ctx.catalog.volume_type_by_name(default)
        if found is None:
            raise FailedPrecondition(
                f"the default volume type {default} ([scheduler] default_volume_type) does not exist; "
                "create it (blockwire type create) or name a type"
            )
        return found

    # -- QoS specs

    def create_qos(self, name: str, consumer: str, specs: Mapping[str, str]) -> QosSpecs:
        ctx = self.ctx
        validate.name(name)
        consumer = consumer or "front-end"
        limits = check_qos(consumer, specs)
        with ctx.locks.hold(f"qos:{name}", f"QoS specs {name}"):
            existing = ctx.catalog.qos_specs_by_name(name)
            if existing is not None:
                if (existing.consumer, dict(existing.specs)) != (consumer, limits):
                    raise AlreadyExists(f"QoS specs {name} exist ({existing.id}) with other limits")
                return existing
            now = ctx.now()
            qos = QosSpecs(
                id=ctx.new_id(), name=name, consumer=consumer, create_time=now, update_time=now, specs=limits
            )
            try:
                ctx.catalog.insert_qos_specs(qos)
            except Conflict:
                raise AlreadyExists(f"QoS specs name {name} is taken") from None
            log.info("QoS specs %s (%s) created", qos.id, name)
            return qos

    def qos(self, ref: str, field: str = "qos_specs") -> QosSpecs:
        found = self._find_qos(ref, field)
        if found is None:
            raise NotFound(f"QoS specs {ref} do not exist")
        return found

    def _find_qos(self, ref: str, field: str) -> QosSpecs | None:
        catalog = self.ctx.catalog
        return _by_ref(
            ref, field, "the id or name of QoS specs", catalog.get_qos_specs, catalog.qos_specs_by_name
        )

    def page_qos(self, page_size: int, page_token: str) -> Page[QosSpecs]:
        return paging.listing(
            page_size, page_token, lambda after, n: self.ctx.catalog.list_qos_specs(after=after, limit=n)
        )

    def update_qos(self, ref: str, consumer: str, specs: Mapping[str, str] | None) -> QosSpecs:
        """Replaces the consumer ("": kept) and/or the limits (None: kept). Attachments made before keep
        their limits; new attachments get the new ones."""
        ctx = self.ctx
        qos = self.qos(ref)
        with ctx.locks.hold(f"qos:{qos.name}", f"QoS specs {qos.name}"):
            qos = self.qos(qos.id)
            new_consumer = consumer or qos.consumer
            limits = check_qos(new_consumer, qos.specs if specs is None else specs)
            if (new_consumer, limits) == (qos.consumer, dict(qos.specs)):
                return qos
            changed = replace(qos, consumer=new_consumer, specs=limits, update_time=ctx.now())
            ctx.catalog.update_qos_specs(changed)
            return changed

    def delete_qos(self, ref: str) -> None:
        ctx = self.ctx
        qos = self._find_qos(ref, "qos_specs")
        if qos is None:
            return
        with ctx.locks.hold(f"qos:{qos.name}", f"QoS specs {qos.name}"):
            users = ctx.catalog.list_volume_types(after=None, limit=5, qos_specs_id=qos.id)
            if users:
                raise FailedPrecondition(
                    f"QoS specs {qos.name} are associated with volume type(s) "
                    f"{', '.join(t.name for t in users)}; disassociate them first"
                )
            ctx.catalog.delete_qos_specs(qos.id)
            log.info("QoS specs %s (%s) deleted", qos.id, qos.name)

    # -- what reaches an attachment

    def iotune_of(self, volume: Volume) -> IoTune:
        """The front-end limits of the volume's type's QoS specs, for its size now (none: no limits)."""
        if not volume.volume_type:
            return IoTune()
        vtype = self.ctx.catalog.volume_type_by_name(volume.volume_type)
        if vtype is None or not vtype.qos_specs_id:
            return IoTune()
        return iotune(self.ctx.catalog.get_qos_specs(vtype.qos_specs_id), volume.size_bytes)


def _description(text: str) -> None:
    if len(text) > MAX_DESCRIPTION or not text.isprintable():
        raise InvalidArgument("description", f"at most {MAX_DESCRIPTION} printable characters")


def _by_ref(
    ref: str, field: str, what: str, by_id: Callable[[str], R | None], by_name: Callable[[str], R | None]
) -> R | None:
    """A record by its id (when `ref` looks like one) or else by its name; INVALID_ARGUMENT naming
    `field` for an empty or malformed reference."""
    if not ref:
        raise InvalidArgument(field, f"required: {what}")
    found = by_id(ref) if _ID_RE.fullmatch(ref) else None
    if found is None:
        validate.name(ref, field)
        found = by_name(ref)
    return found
