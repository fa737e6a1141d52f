"""FakeMultipathd: multipathd and multipath behind the Runner seam (a FakeRunner), over a fake sysfs tree.

`multipath -a WWID` remembers the WWID; `multipathd add path DEV` puts DEV into the map of its WWID (read
from block/DEV/wwid, as multipathd reads udev's ID_WWN = the sysfs wwid of an NVMe namespace), making the
map when there is none: block/dm-N with dm/name ("mpatha", ...), dm/uuid ("mpath-<WWID>"), slaves/DEV,
block/DEV/holders/dm-N, and a udev device with DM_UUID and DM_NAME. `multipath -f NAME` removes the map
("map in use" while `openers` holds it); `multipathd resize map NAME` takes the size of its first path.
`auto`: like find_multipaths no, every unmapped device of `pattern` that udev has gets mapped after any
trigger (multipathd reacting to udev's add event: once per device; a flushed map is not made again).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hostagent.host.udev import UdevDevice
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.openers import FakeOpeners
from tests.fakes.udev import FakeUdev


@dataclass
class FakeMultipathd:
    root: Path  # the fake /sys
    udev: FakeUdev
    runner: FakeRunner
    openers: FakeOpeners
    auto: bool = False
    pattern: str = r"nvme\d+n\d+"
    allowed: list[str] = field(default_factory=list)
    made: int = 0
    seen: set[str] = field(default_factory=set)  # devices multipathd had its add event of

    def __post_init__(self) -> None:
        self.runner.on(r"^multipath -a ", lambda argv: self._allow(argv[-1]))
        self.runner.on(r"^multipathd add path ", lambda argv: self._add(argv[-1]))
        self.runner.on(r"^multipath -f ", lambda argv: self._flush(argv[-1]))
        self.runner.on(r"^multipathd resize map ", lambda argv: self._resize(argv[-1]))
        self.udev.on_trigger.append(lambda _u: self._auto())

    def maps(self) -> dict[str, list[str]]:
        """name -> its paths, of every map there is."""
        out = {}
        for dm in sorted((self.root / "block").glob("dm-*")):
            out[(dm / "dm/name").read_text().strip()] = sorted(p.name for p in (dm / "slaves").iterdir())
        return out

    def _allow(self, wwid: str) -> Reply:
        self.allowed.append(wwid)
        return Reply(0, f"wwid '{wwid}' added\n")

    def _dm_of(self, wwid: str) -> Path | None:
        for dm in (self.root / "block").glob("dm-*"):
            if (dm / "dm/uuid").read_text().strip() == f"mpath-{wwid}":
                return dm
        return None

    def _add(self, dev: str) -> Reply:
        b = self.root / "block" / dev
        if not b.is_dir():
            return Reply(1, "", f"blacklisted or missing: {dev}\n")
        wwid = (b / "wwid").read_text().strip()
        dm = self._dm_of(wwid)
        if dm is None:
            n = self.made
            self.made += 1
            name = "mpath" + "abcdefghijklmnopqrstuvwxyz"[n % 26]
            dm = self.root / "block" / f"dm-{n}"
            (dm / "dm").mkdir(parents=True)
            (dm / "slaves").mkdir()
            (dm / "holders").mkdir()
            (dm / "dm/name").write_text(name + "\n")
            (dm / "dm/uuid").write_text(f"mpath-{wwid}\n")
            (dm / "size").write_text((b / "size").read_text())
            self.udev.add(
                UdevDevice(
                    sys_name=dm.name,
                    sys_path=f"/sys/devices/virtual/block/{dm.name}",
                    properties={"DM_UUID": f"mpath-{wwid}", "DM_NAME": name},
                )
            )
        (dm / "slaves" / dev).mkdir(exist_ok=True)
        (b / "holders").mkdir(exist_ok=True)
        (b / "holders" / dm.name).mkdir(exist_ok=True)
        return Reply(0, "ok\n")

    def _flush(self, name: str) -> Reply:
        for dm in (self.root / "block").glob("dm-*"):
            if (dm / "dm/name").read_text().strip() == name:
                if self.openers.held.get(dm.name):
                    return Reply(1, "", f"{name}: map in use\n")
                for p in (dm / "slaves").iterdir():
                    shutil.rmtree(self.root / "block" / p.name / "holders" / dm.name, ignore_errors=True)
                shutil.rmtree(dm)
                self.udev.remove(dm.name)
                return Reply(0)
        return Reply(1, "", f"{name}: map doesn't exist\n")

    def _resize(self, name: str) -> Reply:
        for dm in (self.root / "block").glob("dm-*"):
            if (dm / "dm/name").read_text().strip() == name:
                first = sorted(p.name for p in (dm / "slaves").iterdir())[0]
                (dm / "size").write_text((self.root / "block" / first / "size").read_text())
                return Reply(0, "ok\n")
        return Reply(1, "", "fail\n")

    def _auto(self) -> None:
        if not self.auto:
            return
        for b in sorted((self.root / "block").iterdir()):
            if re.fullmatch(self.pattern, b.name) and b.name not in self.seen:
                self.seen.add(b.name)
                self._add(b.name)
