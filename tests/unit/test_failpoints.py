"""blockwire.runtime.failpoints: injected (a no-op by default), armed by the daemons only from
BLOCKWIRE_FAILPOINTS (never by config), free when disarmed, never shared between two owners."""

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
    points = failpoints.NO_FAILPOINTS
    points.hit("agent.attach.after_journal")
    t0 = time.perf_counter()
    for _ in range(100_000):
        points.hit("agent.attach.after_journal")
    assert time.perf_counter() - t0 < 0.5  # ~30 ns a call here; the bound only catches real work


def test_raise_and_nth_hit() -> None:
    points = failpoints.Failpoints()
    with points.armed("x=raise,y=raise@2"):
        points.hit("other")
        with pytest.raises(failpoints.FailpointHit, match="failpoint x"):
            points.hit("x")
        points.hit("y")  # first hit: not yet
        with pytest.raises(failpoints.FailpointHit):
            points.hit("y")
        points.hit("y")  # only the second
    points.hit("x")  # disarmed again


def test_two_owners_never_share_their_failpoints() -> None:
    a, b = failpoints.Failpoints("x=raise"), failpoints.Failpoints()
    b.hit("x")
    failpoints.NO_FAILPOINTS.hit("x")
    with pytest.raises(failpoints.FailpointHit):
        a.hit("x")


def _child(env_value: str | None, body: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV}
    if env_value is not None:
        env[failpoints.ENV] = env_value
    return subprocess.run(
        [sys.executable, "-c", f"import os\nfrom blockwire.runtime import failpoints\n{body}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_only_the_environment_arms_them_and_kill_is_sigkill() -> None:
    body = (
        "points = failpoints.Failpoints.from_environment(os.environ)\n"
        "points.hit('agent.attach.after_journal')\nprint('alive')"
    )
    r = _child("agent.attach.after_journal=kill", body)
    assert r.returncode == -signal.SIGKILL
    assert "alive" not in r.stdout
    r = _child(None, body)
    assert (r.returncode, r.stdout.strip()) == (0, "alive")
    with pytest.raises(InvalidArgument, match="unknown config key"):
        config_from_mapping({"failpoints": "agent.attach.after_journal=kill"})
