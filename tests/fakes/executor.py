"""FakeRunner: a scripted Runner for the unit tier. Records every argv (redacted) it was asked to run."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from blockwire.runtime.executor import DEFAULT_OK, Arg, CommandFailed, OkCodes, Result, redact_argv


@dataclass
class Reply:
    returncode: int = 0
    stdout: str = ""
    stderr: str = ""


@dataclass
class FakeRunner:
    """Answers commands from rules: (regex over the joined redacted argv) -> Reply or callable."""

    rules: list[tuple[str, Reply | Callable[[tuple[str, ...]], Reply]]] = field(default_factory=list)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    revealed: list[tuple[str, ...]] = field(default_factory=list)

    def on(self, pattern: str, reply: Reply | Callable[[tuple[str, ...]], Reply]) -> FakeRunner:
        self.rules.append((pattern, reply))
        return self

    def run(
        self,
        argv: Sequence[Arg],
        *,
        ok: OkCodes = DEFAULT_OK,
        timeout: float | None = None,
        stdin: Arg | None = None,
        env: Mapping[str, Arg] | None = None,
    ) -> Result:
        shown = redact_argv(argv)
        self.calls.append(shown)
        self.revealed.append(tuple(a if isinstance(a, str) else a.reveal() for a in argv))
        joined = " ".join(shown)
        reply = Reply()
        for pattern, r in reversed(self.rules):  # later rules override earlier ones
            if re.search(pattern, joined):
                reply = r(shown) if callable(r) else r
                break
        if reply.returncode not in ok:
            raise CommandFailed(shown, reply.returncode, reply.stderr)
        return Result(shown, reply.returncode, ok[reply.returncode], reply.stdout, reply.stderr, 0.0)

    def ran(self, pattern: str) -> list[tuple[str, ...]]:
        return [c for c in self.calls if re.search(pattern, " ".join(c))]
