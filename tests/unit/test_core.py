"""The shared core: the exception tree, its status mapping, and Secret."""

from __future__ import annotations

import grpc
import pytest

from blockwire import errors
from blockwire.secret import Secret
from blockwire.status import error_from_rpc, status_code


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("cls", list(errors.ERRORS_BY_CODE.values()))
def test_every_error_round_trips_through_its_status(cls: type[errors.BlockwireError]) -> None:
    code = status_code(cls("boom"))
    assert code.name == cls.code
    back = error_from_rpc(_FakeRpcError(code, "boom"))
    assert type(back) is cls
    assert back.message == "boom"


def test_invalid_argument_keeps_the_field() -> None:
    exc = errors.InvalidArgument("size_bytes", "must be a multiple of 1 MiB")
    assert status_code(exc) is grpc.StatusCode.INVALID_ARGUMENT
    back = error_from_rpc(_FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
    assert isinstance(back, errors.InvalidArgument)
    assert (back.field, back.problem) == ("size_bytes", "must be a multiple of 1 MiB")


def test_identity_mismatch_is_a_failed_precondition() -> None:
    assert status_code(errors.IdentityMismatch("wrong LUN")) is grpc.StatusCode.FAILED_PRECONDITION


def test_unexpected_exceptions_are_internal() -> None:
    assert status_code(KeyError("x")) is grpc.StatusCode.INTERNAL


def test_secret_never_prints() -> None:
    s = Secret("hunter2hunter2")
    assert "hunter2" not in f"{s} {s!r} {s:>20} {[s]} { ({'p': s}) }"
    assert s.reveal() == "hunter2hunter2"
    assert s == Secret("hunter2hunter2")
    assert s != Secret("other")
