"""Concurrency bounds (`blockwire.limits`): validation, both daemons' [limits] tables and their documented
defaults, and how a client tells a concurrency bound from a lack of space."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grpc
import pytest

from blockwire import errors
from blockwire.limits import GRPC_LIMIT_DETAILS, LIMIT_METADATA, RESERVE, Limits
from blockwire.status import abort_with, error_from_rpc
from hostagent.config import config_from_mapping
from storagesvc.config import ConfigError, parse

ROOT = Path(__file__).resolve().parents[2]
STORAGE_BASE = {
    "backends": [{"name": "f", "kind": "file", "exporter": "tgt", "path": "/var/tmp/x"}],
    "exporters": {"tgt": {"portals": ["127.0.0.1:3260"]}},
}


class _RpcError(grpc.RpcError):
    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def test_threads_are_the_bounds_plus_the_reserve() -> None:
    assert Limits(max_streams=3, max_long_calls=2, max_quick_calls=1).threads == 6 + RESERVE


@pytest.mark.parametrize("bad", [0, -1, 1025, True, 2.0, "8"])
def test_a_bad_bound_names_the_key(bad: object) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        Limits(max_long_calls=bad)  # type: ignore[arg-type]
    assert err.value.field == "limits.max_long_calls"


def test_the_agent_reads_its_limits_table() -> None:
    assert config_from_mapping({"limits": {"max_streams": 24}}).limits == Limits(max_streams=24)
    with pytest.raises(errors.InvalidArgument) as err:
        config_from_mapping({"limits": {"max_streams": 0}})
    assert err.value.field == "limits.max_streams"
    with pytest.raises(errors.InvalidArgument) as err:
        config_from_mapping({"limits": {"threads": 5}})  # a property, not a key
    assert err.value.field == "limits.threads"


def test_storage_reads_its_limits_table() -> None:
    assert parse({**STORAGE_BASE, "limits": {"max_quick_calls": 8}}).limits == Limits(max_quick_calls=8)
    with pytest.raises(ConfigError, match=r"limits.max_streams: a number of calls from 1"):
        parse({**STORAGE_BASE, "limits": {"max_streams": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse({**STORAGE_BASE, "limits": {"workers": 8}})
    assert parse({**STORAGE_BASE, "server": {"workers": 16}}).server.workers == 16  # still read: warned


@pytest.mark.parametrize("example", ["agent.example.toml", "storage.example.toml"])
def test_the_examples_document_the_default_bounds(example: str) -> None:
    with open(ROOT / "deploy" / example, "rb") as f:
        table = tomllib.load(f)["limits"]
    assert Limits(**table) == Limits()
    assert set(table) == {"max_streams", "max_long_calls", "max_quick_calls"}


def test_a_refusal_by_a_bound_is_a_concurrency_limit_not_a_lack_of_space() -> None:
    err = _RpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "WatchEvents refused: ...", ((LIMIT_METADATA, "max_streams"),)
    )
    back = error_from_rpc(err)
    assert isinstance(back, errors.ConcurrencyLimit)
    assert back.bound == "max_streams"
    assert back.code == "RESOURCE_EXHAUSTED"

    guard = error_from_rpc(_RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, GRPC_LIMIT_DETAILS))
    assert isinstance(guard, errors.ConcurrencyLimit)
    assert guard.bound == "maximum_concurrent_rpcs"
    assert "not a lack of space" in guard.message

    space = error_from_rpc(_RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "backend file is full"))
    assert type(space) is errors.ResourceExhausted


class _Context:
    def __init__(self) -> None:
        self.trailing: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _RpcError(code, details, self.trailing)


def test_a_concurrency_limit_passed_on_stays_one() -> None:
    """The agent passing on storage's refusal (e.g. of CreateAttachment) keeps it a concurrency bound."""
    context = _Context()
    refusal = errors.ConcurrencyLimit("CreateAttachment refused: blockwire-storage has ...", "max_long_calls")
    with pytest.raises(_RpcError) as raised:
        abort_with(context, refusal)  # type: ignore[arg-type]
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    back = error_from_rpc(raised.value)
    assert isinstance(back, errors.ConcurrencyLimit)
    assert back.bound == "max_long_calls"
