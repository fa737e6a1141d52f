"""Guest tier, host side: builds (cached) and boots the Debian guest once per session, and reports the
results of each tests/guest/inside/test_*.py file as one host test (tests/guest/test_guest.py).

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

_RUN_KEY = pytest.StashKey[image.GuestRun]()
IN_GUEST = os.environ.get("BLOCKWIRE_IN_GUEST") == "1"

# The inside tests need the guest's kernel and root: never collect them on the host.
collect_ignore_glob = [] if IN_GUEST else ["inside/*"]


def _selected_inside_files(session: pytest.Session) -> list[str]:
    files = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "inside_file" in callspec.params:
            files.append(f"tests/guest/inside/{callspec.params['inside_file']}")
    return sorted(set(files))


@pytest.fixture(scope="session")
def guest_results(request: pytest.FixtureRequest) -> GuestReport:
    """One boot of the guest running the inside files this session selected; their junit results."""
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
        run = image.run_guest(_selected_inside_files(request.session), image=built)
    request.config.stash[_RUN_KEY] = run
    if not run.junit.exists():
        pytest.fail(
            f"[guest tier] the guest produced no results ({'; '.join(run.notes) or f'rc={run.returncode}'}); "
            f"serial console {run.serial}:\n{run.serial_tail()}",
            pytrace=False,
        )
    return GuestReport.load(run.junit, required="guest" in required_tiers())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    run = config.stash.get(_RUN_KEY, None)
    if run is None:
        return
    terminalreporter.write_sep("-", "guest tier")
    terminalreporter.write_line(
        f"guest run {run.directory}: {run.seconds:.0f}s, inside exit code {run.returncode} "
        f"{' '.join(run.notes)}"
    )
    pytest_log = run.results / "pytest.log"
    if pytest_log.exists():
        terminalreporter.write_line(f"inside pytest log: {pytest_log}; serial console: {run.serial}")
    terminalreporter.write_line(f"inside files: {Path(__file__).parent / 'inside'}")
