"""The daemons' shutdown signal wakes the main thread whichever thread the kernel hands SIGTERM to.

Each case runs a small program in its own process (signal handlers belong to a process's main thread):
it installs `serving.stop_on_signals()`, starts a thread, and blocks in `wait()`. The signal then comes
from the parent (process-directed, usually taken by the main thread) or is aimed at the other thread
with `pthread_kill` (what happens when the kernel picks a gRPC thread: a plain `Event.wait()` never
woke up, and the daemon ignored SIGTERM).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent(
    """
    import signal, sys, threading
    from blockwire.server import serving

    stop = serving.stop_on_signals()
    aim_at_thread = sys.argv[1] == "thread"
    go = threading.Event()

    def other():
        go.wait(30)
        if aim_at_thread:
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        else:
            threading.Event().wait(30)

    threading.Thread(target=other, daemon=True).start()
    print("ready", flush=True)
    if aim_at_thread:
        go.set()
    stop.wait()
    print("stopped", flush=True)
    """
)


@pytest.mark.parametrize("target", ["thread", "process"])
def test_sigterm_wakes_the_main_thread(target: str) -> None:
    # Unbuffered: readline() then takes exactly one line, and communicate() (which reads the pipe's fd)
    # gets the rest; a buffered reader could swallow "stopped" into its read-ahead.
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        if target == "process":
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"SIGTERM aimed at the {target} did not wake stop.wait() within 15s")
    assert proc.returncode == 0, err.decode(errors="replace")
    assert out.strip() == b"stopped"


def test_set_wakes_wait_without_a_signal() -> None:
    program = PROGRAM.replace("signal.pthread_kill(threading.get_ident(), signal.SIGTERM)", "stop.set()")
    proc = subprocess.run(
        [sys.executable, "-c", program, "thread"], capture_output=True, text=True, timeout=15, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ready", "stopped"]
