"""Volume identity (STYLE.md rule 7): the device found must be the LUN storage announced.

WWNs are compared in one normal form: lower-case hex, without the "naa."/"eui."/"0x" prefix that
sysfs (`/sys/block/sdX/device/wwid` = "naa.6001405..."), udev (ID_WWN_WITH_EXTENSION = "0x6001405...")
and multipath (WWID "36001405...", the leading "3" being the NAA designator type) add.
"""

from __future__ import annotations

from blockwire.errors import IdentityMismatch
from blockwire.validate import WWN_PREFIXES


def normalize_wwn(value: str) -> str:
    v = value.strip().lower()
    for p in WWN_PREFIXES:
        if v.startswith(p):
            v = v[len(p) :]
            break
    return v.replace("0x", "").replace(":", "").replace("-", "")


def wwn_from_wwid(wwid: str) -> str:
    """multipath/udev ID_SERIAL WWID ("36001405...") to a WWN: drops the leading designator type "3"."""
    w = wwid.strip().lower()
    return w[1:] if len(w) in (17, 33) and w.startswith("3") else normalize_wwn(w)


def same_wwn(expected: str, actual: str) -> bool:
    return bool(actual) and normalize_wwn(expected) == normalize_wwn(actual)


def verify_wwn(expected: str, actual: str, where: str) -> None:
    """Raises IdentityMismatch unless `actual` is the announced WWN (an empty expectation checks nothing)."""
    if not expected:
        return
    if not same_wwn(expected, actual):
        raise IdentityMismatch(
            f"{where} has WWN {normalize_wwn(actual) or '(none)'} but storage announced "
            f"{normalize_wwn(expected)}: refused (the LUN may have been reused); nothing was attached"
        )
