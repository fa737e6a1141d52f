"""FakeExporter: an in-memory target side for the unit and contract tiers (no daemon)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from blockwire.errors import Unavailable
from storagesvc.targets.base import LunState, TargetSpec, TargetState


@dataclass
class FakeTarget:
    spec: TargetSpec
    initiators: set[str] = field(default_factory=set)
    lun: LunState | None = None  # None: lost (ensure_target makes it from the spec)


class FakeExporter:
    """Records targets and ACLs like a real exporter would; `fail_on` makes one operation fail once."""

    kind = "fake"
    lun = 1

    def __init__(self, portals: tuple[str, ...] = ("127.0.0.1:3260", "127.0.0.2:3260")) -> None:
        self.portals = portals
        self.targets: dict[str, FakeTarget] = {}
        self.fail_on: set[str] = set()
        self.calls: list[str] = []
        self.started = 0
        self._lock = threading.Lock()

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if op in self.fail_on:
            self.fail_on.discard(op)
            raise Unavailable(f"fake exporter: {op} failed")

    def start(self) -> None:
        self.started += 1

    def healthy(self) -> bool:
        return True

    def ensure_target(self, spec: TargetSpec) -> None:
        with self._lock:
            self._maybe_fail("ensure_target")
            t = self.targets.get(spec.target_iqn)
            if t is None:
                t = self.targets[spec.target_iqn] = FakeTarget(spec)
            t.spec = spec
            t.lun = self._lun(spec)

    def remove_target(self, target_iqn: str) -> None:
        with self._lock:
            self._maybe_fail("remove_target")
            self.targets.pop(target_iqn, None)

    def allow(self, spec: TargetSpec, initiator_iqn: str) -> None:
        with self._lock:
            self._maybe_fail("allow")
            t = self.targets.get(spec.target_iqn)
            if t is None:
                raise Unavailable(f"fake exporter: no target {spec.target_iqn}")
            t.initiators.add(initiator_iqn)

    def deny(self, target_iqn: str, initiator_iqn: str) -> None:
        with self._lock:
            self._maybe_fail("deny")
            t = self.targets.get(target_iqn)
            if t is not None:
                t.initiators.discard(initiator_iqn)

    def resize(self, spec: TargetSpec) -> None:
        with self._lock:
            self._maybe_fail("resize")
            t = self.targets[spec.target_iqn]
            t.spec = spec
            t.lun = self._lun(spec)

    def list_targets(self, prefix: str) -> list[TargetState]:
        with self._lock:
            found = [(iqn, t) for iqn, t in self.targets.items() if iqn.startswith(prefix)]
            return [TargetState(iqn, tuple(sorted(t.initiators)), t.lun) for iqn, t in found]

    def _lun(self, spec: TargetSpec) -> LunState:
        return LunState(self.lun, spec.device_path, spec.wwn, spec.serial, True, spec.readonly)
