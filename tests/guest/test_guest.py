"""One host test per tests/guest/inside/test_*.py file: it passes when every test of that file passed
inside the guest, and fails with the inside failures otherwise (see conftest.py and report.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from tests.guest.report import GuestReport

INSIDE_FILES = sorted(p.name for p in (Path(__file__).parent / "inside").glob("test_*.py"))


@pytest.mark.parametrize("inside_file", INSIDE_FILES)
def test_inside(guest_results: GuestReport, inside_file: str) -> None:
    verdict, message = guest_results.verdict(f"tests/guest/inside/{inside_file}")
    if verdict == "fail":
        pytest.fail(message, pytrace=False)
    if verdict == "skip":
        pytest.skip(message)
    if "skipped" in message:
        warnings.warn(message, stacklevel=1)
