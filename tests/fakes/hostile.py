"""Hostile values and status checks for the property tests (tests/contract/test_hostile_*.py)."""

from __future__ import annotations

import re

import grpc
from hypothesis import strategies as st

MIB = 1 << 20
HUGE = 1_000_000

# What an answer to a hostile request may be. INTERNAL and UNKNOWN never: they mean a bug.
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MAX_DETAILS = 2048  # a status message never echoes a huge input back

NASTY = [
    "",
    " ",
    "..",
    "../",
    "../../../etc/passwd",
    "/dev/../etc/shadow",
    "/srv/images/../../etc/shadow",
    "a\x00b",
    "\x00",
    "x\n",
    "a\nb",
    "\r\n",
    "\t",
    "\x7f",
    "\x1b[31m",
    "\u202eevil",  # right-to-left override
    "e\u0301\u0301\u0301",  # combining characters
    "\ufeff",
    "\U0001f4a9",
    "<disk type='block'/>",
    "</source><source dev='/etc/shadow'/>",
    "&amp;&lt;",
    "'\"",
    "]]>",
    "a;rm -rf /",
    "$(reboot)",
    "`id`",
    "a|b",
    "a&b",
    "a b",
    "${IFS}",
    "-rf",
    "--help",
    "--op delete --mode system",
    "%s%n%x",
    "{}",
    "\\",
    "iqn.2026-01.io.example:a;b",
    "iqn.2026-01.io.example\n",
    "iqn.2026-01.io.example:`id`",
    "iqn.2026-01.io.example:$(id)",
    "iqn.2026-01.io.example:a b",
    "iqn.2026-01.io.example:a\x00",
    "iqn.2026-01.io.example:\u202e",
    "eui.0123456789abcdef\n",
    "127.0.0.1:3260;id",
    "127.0.0.1:3260\n",
    "[::1]:3260",
    "::1",
    "1.2.3.4:0",
    "1.2.3.4:99999",
    "evil.example:3260",
    "A" * 64,
    "a" * 256,
    "A" * HUGE,
    "../" * (HUGE // 3),
    "é" * (HUGE // 2),
    "<" * HUGE,
]

hostile_text = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=80),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=400),
)
hostile_size = st.one_of(
    st.sampled_from([0, 1, MIB - 1, MIB + 1, 2**63, 2**64 - 1, 2**64 - MIB, (1 << 60) + MIB, 1 << 61]),
    st.integers(min_value=0, max_value=2**64 - 1),
)
hostile_u32 = st.one_of(
    st.sampled_from([0, 1, 255, 256, 16383, 16384, 65535, 2**31, 2**32 - 1]),
    st.integers(min_value=0, max_value=2**32 - 1),
)


def check_status(err: grpc.RpcError | None, allowed: set[grpc.StatusCode], fields: tuple[str, ...]) -> None:
    """The answer is in `allowed`, never INTERNAL/UNKNOWN; an INVALID_ARGUMENT names one of `fields`."""
    if err is None:
        assert grpc.StatusCode.OK in allowed
        return
    code, details = err.code(), err.details() or ""
    assert code not in NEVER, f"{code.name}: {details[:300]!r}"
    assert code in allowed, f"{code.name}: {details[:300]!r}"
    assert len(details) <= MAX_DETAILS, f"{code.name} details are {len(details)} characters long"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        field = details.partition(":")[0]
        assert any(field == f or field.startswith((f + ".", f + "[")) for f in fields), (
            f"INVALID_ARGUMENT names {field[:100]!r}, not one of {fields}: {details[:200]!r}"
        )


def call(fn: object, request: object, timeout: float = 20) -> tuple[object | None, grpc.RpcError | None]:
    try:
        return fn(request, timeout=timeout), None  # type: ignore[operator]
    except grpc.RpcError as err:
        return None, err


STRICT_IQN = re.compile(
    r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
    r"(:[A-Za-z0-9._:-]+)?|eui\.[0-9A-Fa-f]{16}"
)
SAFE_ARG = re.compile(r"[A-Za-z0-9._:/,=@\[\]+-]*")
