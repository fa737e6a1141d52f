"""Executor: the one way blockwire runs a command (STYLE.md rules 1, 2 and 9).

* argv lists only, never a shell;
* every run has a timeout;
* accepted exit codes are named at the call site (`ok={0: "ok", 15: "session exists"}`), and the result
  says which one came back;
* secrets are `Secret` objects in argv, input or environment values: revealed only to the child
  process, shown as `********` in logs, results and errors, and scrubbed from any output quoted in an
  error. The errors raised here chain nothing: subprocess's own exceptions (`TimeoutExpired` holds the
  real argv and partial output) are never a `__cause__` or `__context__`, so neither a traceback nor
  `log.exception` can print a secret; the revealed values live only in `_spawn`'s frame, which no
  raised traceback includes.

Both services use it (storagesvc for tgtadm and qemu-img), injected, never reached for.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from blockwire.errors import BlockwireError, DeadlineExceeded, Unavailable
from blockwire.secret import REDACTED, Secret

log = logging.getLogger(__name__)

Arg = str | Secret
OkCodes = Mapping[int, str]
DEFAULT_OK: OkCodes = {0: "ok"}


@dataclass(frozen=True)
class Result:
    """What a command did. `argv` is redacted; `outcome` names the accepted exit code."""

    argv: tuple[str, ...]
    returncode: int
    outcome: str
    stdout: str
    stderr: str
    seconds: float


class CommandFailed(BlockwireError):
    """A command exited with a code the caller did not accept. Callers translate the codes they know."""

    code = "UNAVAILABLE"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        first = next((line for line in stderr.splitlines() if line.strip()), "").strip()
        super().__init__(f"{argv[0]} exited with {returncode}" + (f": {first[:300]}" if first else ""))
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


class Runner(Protocol):
    """What connectors, tools and exporters are given: run a command and get a Result."""

    def run(
        self,
        argv: Sequence[Arg],
        *,
        ok: OkCodes = DEFAULT_OK,
        timeout: float | None = None,
        stdin: Arg | None = None,
        env: Mapping[str, Arg] | None = None,
    ) -> Result: ...


def redact_argv(argv: Sequence[Arg]) -> tuple[str, ...]:
    """argv as it may be shown: every Secret replaced by ********."""
    return tuple(REDACTED if isinstance(a, Secret) else a for a in argv)


def _reveal(value: Arg) -> str:
    return value.reveal() if isinstance(value, Secret) else value


def _spawn(
    argv: Sequence[Arg], stdin: Arg | None, env: Mapping[str, Arg], timeout: float
) -> subprocess.CompletedProcess[str] | BlockwireError:
    """Runs the child with the secrets revealed; returns a failure instead of raising it, so that the
    caller raises outside any `except` block (no chained subprocess exception) and from a frame that
    never held a revealed value."""
    shown = redact_argv(argv)
    try:
        return subprocess.run(
            [_reveal(a) for a in argv],
            input=None if stdin is None else _reveal(stdin),
            capture_output=True,
            text=True,
            errors="replace",  # binary fields in tool output (SCSI designators) must not crash
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C", **{k: _reveal(v) for k, v in env.items()}},
            check=False,
        )
    except FileNotFoundError:
        return Unavailable(f"{shown[0]} is not installed or not on PATH")
    except subprocess.TimeoutExpired:
        return DeadlineExceeded(f"{' '.join(shown)} did not finish within {timeout:g}s")
    except OSError as exc:  # not executable, too many open files ...: strerror names no argument
        return Unavailable(f"{shown[0]} could not be started: {exc.strerror or type(exc).__name__}")


def scrub(text: str, secrets: Sequence[Secret]) -> str:
    """Text with every revealed secret value replaced by ********."""
    for s in secrets:
        value = s.reveal()
        if value:
            text = text.replace(value, REDACTED)
    return text


class Executor:
    """Runs commands for real. `default_timeout` applies when a call gives none."""

    def __init__(self, *, default_timeout: float = 60.0) -> None:
        self.default_timeout = default_timeout

    def run(
        self,
        argv: Sequence[Arg],
        *,
        ok: OkCodes = DEFAULT_OK,
        timeout: float | None = None,
        stdin: Arg | None = None,
        env: Mapping[str, Arg] | None = None,
    ) -> Result:
        env = env or {}
        secrets = [a for a in (*argv, stdin, *env.values()) if isinstance(a, Secret)]
        shown = redact_argv(argv)
        limit = self.default_timeout if timeout is None else timeout
        start = time.monotonic()
        proc = _spawn(argv, stdin, env, limit)
        if isinstance(proc, BlockwireError):
            raise proc  # outside any except block: nothing chained
        seconds = time.monotonic() - start
        stdout, stderr = scrub(proc.stdout, secrets), scrub(proc.stderr, secrets)
        log.debug("ran %s -> %d in %.3fs", shown, proc.returncode, seconds)
        if proc.returncode not in ok:
            raise CommandFailed(shown, proc.returncode, stderr)
        return Result(shown, proc.returncode, ok[proc.returncode], stdout, stderr, seconds)
