"""Sizes as people write them: ``10G``, ``512M``, ``1.5T``, ``4096``.

Units are binary (1K = 1024 bytes, 1G = 2**30), as in ``qemu-img`` and ``lvcreate``; ``G``, ``Gi``,
``GiB`` and ``GB`` all mean 2**30, case-insensitively. A bare number is bytes.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Final

from blockwire.errors import InvalidArgument

_UNITS: Final = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?:(?P<unit>[KMGTPE])(?:IB|I|B)?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str, field: str = "size") -> int:
    """Bytes for ``10G``, ``512M``, ``1.5T``, ``4096`` or ``4096B``; raises `InvalidArgument` otherwise.

    >>> parse_size("10G")
    10737418240
    >>> parse_size("512M")
    536870912
    """
    m = _SIZE.match(text)
    if m is None:
        raise InvalidArgument(field, f"{text!r} is not a size; write e.g. 10G, 512M or a number of bytes")
    unit = (m["unit"] or "").upper()
    try:
        value = Decimal(m["num"]) * (1024 ** _UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimal numbers
        raise InvalidArgument(field, f"{text!r} is not a size") from None
    if value != value.to_integral_value():
        raise InvalidArgument(field, f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """A short binary size: ``10GiB``, ``1.5GiB``, ``512MiB``, ``4096B``.

    >>> format_size(10 * 2**30)
    '10GiB'
    """
    if size < 1024:
        return f"{size}B"
    for unit in ("EiB", "PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = 1024 ** ("KMGTPE".index(unit[0]) + 1)
        if size >= scale:
            value = size / scale
            text = f"{value:.2f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{size}B"  # pragma: no cover - unreachable
