"""The scheduler: which backend a new volume goes to (Cinder's filter scheduler, without a message bus).

`rank(candidates, request)` keeps the backends that pass every filter and orders them best first:

Filters, in this order (a backend is dropped by the first it fails):
1. **node up**: a backend whose storage node stopped heartbeating (`up=False`) takes nothing.
2. **backend**: an explicit `request.backend` (or the extra spec `volume_backend_name`) keeps only it.
3. **availability zone**: `request.availability_zone` (or the extra spec `availability_zone`), when
   set, must equal the backend's.
4. **capabilities**: every extra spec that is unscoped (`thin_provisioning`) or scoped
   `capabilities:` (`capabilities:transport`) must hold for the backend's capability of that name;
   a backend without the capability fails. Specs of other scopes (`qos:`, `blockwire:`, ...) are the
   volume's properties, not placement rules, and are ignored here. Operators (`spec_matches`):
   `<is> True|False`, `==`/`!=`/`>=`/`<=`/`>`/`<` (numbers), `s==`/`s!=` (strings), `<in> X`
   (X is a substring of the capability), `<or> A <or> B` (one of); a plain value is string equality
   (booleans compared case-insensitively).
5. **capacity**: a thin backend (capability `thin_provisioning` true) may provision up to
   `total_bytes * max_over_subscription_ratio`; a thick one needs `size_bytes` of free space.

Weighers (`weigher`): "free_capacity" (the default) orders by the room left after the volume (thin:
`total * ratio - provisioned`; thick: `free`) descending, then by volume count ascending, then by
backend and node name; "volume_count" orders by volume count first, then room, then name. The same
input always gives the same order.

When nothing passes, the error says why, counting every backend per reason: RESOURCE_EXHAUSTED when
some backend failed only for capacity, FAILED_PRECONDITION otherwise (no backend up, none in the zone,
none with the capabilities asked for), INVALID_ARGUMENT for a malformed extra spec or an unknown
explicit backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from blockwire.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

WEIGHERS = ("free_capacity", "volume_count")
#: Extra spec scopes the capabilities filter reads (the empty scope is an unscoped key).
CAPABILITY_SCOPES = ("", "capabilities")
#: Extra specs that select placement directly rather than through a capability.
BACKEND_NAME_SPEC = "volume_backend_name"
ZONE_SPEC = "availability_zone"
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})
_NUMERIC_OPS = ("==", "!=", ">=", "<=", ">", "<")
_STRING_OPS = ("s==", "s!=")


@dataclass(frozen=True)
class BackendState:
    """One backend as the scheduler sees it."""

    node: str  # storage node name ("" on a single-node service)
    backend: str  # backend name (unique across the cluster)
    total_bytes: int
    free_bytes: int
    provisioned_bytes: int
    volume_count: int
    capabilities: Mapping[str, str]  # e.g. {"thin_provisioning": "true", "multiattach": "true", ...}
    availability_zone: str
    up: bool
    max_over_subscription_ratio: float = 1.0


@dataclass(frozen=True)
class PlacementRequest:
    size_bytes: int
    extra_specs: Mapping[str, str]  # from the volume type ("" type: {})
    availability_zone: str = ""  # "" = any
    backend: str = ""  # an explicit backend ("" = scheduler picks)


Predicate = Callable[[str], bool]


def _truth(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in _TRUE else False if v in _FALSE else None


def _number(text: str, key: str) -> float:
    try:
        n = float(text)
    except ValueError:
        raise InvalidArgument(f"extra_specs[{key}]", f"{text!r} is not a number") from None
    if math.isnan(n):
        raise InvalidArgument(f"extra_specs[{key}]", "NaN is not a number to compare with")
    return n


def _capability_number(value: str) -> float | None:
    try:
        n = float(value)
    except ValueError:
        return None
    return None if math.isnan(n) else n


def spec_matches(key: str, spec: str) -> Predicate:  # noqa: PLR0911 - one branch per operator
    """A predicate on a capability's value for one extra spec; INVALID_ARGUMENT naming the key when the
    spec is malformed (checked once per request, not per backend)."""
    where = f"extra_specs[{key}]"
    text = spec.strip()
    op, _, rest = text.partition(" ")
    rest = rest.strip()
    if op == "<is>":
        want = _truth(rest)
        if want is None:
            raise InvalidArgument(where, f"<is> takes True or False, not {rest!r}")
        return lambda value: _truth(value) is want
    if op in _NUMERIC_OPS:
        n = _number(rest, key)
        compare: dict[str, Callable[[float], bool]] = {
            "==": lambda v: v == n,
            "!=": lambda v: v != n,
            ">=": lambda v: v >= n,
            "<=": lambda v: v <= n,
            ">": lambda v: v > n,
            "<": lambda v: v < n,
        }
        cmp = compare[op]

        def numeric(value: str) -> bool:
            v = _capability_number(value)
            return v is not None and cmp(v)

        return numeric
    if op in _STRING_OPS:
        return (lambda value: value == rest) if op == "s==" else (lambda value: value != rest)
    if op == "<in>":
        if not rest:
            raise InvalidArgument(where, "<in> needs a value")
        return lambda value: rest in value
    if op == "<or>":
        choices = frozenset(c.strip() for c in text.split("<or>") if c.strip())
        if not choices:
            raise InvalidArgument(where, "<or> needs values: '<or> a <or> b'")
        return lambda value: value in choices
    if text.startswith("<"):
        raise InvalidArgument(
            where, f"unknown operator in {text!r}: use <is>, ==, !=, >=, <=, >, <, s==, s!=, <in> or <or>"
        )
    want_bool = _truth(text)
    if want_bool is not None:
        return lambda value: _truth(value) is want_bool
    return lambda value: value == text


def capability_key(key: str) -> str | None:
    """The capability an extra spec constrains, or None when the spec is not a placement rule."""
    scope, sep, name = key.partition(":")
    if not sep:
        return None if key in (BACKEND_NAME_SPEC, ZONE_SPEC) else key
    return name if scope in CAPABILITY_SCOPES and name else None


def compile_specs(extra_specs: Mapping[str, str]) -> list[tuple[str, str, Predicate]]:
    """(spec key, capability, predicate) for every placement extra spec; INVALID_ARGUMENT naming a
    malformed one. Used to check a volume type's specs when it is written, too."""
    out = []
    for key in sorted(extra_specs):
        cap = capability_key(key)
        if cap is not None:
            out.append((key, cap, spec_matches(key, extra_specs[key])))
    return out


def is_thin(b: BackendState) -> bool:
    return _truth(b.capabilities.get("thin_provisioning", "")) is True


def room(b: BackendState) -> int:
    """Bytes a new volume may still take: thin ones against the over-subscribed total."""
    if is_thin(b):
        return int(b.total_bytes * max(b.max_over_subscription_ratio, 1.0)) - b.provisioned_bytes
    return b.free_bytes


def rank(
    candidates: Sequence[BackendState], request: PlacementRequest, *, weigher: str = "free_capacity"
) -> list[BackendState]:
    """The backends that pass every filter, best first; deterministic for the same input.
    Raises ResourceExhausted / FailedPrecondition (blockwire.errors) naming why none passed."""
    if weigher not in WEIGHERS:
        raise InvalidArgument("weigher", f"{weigher!r}: one of {', '.join(WEIGHERS)}")
    if request.size_bytes < 0:
        raise InvalidArgument("size_bytes", f"{request.size_bytes} is negative")
    specs = request.extra_specs
    backend = request.backend
    named = specs.get(BACKEND_NAME_SPEC, "").strip()
    if backend and named and backend != named:
        raise InvalidArgument(
            "backend", f"{backend!r} is not the backend the volume type names ({BACKEND_NAME_SPEC}={named!r})"
        )
    backend = backend or named
    if backend and not any(c.backend == backend for c in candidates):
        have = ", ".join(sorted(c.backend for c in candidates)[:20])
        raise InvalidArgument("backend", f"unknown backend {backend!r} (have: {have})")
    zone = request.availability_zone or specs.get(ZONE_SPEC, "").strip()
    rejected = _Rejected(request, zone)
    passed = _filter(candidates, request, backend, zone, rejected)
    if not passed:
        raise rejected.error()
    if weigher == "volume_count":
        passed.sort(key=lambda p: (p[1].volume_count, -p[0], p[1].backend, p[1].node))
    else:
        passed.sort(key=lambda p: (-p[0], p[1].volume_count, p[1].backend, p[1].node))
    return [b for _, b in passed]


def _filter(
    candidates: Sequence[BackendState],
    request: PlacementRequest,
    backend: str,
    zone: str,
    rejected: _Rejected,
) -> list[tuple[int, BackendState]]:
    """(room, backend) of each candidate that passes the filters; the others go to `rejected`."""
    checks = compile_specs(request.extra_specs)
    seen: dict[tuple[int, str], bool] = {}  # (check, capability value) -> passed: values repeat a lot
    size = request.size_bytes
    passed: list[tuple[int, BackendState]] = []
    for b in candidates:
        if backend and b.backend != backend:
            continue
        if not b.up:
            rejected.down.append(b.backend)
            continue
        if zone and b.availability_zone != zone:
            rejected.other_zone.append(b.backend)
            continue
        failed = _failed_spec(checks, b.capabilities, seen)
        if failed:
            rejected.lacking.setdefault(failed, []).append(b.backend)
            continue
        left = room(b)
        if left < size:
            rejected.full.append(b.backend)
            continue
        passed.append((left, b))
    return passed


def _failed_spec(
    checks: list[tuple[str, str, Predicate]], caps: Mapping[str, str], seen: dict[tuple[int, str], bool]
) -> str:
    """The first extra spec the capabilities fail ("" when none)."""
    for i, (key, cap, ok) in enumerate(checks):
        value = caps.get(cap)
        if value is None:
            return key
        hit = seen.get((i, value))
        if hit is None:
            hit = seen[(i, value)] = ok(value)
        if not hit:
            return key
    return ""


def _names(backends: list[str]) -> str:
    shown = ", ".join(sorted(backends)[:5])
    return shown + (f" and {len(backends) - 5} more" if len(backends) > 5 else "")


@dataclass
class _Rejected:
    """The backends each filter dropped, to say why nothing passed."""

    request: PlacementRequest
    zone: str
    down: list[str] = field(default_factory=list)
    other_zone: list[str] = field(default_factory=list)
    lacking: dict[str, list[str]] = field(default_factory=dict)  # by extra spec key
    full: list[str] = field(default_factory=list)

    def error(self) -> ResourceExhausted | FailedPrecondition:
        reasons = []
        if self.down:
            reasons.append(f"{len(self.down)} down ({_names(self.down)})")
        if self.other_zone:
            reasons.append(
                f"{len(self.other_zone)} not in availability zone {self.zone!r} ({_names(self.other_zone)})"
            )
        for key in sorted(self.lacking):
            spec = self.request.extra_specs[key]
            reasons.append(f"{len(self.lacking[key])} without {key}={spec!r} ({_names(self.lacking[key])})")
        if self.full:
            reasons.append(
                f"{len(self.full)} without room for {self.request.size_bytes} bytes ({_names(self.full)})"
            )
        message = "no backend can take the volume: " + ("; ".join(reasons) or "no backends")
        return ResourceExhausted(message) if self.full else FailedPrecondition(message)


@dataclass(frozen=True)
class SchedulerSettings:
    """How this service places volumes: `[scheduler]` and the per-backend zone and capabilities."""

    max_attempts: int = 3
    weigher: str = "free_capacity"
    #: The `[service] default_backend` an operator configured ("": the scheduler places volumes that
    #: name no backend; with one backend that is always it).
    default_backend: str = ""
    default_volume_type: str = ""
    zones: Mapping[str, str] = field(default_factory=dict, hash=False)
    capabilities: Mapping[str, Mapping[str, str]] = field(default_factory=dict, hash=False)
    ratios: Mapping[str, float] = field(default_factory=dict, hash=False)  # oversubscription_ratio
