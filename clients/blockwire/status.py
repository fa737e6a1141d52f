"""The one mapping between blockwire's exceptions and gRPC status codes (STYLE.md rule 10).

Servers call `abort_with(context, exc)` from their rpc/ layer; clients call `error_from_rpc(err)` to get
the typed exception back. Unexpected exceptions become INTERNAL with a message that carries no detail
of the exception (it may hold a path or a secret); the detail goes to the server's log.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from blockwire.errors import (
    ERRORS_BY_CODE,
    BlockwireError,
    ConcurrencyLimit,
    InvalidArgument,
)
from blockwire.limits import GRPC_LIMIT_DETAILS, LIMIT_METADATA

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024
"""Characters of a status message at most: a message that quotes a huge input is cut, so that it always
fits gRPC's metadata limit (16 KiB) and the client sees the real code, not RESOURCE_EXHAUSTED."""


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception: its `code`, or INTERNAL for anything unexpected."""
    if isinstance(exc, BlockwireError):
        return grpc.StatusCode[exc.code]
    return grpc.StatusCode.INTERNAL


def abort_with(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """Ends the RPC with the status that `exc` maps to."""
    code = status_code(exc)
    if isinstance(exc, BlockwireError):
        message = exc.message
    else:
        log.error("internal error", exc_info=exc)
        message = "internal error (a bug); the server log has the details"
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 14] + " ... (cut)"
    if isinstance(exc, ConcurrencyLimit):
        # Says "a bound, not space" to the next client too (the agent passing on storage's refusal).
        context.set_trailing_metadata(((LIMIT_METADATA, exc.bound or "unknown"),))
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def error_from_rpc(err: grpc.RpcError) -> BlockwireError:
    """The typed exception for a failed call; the inverse of `status_code`."""
    code: grpc.StatusCode = err.code()
    details: str = err.details() or code.name
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        field, _, problem = details.partition(": ")
        return InvalidArgument(field, problem) if problem else InvalidArgument("request", details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        bound = _limit_of(err)
        if bound:
            return ConcurrencyLimit(details, bound)
        if details == GRPC_LIMIT_DETAILS:
            return ConcurrencyLimit(
                "the daemon has as many calls in flight as it takes at all (its [limits] together, "
                "gRPC maximum_concurrent_rpcs); retry in a moment. This is a concurrency bound, not a "
                "lack of space.",
                "maximum_concurrent_rpcs",
            )
    cls = ERRORS_BY_CODE.get(code.name)
    if cls is None:
        error = BlockwireError(details)
        error.code = code.name
        return error
    return cls(details)


def _limit_of(err: grpc.RpcError) -> str:
    """The bound named by a refusal of `blockwire.server.serving.LimitsInterceptor`, or ""."""
    trailing = getattr(err, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # noqa: BLE001 - an error object without call state: no bound
        return ""
    for key, value in metadata or ():
        if key == LIMIT_METADATA:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""
