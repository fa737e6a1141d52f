"""The `blockwire-agent` daemon."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the daemon."""
    print("not yet implemented", file=sys.stderr)
    return 2
