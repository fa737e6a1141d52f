"""The real Executor: argv, named exit codes, timeouts, secret redaction."""

from __future__ import annotations

import io
import logging
import traceback
from pathlib import Path

import pytest

from blockwire.errors import DeadlineExceeded, Unavailable
from blockwire.runtime.executor import CommandFailed, Executor
from blockwire.secret import Secret


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


# -- no secret through a chained exception (issue 11, item 8)

SECRET = "chap-S3cr3t-in-argv"


def _everything_said(exc: BaseException) -> str:
    """What a traceback, a logger with exc_info and a repr of every exception in the chain show."""
    shown = "".join(traceback.format_exception(exc))
    buffer = io.StringIO()
    logger = logging.getLogger(f"test.executor.{id(exc)}")
    handler = logging.StreamHandler(buffer)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise exc
        except BaseException:
            logger.exception("the command failed")
    finally:
        logger.removeHandler(handler)
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen:
        seen.append(link)
        link = link.__cause__ or link.__context__
    chain = " ".join(f"{e!r} {e.args!r} {vars(e)!r}" for e in seen)
    return shown + buffer.getvalue() + chain


def test_a_timeout_chains_nothing_that_holds_the_secret() -> None:
    # the child prints the secret, then outlives its timeout: subprocess's TimeoutExpired would hold the
    # real argv and that partial output
    argv = ["sh", "-c", 'echo "got $1"; echo "err $1" >&2; sleep 5', "sh", Secret(SECRET)]
    with pytest.raises(DeadlineExceeded) as info:
        Executor().run(argv, timeout=0.3, stdin=Secret(SECRET + "-stdin"))
    exc = info.value
    said = _everything_said(exc)
    assert "DeadlineExceeded" in said
    assert "did not finish within 0.3s" in str(exc)
    assert "********" in str(exc)
    assert SECRET not in said
    assert exc.__cause__ is None
    assert exc.__context__ is None


def test_a_missing_binary_or_a_failure_chains_nothing_either() -> None:
    with pytest.raises(Unavailable) as missing:
        Executor().run(["blockwire-no-such-binary", Secret(SECRET)])
    with pytest.raises(CommandFailed) as failed:
        Executor().run(["sh", "-c", 'echo "bad $1" >&2; exit 3', "sh", Secret(SECRET)])
    for exc in (missing.value, failed.value):
        assert exc.__cause__ is None
        assert exc.__context__ is None
        assert SECRET not in _everything_said(exc)


def test_a_secret_in_the_environment_reaches_the_child_but_not_its_quoted_output() -> None:
    r = Executor().run(["sh", "-c", 'echo "pw=$PW"'], env={"PW": Secret(SECRET)})
    assert r.stdout.strip() == "pw=********"


def test_a_caller_that_wraps_the_executor_error_leaks_nothing(tmp_path: Path) -> None:
    """The storage side: tgtadm gets the CHAP password on its command line; a tgtadm that hangs ends in
    DeadlineExceeded from the exporter, and what the daemon logs of it holds no secret."""
    from blockwire.model import Chap  # noqa: PLC0415
    from storagesvc.targets.base import TargetSpec  # noqa: PLC0415
    from storagesvc.targets.tgt import TgtExporter  # noqa: PLC0415

    hanging = tmp_path / "tgtadm"
    hanging.write_text('#!/bin/sh\ncase "$*" in *"--op new --mode account"*) echo "$*"; sleep 5;; esac\n')
    hanging.chmod(0o755)
    exporter = TgtExporter(Executor(), ("127.0.0.1:3260",), tgtadm=str(hanging), timeout=0.3)
    vid = "0123456789abcdef0123456789abcdef"
    spec = TargetSpec(
        volume_id=vid,
        target_iqn=f"iqn.2026-01.io.blockwire:{vid}",
        device_path=str(tmp_path / "v.raw"),
        wwn="6001405" + vid[:20] + "00000",
        serial=vid[:20],
        readonly=False,
        chap=Chap(f"in-{vid[:24]}", Secret(SECRET)),
    )
    with pytest.raises(DeadlineExceeded) as info:
        exporter._account(1, spec.chap, False)  # type: ignore[arg-type]
    try:
        raise RuntimeError("export failed") from info.value  # and a caller that chains it on
    except RuntimeError as wrapped:
        said = _everything_said(wrapped)
    assert "--password ********" in said
    assert SECRET not in said
