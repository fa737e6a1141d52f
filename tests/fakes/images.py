"""Disk images made with qemu-img for volumes created from an image (skips the test without qemu-img)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def image_file(root: Path, name: str, fmt: str, size: int) -> Path:
    """An empty image of `size` bytes in format `fmt` ("qcow2", "raw") at root/name."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed (scripts/setup installs it)")
    path = root / name
    argv = [qemu_img, "create", "-q", "-f", fmt, str(path), str(size)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return path
