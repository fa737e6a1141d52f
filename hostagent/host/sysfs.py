"""Sysfs(root): every read and write under /sys goes through here (STYLE.md rules 1 and 2).

The root is injectable: unit tests build a tree under tmp_path and pass `Sysfs(tmp_path)`. Paths are
given relative to the sysfs root ("block/sdc/device/wwid"), never absolute.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from blockwire.errors import Unavailable

log = logging.getLogger(__name__)


class Sysfs:
    """Reads and writes sysfs attributes below `root` (default /sys)."""

    def __init__(self, root: str | Path = "/sys") -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def read(self, rel: str) -> str | None:
        """The attribute's content stripped, or None when it does not exist (the device went away)."""
        try:
            return self.path(rel).read_text(errors="replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.debug("reading %s failed: %s", rel, exc)
            return None

    def write(self, rel: str, value: str) -> None:
        """Writes `value` to an attribute (a rescan, a delete). A missing attribute is Unavailable."""
        target = self.path(rel)
        log.debug("write %r > %s", value, target)
        try:
            with open(target, "w") as f:
                f.write(value)
        except FileNotFoundError as exc:
            raise Unavailable(f"{target} does not exist") from exc
        except OSError as exc:
            raise Unavailable(f"writing {value!r} to {target} failed: {exc.strerror}") from exc

    def listdir(self, rel: str) -> list[str]:
        """Entries of a sysfs directory, sorted; empty when it does not exist."""
        try:
            return sorted(os.listdir(self.path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def glob(self, pattern: str) -> list[str]:
        """Paths relative to the root matching a glob pattern, sorted."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(pattern))

    def link_name(self, rel: str) -> str | None:
        """The last component of a symlink's target (sysfs links such as block/sdc/device/driver)."""
        try:
            return os.path.basename(os.readlink(self.path(rel)))
        except OSError:
            return None

    def block_size_bytes(self, name: str) -> int | None:
        """Size of block device `name` ("sdc", "dm-3") in bytes; /sys/class/block/*/size is in 512 B units."""
        value = self.read(f"class/block/{name}/size")
        if value is None or not value.isdigit():
            return None
        return int(value) * 512
