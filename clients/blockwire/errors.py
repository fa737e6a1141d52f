"""The one exception tree of blockwire (STYLE.md rule 10).

Every layer raises these; `blockwire.status` maps them to gRPC status codes in exactly one place, and
back again on the client side. Messages say what was wrong and what to do, and never carry a secret.
This module must not import grpc: the host agent is embeddable without it.
"""

from __future__ import annotations


class BlockwireError(Exception):
    """Base of every error blockwire raises on purpose. `code` names the gRPC status it maps to."""

    code = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BlockwireError):
    """A field of the request is malformed. Nothing was changed."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(BlockwireError):
    """The named object does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(BlockwireError):
    """The name is taken by an object with other parameters."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(BlockwireError):
    """The object's state forbids the call; the message says which state and what to do."""

    code = "FAILED_PRECONDITION"


class IdentityMismatch(FailedPrecondition):
    """The device found is not the volume announced (wrong WWN): it is refused, never attached."""


class Aborted(BlockwireError):
    """Another operation on the same object is in flight; retry with backoff."""

    code = "ABORTED"


class ResourceExhausted(BlockwireError):
    """Out of space or another quota."""

    code = "RESOURCE_EXHAUSTED"


class ConcurrencyLimit(ResourceExhausted):
    """A daemon runs as many calls of this kind as its [limits] allow (`bound` names the key, e.g.
    "max_streams"); the call was refused before it did anything. Not a lack of space: retry later,
    close idle streams, or raise the bound."""

    def __init__(self, message: str, bound: str = "") -> None:
        super().__init__(message)
        self.bound = bound


class DeadlineExceeded(BlockwireError):
    """A wait ran past its deadline; what was started has been undone unless the message says not."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(BlockwireError):
    """A daemon or service cannot be reached; retry."""

    code = "UNAVAILABLE"


class PermissionDenied(BlockwireError):
    """The credential, or the target's CHAP/ACL, refused the operation."""

    code = "PERMISSION_DENIED"


class Unauthenticated(BlockwireError):
    """No valid credential was presented."""

    code = "UNAUTHENTICATED"


class Unimplemented(BlockwireError):
    """This server does not implement the operation (yet, or with this backend)."""

    code = "UNIMPLEMENTED"


class Internal(BlockwireError):
    """A bug: an invariant did not hold."""

    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[BlockwireError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        PermissionDenied,
        Unauthenticated,
        Unimplemented,
        Internal,
    )
}
