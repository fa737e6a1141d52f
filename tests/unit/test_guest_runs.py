"""The guest harness never prunes a run directory that a live run still holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.guest import image


def test_live_runs_survive_pruning_and_dead_ones_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "RUNS", tmp_path)
    monkeypatch.setattr(image, "KEEP_RUNS", 1)
    monkeypatch.setattr(image, "_LIVE_RUNS", [])
    dead = tmp_path / "run-00000000-000000-1"
    (dead / "results").mkdir(parents=True)
    os.utime(dead, (0, 0))
    live = image._new_run_directory()
    assert not dead.exists()  # nobody held it
    second = image._new_run_directory()
    assert live.exists()  # held by this process: a concurrent run must not delete it
    assert second.exists()
    assert live != second
    for lock in image._LIVE_RUNS:
        lock.close()
