"""What a daemon's metrics endpoint needs that is not grpc: the [metrics] config table, and the step observer
the work reports each step's duration to (export, login, udev, identity, multipath, hotplug, unplug ...).

grpc-free and prometheus-free: the library (hostagent embedded in a virt manager) times its steps through
`StepObserver` and pays nothing when nobody observes (`NO_STEPS`); the daemons pass the Prometheus
histogram of `blockwire.server.metrics`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from blockwire import tracing
from blockwire.runtime.clock import Clock
from blockwire.runtime.executor import DEFAULT_OK, Arg, OkCodes, Result, Runner


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: `listen = "127.0.0.1:9464"` serves Prometheus' text format at http://ADDRESS/metrics.
    Empty (the default): no endpoint. It has no TLS and no authentication: bind it to a loopback or
    management address only."""

    listen: str = ""


@dataclass(frozen=True)
class TracingConfig:
    """[tracing]: `exporter` = "" (none), "otlp", or "jsonl:/path"."""

    exporter: str = ""

    def check(self) -> str:
        """What is wrong with it, in words; "" when nothing."""
        e = self.exporter
        if e in ("", "otlp") or (e.startswith("jsonl:/") and len(e) > len("jsonl:/")):
            return ""
        return f'[tracing] exporter {e!r}: "", "otlp" or "jsonl:/absolute/path"'


class StepObserver(Protocol):
    def observe(self, step: str, seconds: float) -> None:
        """One step of the work took `seconds` (also when it failed)."""
        ...


class _NoSteps:
    def observe(self, step: str, seconds: float) -> None:
        pass


NO_STEPS: StepObserver = _NoSteps()


class _SpansOnly:
    def observe(self, step: str, seconds: float) -> None:
        pass


SPANS_ONLY: StepObserver = _SpansOnly()
"""Observes nothing, but is not NO_STEPS: the seams are timed, so each step is a span (tracing without
metrics)."""


@contextlib.contextmanager
def timed(observer: StepObserver, clock: Clock, step: str) -> Iterator[None]:
    """Reports the duration of the `with` body as `step`, failed or not; the body is a span named
    "step <step>" (`blockwire.tracing`)."""
    start = clock.monotonic()
    try:
        with tracing.span(f"step {step}"):
            yield
    finally:
        observer.observe(step, clock.monotonic() - start)


_IDENTITY_TOOLS = frozenset({"iscsi-inq", "iscsi-readcapacity16", "iscsi-ls", "sg_inq", "scsi_id"})
_ISCSIADM_ACTIONS = (
    (("--login", "-l"), "login"),
    (("--logout", "-u", "--logoutall"), "logout"),
    (("--rescan", "-R"), "rescan"),
    (("-o", "--op"), "node"),
)


def step_of(argv: Sequence[Arg]) -> str:
    """The step a command is: iscsiadm by its action, identity readers as "identity", multipath(d) as
    "multipath", tgtadm as tgt_<mode>_<op>, anything else by its program's name."""
    program = os.path.basename(str(argv[0])) if argv else "?"
    if program == "iscsiadm":
        args = {str(a) for a in argv[1:]}
        for flags, step in _ISCSIADM_ACTIONS:
            if args.intersection(flags):
                return step
        return "session"
    if program in _IDENTITY_TOOLS:
        return "identity"
    if program in ("multipath", "multipathd"):
        return "multipath"
    if program == "tgtadm":
        words = [str(a) for a in argv]
        op = words[words.index("--op") + 1] if "--op" in words[:-1] else "?"
        mode = words[words.index("--mode") + 1] if "--mode" in words[:-1] else "?"
        return f"tgt_{mode}_{op}"
    return program


class TimedRunner:
    def __init__(self, runner: Runner, steps: StepObserver, clock: Clock) -> None:
        self.runner, self.steps, self.clock = runner, steps, clock

    def run(
        self,
        argv: Sequence[Arg],
        *,
        ok: OkCodes = DEFAULT_OK,
        timeout: float | None = None,
        stdin: Arg | None = None,
        env: Mapping[str, Arg] | None = None,
    ) -> Result:
        with timed(self.steps, self.clock, step_of(argv)):
            return self.runner.run(argv, ok=ok, timeout=timeout, stdin=stdin, env=env)
