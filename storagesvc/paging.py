"""Opaque page tokens: base64url of "v1:<create_ns>:<id>:<crc32>" of the last item of the previous page.

The checksum catches truncated or hand-edited tokens (INVALID_ARGUMENT), it does not make them secret.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

from blockwire import validate
from blockwire.errors import InvalidArgument
from storagesvc.catalog import Cursor, time_key
from storagesvc.model import Page


class Listed(Protocol):
    """What every listed record (volume, snapshot, attachment) has: pages are ordered by both."""

    @property
    def id(self) -> str: ...

    @property
    def create_time(self) -> datetime: ...


L = TypeVar("L", bound=Listed)


def encode(cursor: Cursor) -> str:
    body = f"v1:{cursor.create_ns}:{cursor.id}"
    raw = f"{body}:{zlib.crc32(body.encode()):08x}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def after(item: Listed) -> str:
    """The token of the page that follows `item`."""
    return encode(Cursor(time_key(item.create_time), item.id))


def decode(token: str, field: str = "page_token") -> Cursor | None:
    """None for an empty token (the first page); InvalidArgument for one not from `encode`."""
    if not token:
        return None
    bad = InvalidArgument(field, "not a token from a previous response; start again with an empty one")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    body, _, crc = raw.rpartition(":")
    version, _, rest = body.partition(":")
    ns, _, ident = rest.partition(":")
    if version != "v1" or not ns.isdigit() or not ident or crc != f"{zlib.crc32(body.encode()):08x}":
        raise bad
    return Cursor(int(ns), ident)


def listing(page_size: int, page_token: str, fetch: Callable[[Cursor | None, int], Sequence[L]]) -> Page[L]:
    """One page of a catalog listing: checks the size and the token, asks `fetch(after, limit + 1)` and
    returns `limit` items with the token after the last one, if there are more. The RPC layer may cut
    a page shorter still, by encoded size (`storagesvc.rpc.servicer.bounded`)."""
    limit = validate.page_size(page_size)
    items = fetch(decode(page_token), limit + 1)
    if len(items) <= limit:
        return Page(tuple(items))
    return Page(tuple(items[:limit]), after(items[limit - 1]))
