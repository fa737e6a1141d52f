"""blockwire.runtime.failpoints: armed only by BLOCKWIRE_FAILPOINTS (never by config), free when disarmed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from blockwire.errors import InvalidArgument
from blockwire.runtime import failpoints
from hostagent.config import config_from_mapping


def test_parse() -> None:
    assert failpoints.parse("a.b=kill, c=raise@2;d=kill") == {
        "a.b": ("kill", 0),
        "c": ("raise", 2),
        "d": ("kill", 0),
    }
    assert failpoints.parse("") == {}
    for bad in ("a", "a=explode", "=kill", "a=kill@x"):
        with pytest.raises(ValueError, match="BLOCKWIRE_FAILPOINTS"):
            failpoints.parse(bad)


def test_disarmed_hit_does_nothing_and_costs_next_to_nothing() -> None:
    failpoints.disarm()
    failpoints.hit("agent.attach.after_journal")
    t0 = time.perf_counter()
    for _ in range(100_000):
        failpoints.hit("agent.attach.after_journal")
    assert time.perf_counter() - t0 < 0.5  # ~30 ns a call here; the bound only catches real work


def test_raise_and_nth_hit() -> None:
    with failpoints.armed("x=raise,y=raise@2"):
        failpoints.hit("other")
        with pytest.raises(failpoints.FailpointHit, match="failpoint x"):
            failpoints.hit("x")
        failpoints.hit("y")  # first hit: not yet
        with pytest.raises(failpoints.FailpointHit):
            failpoints.hit("y")
        failpoints.hit("y")  # only the second
    failpoints.hit("x")  # disarmed again


def _child(env_value: str | None, body: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV}
    if env_value is not None:
        env[failpoints.ENV] = env_value
    return subprocess.run(
        [sys.executable, "-c", f"from blockwire.runtime import failpoints\n{body}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_only_the_environment_arms_them_and_kill_is_sigkill() -> None:
    body = "failpoints.hit('agent.attach.after_journal')\nprint('alive')"
    r = _child("agent.attach.after_journal=kill", body)
    assert r.returncode == -signal.SIGKILL
    assert "alive" not in r.stdout
    r = _child(None, body)
    assert (r.returncode, r.stdout.strip()) == (0, "alive")
    with pytest.raises(InvalidArgument, match="unknown config key"):
        config_from_mapping({"failpoints": "agent.attach.after_journal=kill"})
