"""FakeOpeners: who holds which block device open, as a test says (the real one reads /proc)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class FakeOpeners:
    """`held`: device ("sdc", "dm-0") -> phrases ("process 4242 (sleep) holds it open")."""

    held: dict[str, list[str]] = field(default_factory=dict)
    asked: list[tuple[str, ...]] = field(default_factory=list)
    # device -> how many more times it is reported held before its holder lets go (a closing QEMU)
    lets_go: dict[str, int] = field(default_factory=dict)

    def hold(self, dev: str, pid: int = 4242, comm: str = "sleep", *, asks: int | None = None) -> None:
        """`asks`: the holder lets go after being seen that many times."""
        self.held.setdefault(dev, []).append(f"process {pid} ({comm}) holds it open")
        if asks is not None:
            self.lets_go[dev] = asks

    def release(self, dev: str) -> None:
        self.held.pop(dev, None)

    def users(self, devs: Collection[str]) -> dict[str, list[str]]:
        self.asked.append(tuple(sorted(devs)))
        found = {d: list(self.held[d]) for d in devs if self.held.get(d)}
        for dev in found.keys() & self.lets_go.keys():
            self.lets_go[dev] -= 1
            if self.lets_go[dev] <= 0:
                del self.lets_go[dev]
                self.release(dev)
        return found
