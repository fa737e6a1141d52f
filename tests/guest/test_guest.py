"""One host test per tests/guest/inside/test_*.py file and guest kernel: it passes when every test of that
file passed inside the guest, and fails with the inside failures otherwise (see conftest.py and report.py).

Two boots: the default kernel (Debian 12's 6.1) runs every inside file; the backports kernel
(bookworm-backports' 6.12) runs only the files that have tests marked `@pytest.mark.guest_kernel("backports")`
(NVMe DH-HMAC-CHAP, which 6.1 is built without), and inside them only those tests. Each boot deselects
the other's tests, so a test is counted once.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from tests.guest.report import GuestReport

INSIDE = Path(__file__).parent / "inside"
INSIDE_FILES = sorted(p.name for p in INSIDE.glob("test_*.py"))
BACKPORTS_MARK = 'guest_kernel("backports")'
# Files with a test for the backports kernel (found by their marker's text: the host never imports them).
BACKPORTS_FILES = sorted(name for name in INSIDE_FILES if BACKPORTS_MARK in (INSIDE / name).read_text())


def _report(results: GuestReport, inside_file: str) -> None:
    verdict, message = results.verdict(f"tests/guest/inside/{inside_file}")
    if verdict == "fail":
        pytest.fail(message, pytrace=False)
    if verdict == "skip":
        pytest.skip(message)
    if "skipped" in message:
        warnings.warn(message, stacklevel=2)


@pytest.mark.parametrize("inside_file", INSIDE_FILES)
def test_inside(guest_results: GuestReport, inside_file: str) -> None:
    _report(guest_results, inside_file)


@pytest.mark.parametrize("backports_file", BACKPORTS_FILES)
def test_inside_backports_kernel(guest_results_backports: GuestReport, backports_file: str) -> None:
    _report(guest_results_backports, backports_file)
