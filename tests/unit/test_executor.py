"""The real Executor: argv, named exit codes, timeouts, secret redaction."""

from __future__ import annotations

import pytest

from blockwire.errors import DeadlineExceeded, Unavailable
from blockwire.secret import Secret
from hostagent.host.executor import CommandFailed, Executor


def test_named_exit_codes() -> None:
    r = Executor().run(["sh", "-c", "exit 15"], ok={0: "ok", 15: "session exists"})
    assert (r.returncode, r.outcome) == (15, "session exists")


def test_unaccepted_exit_code_raises_with_first_stderr_line() -> None:
    with pytest.raises(CommandFailed) as info:
        Executor().run(["sh", "-c", "echo first >&2; echo second >&2; exit 3"])
    assert info.value.returncode == 3
    assert "first" in info.value.message
    assert "second" not in info.value.message


def test_secret_reaches_the_child_but_no_result_or_error() -> None:
    pw = Secret("s3cr3t-chap-pw")
    r = Executor().run(["sh", "-c", 'test "${#1}" -eq 14 && echo "got $1"', "sh", pw])
    assert r.stdout.strip() == "got ********"
    assert "s3cr3t" not in repr(r)
    with pytest.raises(CommandFailed) as info:
        Executor().run(["sh", "-c", 'echo "bad $1" >&2; exit 1', "sh", pw])
    assert "s3cr3t" not in str(info.value)
    assert "s3cr3t" not in info.value.stderr
    assert "********" in str(info.value)


def test_secret_on_stdin() -> None:
    r = Executor().run(["cat"], stdin=Secret("abc123secret"))
    assert r.stdout == "********"


def test_timeout_is_deadline_exceeded() -> None:
    with pytest.raises(DeadlineExceeded):
        Executor().run(["sleep", "5"], timeout=0.2)


def test_missing_binary_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="not installed"):
        Executor().run(["blockwire-no-such-binary"])
