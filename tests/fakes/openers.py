"""FakeOpeners: who holds which block device open, as a test says (the real one reads /proc)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class FakeOpeners:
    """`held`: device ("sdc", "dm-0") -> phrases ("process 4242 (sleep) holds it open")."""

    held: dict[str, list[str]] = field(default_factory=dict)
    asked: list[tuple[str, ...]] = field(default_factory=list)

    def hold(self, dev: str, pid: int = 4242, comm: str = "sleep") -> None:
        self.held.setdefault(dev, []).append(f"process {pid} ({comm}) holds it open")

    def release(self, dev: str) -> None:
        self.held.pop(dev, None)

    def users(self, devs: Collection[str]) -> dict[str, list[str]]:
        self.asked.append(tuple(sorted(devs)))
        return {d: list(self.held[d]) for d in devs if self.held.get(d)}
