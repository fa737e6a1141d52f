"""The guest harness: it never prunes a run directory that a live run still holds, and it names a guest
kernel crash from the serial console."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.guest import image, test_guest
from tests.guest.inside import conftest as inside


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


SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def test_a_guest_kernel_oops_is_named_with_the_test_that_was_running(tmp_path: Path) -> None:
    run = image.GuestRun(directory=tmp_path)
    (tmp_path / "serial.log").write_text((SAMPLES / "guest_serial_oops.txt").read_text())
    crash = run.kernel_crash()
    assert crash.startswith("BUG: kernel NULL pointer dereference, address: 0000000000000018"), crash
    assert "RIP: 0010:iscsi_sw_tcp_release_conn+0x67/0x160 [iscsi_tcp]" in crash
    assert crash.endswith(
        "while tests/guest/inside/test_storage_lio_lvm.py::"
        "test_lvm_thin_volume_over_lio_reaches_the_kernel_with_the_announced_identity ran"
    )


def test_a_clean_console_has_no_crash(tmp_path: Path) -> None:
    run = image.GuestRun(directory=tmp_path)
    assert run.kernel_crash() == ""  # no serial log at all
    lines = (SAMPLES / "guest_serial_oops.txt").read_text().splitlines()
    clean = [line for line in lines if "372.1" not in line]  # everything before the oops
    (tmp_path / "serial.log").write_text("\n".join(clean))
    assert run.kernel_crash() == ""


def test_each_guest_kernel_boots_its_own_kernel_and_initrd(tmp_path: Path) -> None:
    for kernel, (vmlinuz, initrd, accel) in {
        "default": ("vmlinuz", "initrd.img", "tcg,thread=multi"),
        "backports": ("vmlinuz-bpo", "initrd-bpo.img", "tcg,thread=single"),
    }.items():
        argv = image.qemu_command(tmp_path, tmp_path / "o", tmp_path / "r", tmp_path / "s", kernel)
        assert argv[argv.index("-kernel") + 1] == str(tmp_path / vmlinuz)
        assert argv[argv.index("-initrd") + 1] == str(tmp_path / initrd)
        assert argv[argv.index("-accel") + 1] == accel


def test_a_run_on_a_kernel_the_image_lacks_says_so(tmp_path: Path) -> None:
    with pytest.raises(image.GuestError, match="no guest kernel 'rc'"):
        image.run_guest(kernel="rc", image=tmp_path)
    (tmp_path / "vmlinuz").touch()
    with pytest.raises(image.GuestError, match=r"has no vmlinuz-bpo or initrd-bpo\.img"):
        image.run_guest(kernel="backports", image=tmp_path)


class _Item:
    """What the inside conftest's selection reads of a collected test."""

    def __init__(self, nodeid: str, kernel: str | None) -> None:
        self.nodeid = nodeid
        self._mark = pytest.mark.guest_kernel(kernel).mark if kernel else None

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return self._mark if name == "guest_kernel" else None


def test_each_boot_runs_only_the_tests_of_its_kernel() -> None:
    items = [_Item("a", None), _Item("b", "backports"), _Item("c", None)]
    keep, other = inside.split_by_kernel(items, "default")  # type: ignore[arg-type]
    assert ([i.nodeid for i in keep], [i.nodeid for i in other]) == (["a", "c"], ["b"])
    keep, other = inside.split_by_kernel(items, "backports")  # type: ignore[arg-type]
    assert ([i.nodeid for i in keep], [i.nodeid for i in other]) == (["b"], ["a", "c"])
    # the host boots the backports kernel for the files that have such tests: the DH-HMAC-CHAP ones
    assert test_guest.BACKPORTS_FILES == [
        "test_e2e_nvme.py",
        "test_nvme_raw_tools.py",
        "test_storage_nvmet.py",
    ]
