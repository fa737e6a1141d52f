"""multipath-tools: multipathd and multipath, run through the injected Runner; `parse_*` are pure."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from blockwire.runtime.executor import CommandFailed, Runner

MAPS_FORMAT = "%n %w %d %N"
PATHS_FORMAT = "%d %w %t %T %o %i"


@dataclass(frozen=True)
class MapInfo:
    name: str
    wwid: str
    sysfs: str  # "dm-0"
    paths: int


@dataclass(frozen=True)
class PathInfo:
    dev: str
    wwid: str
    dm_state: str
    checker: str
    dev_state: str
    hcil: str


@dataclass(frozen=True)
class LlMap:
    """A map of `multipath -ll`."""

    name: str
    wwid: str
    sysfs: str
    size: str
    paths: tuple[tuple[str, str, str], ...]  # (hcil, dev, "active ready running")


def _rows(text: str) -> list[list[str]]:
    lines = [line.split() for line in text.splitlines() if line.strip()]
    return lines[1:] if lines and lines[0][0] in ("name", "dev") else lines


def parse_show_maps(text: str) -> list[MapInfo]:
    """`multipathd show maps format '%n %w %d %N'`."""
    return [MapInfo(r[0], r[1], r[2], int(r[3])) for r in _rows(text) if len(r) >= 4 and r[3].isdigit()]


_HCIL = re.compile(r"\d+:\d+:\d+:\d+")


def parse_show_paths(text: str) -> list[PathInfo]:
    """`multipathd show paths format '%d %w %t %T %o %i'`. Rows in another layout (the default one starts
    with the H:C:T:L) are not taken for ours: only rows whose sixth field is an H:C:T:L count."""
    return [PathInfo(*r[:6]) for r in _rows(text) if len(r) >= 6 and _HCIL.fullmatch(r[5])]


# The WWID of a SCSI disk is hex ("3600140..."), of an NVMe namespace its sysfs wwid ("uuid.3b9e2f4a-...",
# "eui.7a1b...": tests/data/recorded/nvme_mp_multipath_ll.txt).
_LL_HEAD = re.compile(r"^(?P<name>\S+) \((?P<wwid>[^()\s]+)\) (?P<dm>dm-\d+)")
_LL_PATH = re.compile(r"(?P<hcil>\d+:\d+:\d+:\d+) (?P<dev>\w+) \d+:\d+\s+(?P<state>.+?)\s*$")


def parse_multipath_ll(text: str) -> list[LlMap]:
    maps: list[LlMap] = []
    for line in text.splitlines():
        if m := _LL_HEAD.match(line):
            maps.append(LlMap(m["name"], m["wwid"], m["dm"], "", ()))
        elif maps and line.startswith("size="):
            maps[-1] = replace(maps[-1], size=line.split()[0][5:])
        elif maps and (p := _LL_PATH.search(line)):
            maps[-1] = replace(maps[-1], paths=(*maps[-1].paths, (p["hcil"], p["dev"], p["state"])))
    return maps


class Multipath:
    def __init__(self, runner: Runner, *, timeout: float = 30.0) -> None:
        self.runner = runner
        self.timeout = timeout

    def allow_wwid(self, wwid: str) -> None:
        """`multipath -a WWID`: a map for this WWID even with one path (find_multipaths)."""
        self.runner.run(["multipath", "-a", wwid], timeout=self.timeout)

    def add_path(self, dev: str) -> None:
        self.runner.run(["multipathd", "add", "path", dev], timeout=self.timeout)

    def show_maps(self) -> list[MapInfo]:
        out = self.runner.run(["multipathd", "show", "maps", "format", MAPS_FORMAT], timeout=self.timeout)
        return parse_show_maps(out.stdout)

    def show_paths(self) -> list[PathInfo]:
        out = self.runner.run(["multipathd", "show", "paths", "format", PATHS_FORMAT], timeout=self.timeout)
        return parse_show_paths(out.stdout)

    def resize(self, name: str) -> None:
        self.runner.run(["multipathd", "resize", "map", name], timeout=self.timeout)

    def flush(self, name: str) -> bool:
        """`multipath -f NAME`; False when there was no such map."""
        try:
            self.runner.run(["multipath", "-f", name], timeout=self.timeout)
        except CommandFailed as exc:
            if "not a multipath device" in exc.stderr or "doesn't exist" in exc.stderr:
                return False
            raise
        return True
