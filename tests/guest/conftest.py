"""Guest tier, host side: builds (cached) and boots the Debian guest once per session and kernel (the
default 6.1 for every inside file; bookworm-backports' 6.12 for the tests marked
`guest_kernel("backports")`), and reports the results of each tests/guest/inside/test_*.py file as one
host test per boot (tests/guest/test_guest.py).

Opt-out for quick local runs: BLOCKWIRE_SKIP_GUEST=1 skips the tier (loudly). CI never sets it.
Inside the guest (BLOCKWIRE_IN_GUEST=1) this file only lets pytest collect tests/guest/inside.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from tests.conftest import required_tiers, tier_unavailable
from tests.guest import image
from tests.guest.report import GuestReport

_RUNS_KEY = pytest.StashKey[list[image.GuestRun]]()
IN_GUEST = os.environ.get("BLOCKWIRE_IN_GUEST") == "1"

# The inside tests need the guest's kernel and root: never collect them on the host.
collect_ignore_glob = [] if IN_GUEST else ["inside/*"]


def _selected_inside_files(session: pytest.Session, param: str) -> list[str]:
    """The inside files this session selected through test_guest.py's parameter `param`."""
    files = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and param in callspec.params:
            files.append(f"tests/guest/inside/{callspec.params[param]}")
    return sorted(set(files))


@pytest.fixture(scope="session")
def guest_results(request: pytest.FixtureRequest) -> GuestReport:
    """One boot of the guest on its default kernel running the inside files this session selected
    (their tests for that kernel); their junit results."""
    return _boot(request, kernel=image.DEFAULT_KERNEL, param="inside_file")


@pytest.fixture(scope="session")
def guest_results_backports(request: pytest.FixtureRequest) -> GuestReport:
    """One boot on the bookworm-backports kernel (6.12) running the selected files' tests marked
    `guest_kernel("backports")`; their junit results."""
    return _boot(request, kernel="backports", param="backports_file")


def _boot(request: pytest.FixtureRequest, *, kernel: str, param: str) -> GuestReport:
    if os.environ.get("BLOCKWIRE_SKIP_GUEST") == "1":
        pytest.skip("[guest tier] skipped: BLOCKWIRE_SKIP_GUEST=1 (quick local runs only; CI runs it)")
    missing = image.requirements_missing()
    if missing:
        tier_unavailable("guest", missing)
    # Progress lines ("guest: building ...", a few minutes on a cold cache) go straight to the terminal.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    live = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with live:
        try:
            built = image.ensure_image()
        except (image.GuestError, OSError) as exc:
            pytest.fail(f"[guest tier] the guest image could not be built: {exc}", pytrace=False)
        try:
            run = image.run_guest(_selected_inside_files(request.session, param), image=built, kernel=kernel)
        except image.GuestError as exc:
            pytest.fail(f"[guest tier] {exc}", pytrace=False)
    request.config.stash.setdefault(_RUNS_KEY, []).append(run)
    if not run.junit.exists():
        why = "; ".join(run.notes) or f"rc={run.returncode}"
        pytest.fail(
            f"[guest tier] the guest ({kernel} kernel) produced no results ({why}); "
            f"serial console {run.serial}:\n{run.serial_tail()}",
            pytrace=False,
        )
    return GuestReport.load(run.junit, required="guest" in required_tiers())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    runs = config.stash.get(_RUNS_KEY, [])
    if not runs:
        return
    terminalreporter.write_sep("-", "guest tier")
    for run in runs:
        terminalreporter.write_line(
            f"guest run ({run.kernel} kernel) {run.directory}: {run.seconds:.0f}s, inside exit code "
            f"{run.returncode} {' '.join(run.notes)}"
        )
        pytest_log = run.results / "pytest.log"
        if pytest_log.exists():
            terminalreporter.write_line(f"inside pytest log: {pytest_log}; serial console: {run.serial}")
    terminalreporter.write_line(f"inside files: {Path(__file__).parent / 'inside'}")
