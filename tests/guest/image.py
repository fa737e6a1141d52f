"""The guest tier's machinery: a cached Debian 12 image, a wheelhouse, and boots of the guest under QEMU.

Cache (outside the repo, BLOCKWIRE_GUEST_CACHE, default /var/cache/blockwire/guest):
  wheels-<key>/   `pip wheel` of the project and its test dependencies; key: pyproject.toml + REQUIREMENTS
  base-<key>/     debootstrap root (build-base.sh); key: build-base.sh
  <key>/          vmlinuz, initrd.img, rootfs.img (6G sparse ext4) with a venv at /opt/blockwire/venv
                  (build-image.sh); key: base key + wheels key + build-image.sh. Also vmlinuz-bpo and
                  initrd-bpo.img: the bookworm-backports kernel (6.12), installed in the same root
Each entry is built in a temporary directory next to it and renamed into place when complete, under a
lock, so a failed or concurrent build never leaves or uses a half cache.

A run boots the image with a copy-on-write overlay (the cache stays clean), the checkout shared
read-only over 9p, a writable 9p share for results, the serial console in a file, and a hard timeout
after which QEMU is killed. Inside, tests/guest/test-init.sh runs pytest over tests/guest/inside.

Two kernels (KERNELS), one root: every run boots Debian 12's 6.1 ("default") unless it asks for
"backports" (bookworm-backports' 6.12), which only the tests marked `@pytest.mark.guest_kernel("backports")`
need (NVMe DH-HMAC-CHAP: 6.1 is built without CONFIG_NVME_AUTH and CONFIG_NVME_TARGET_AUTH). Inside, each
boot runs only the tests of its kernel (tests/guest/inside/conftest.py deselects the others).

Command line (root):
  python -m tests.guest.image build              build what is missing, print the cache paths
  python -m tests.guest.image run [FILE ...]     boot and run the inside tests (default: all)
  python -m tests.guest.image run --kernel backports [FILE ...]
                                                 the same on the backports kernel (its marked tests only)
  python -m tests.guest.image record             boot and record real tool output into tests/data/recorded
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

FORMAT = 1  # bump to rebuild every cache entry
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INSIDE = HERE / "inside"
CACHE = Path(os.environ.get("BLOCKWIRE_GUEST_CACHE", "/var/cache/blockwire/guest"))
RUNS = Path(os.environ.get("BLOCKWIRE_GUEST_RUNS", "/var/tmp/blockwire-guest"))
KEEP_RUNS = 3
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Beyond the project's own dependencies (pyproject.toml), what the inside tests run with.
# os-brick: the peer the attach benchmark (bench/attach.py) compares with, run inside the guest.
REQUIREMENTS = ("pytest", "hypothesis", "pytest-timeout", "rtslib-fb", "setuptools", "wheel", "os-brick")
BUILD_TIMEOUT = 1800.0
# The whole inside suite takes about 25 min under TCG (RBD, NVMe/TCP, cold attach, encryption, the facade).
RUN_TIMEOUT = float(os.environ.get("BLOCKWIRE_GUEST_TIMEOUT", "3000"))
INSIDE_TEST_TIMEOUT = 600  # pytest-timeout inside, per test


@dataclass(frozen=True)
class GuestKernel:
    """One of the image's kernels: its files in the cache entry (build-image.sh) and how QEMU runs it."""

    vmlinuz: str
    initrd: str
    # TCG's vCPU threads. "single" for 6.12: under multi-threaded TCG its live code patching (static
    # keys, text_poke_bp) was seen to leave another vCPU running a stale int3 ("Oops: int3" in
    # __schedule, a panic), which one thread for both vCPUs cannot do.
    tcg_threads: str = "multi"

    @property
    def files(self) -> tuple[str, str]:
        return self.vmlinuz, self.initrd


KERNELS = {
    "default": GuestKernel("vmlinuz", "initrd.img"),  # Debian 12's 6.1
    "backports": GuestKernel(
        "vmlinuz-bpo", "initrd-bpo.img", tcg_threads="single"
    ),  # bookworm-backports' 6.12
}
DEFAULT_KERNEL = "default"
MEMORY_MB = 3072


class GuestError(Exception):
    """The image could not be built or the guest did not produce results; the message says why."""


def requirements_missing() -> str | None:
    """What this machine lacks to run the guest tier, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mkfs.ext4 -d of a root filesystem)"
    for binary, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("unshare", "util-linux"),
    ):
        if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            return f"{binary} not found: apt-get install {package} (scripts/setup does this)"
    return None


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org."""
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))
    for path in sources:
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#")
            )
            uris = fields.get("URIs", "").split()
            suites = fields.get("Suites", "").split()
            if "bookworm" in suites and uris and not uris[0].rstrip("/").endswith("-security"):
                return uris[0].rstrip("/")
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt").glob("sources.list.d/*.list"))]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "bookworm" in parts and "debian" in line:
                uri = next(p for p in parts[1:] if "://" in p).rstrip("/")
                if not uri.endswith("-security"):
                    return uri
    return DEFAULT_MIRROR


def _key(*parts: bytes | str) -> str:
    digest = hashlib.sha256(f"format {FORMAT}\n".encode())
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def wheels_key() -> str:
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return _key((REPO / "pyproject.toml").read_bytes(), " ".join(REQUIREMENTS), tag)


def base_key() -> str:
    return _key((HERE / "build-base.sh").read_bytes())


def image_key() -> str:
    return _key(base_key(), wheels_key(), (HERE / "build-image.sh").read_bytes())


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _log(message: str) -> None:
    print(f"guest: {message}", file=sys.stderr, flush=True)


def _build_entry(name: str, build: list[str]) -> Path:
    """Makes CACHE/name by running `build` with a fresh temporary directory appended; renames on success."""
    final = CACHE / name
    if final.is_dir():
        return final
    tmp = CACHE / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.monotonic()
    _log(f"building {final} ...")
    try:
        proc = subprocess.run(
            [*build, str(tmp)], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
        )
        (tmp / "build.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise GuestError(
                f"building {name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
            )
        (tmp / "build-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"built {final} in {time.monotonic() - started:.0f}s")
    return final


def ensure_wheelhouse() -> Path:
    with _locked():
        return _build_entry(
            f"wheels-{wheels_key()}",
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-input", str(REPO), *REQUIREMENTS, "-w"],
        )


def ensure_image() -> Path:
    """The cached image for the current inputs, built (3-5 minutes) when missing."""
    wheelhouse = ensure_wheelhouse()
    with _locked():
        base = _build_entry(f"base-{base_key()}", ["bash", str(HERE / "build-base.sh"), apt_mirror()])
        image = _build_entry(image_key(), ["bash", str(HERE / "build-image.sh"), str(base), str(wheelhouse)])
        _prune(keep={wheelhouse.name, base.name, image.name})
    return image


def _prune(keep: set[str]) -> None:
    """Removes cache entries of earlier inputs (each is hundreds of MB) and leftovers of killed builds."""
    for entry in CACHE.iterdir():
        if entry.is_dir() and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


# A kernel oops or panic on the guest's console, the console's timestamps, and pytest's verbose test ids.
CRASH = re.compile(r"\] (BUG: |Oops: |Kernel panic - |general protection fault)")
CONSOLE_STAMP = re.compile(r"^\[\s*\d+\.\d+\]\s*")
RUNNING_TEST = re.compile(r"tests/guest/inside/\S+\.py::\S+")


@dataclass
class GuestRun:
    """One boot of the guest: where its files are, and how it ended."""

    directory: Path
    returncode: int | None = None  # pytest's exit code inside; None when the guest did not finish
    seconds: float = 0.0
    timed_out: bool = False
    notes: list[str] = field(default_factory=list)
    kernel: str = DEFAULT_KERNEL  # the KERNELS entry it booted

    @property
    def results(self) -> Path:
        return self.directory / "results"

    @property
    def serial(self) -> Path:
        return self.directory / "serial.log"

    @property
    def junit(self) -> Path:
        return self.results / "junit.xml"

    def serial_tail(self, lines: int = 60) -> str:
        if not self.serial.exists():
            return "(no serial log)"
        return "\n".join(self.serial.read_text(errors="replace").splitlines()[-lines:])

    def kernel_crash(self) -> str:
        """The guest kernel's first oops or panic on the serial console ("" if none): its headline, the
        faulting function and the test that was running."""
        if not self.serial.exists():
            return ""
        lines = self.serial.read_text(errors="replace").splitlines()
        start = next((i for i, line in enumerate(lines) if CRASH.search(line)), None)
        if start is None:
            return ""
        rip = next((CONSOLE_STAMP.sub("", line) for line in lines[start:] if "RIP:" in line), "")
        running = next(
            (m.group(0) for line in reversed(lines[: start + 1]) if (m := RUNNING_TEST.search(line))), ""
        )
        parts = [CONSOLE_STAMP.sub("", lines[start]), rip, f"while {running} ran" if running else ""]
        return "; ".join(part for part in parts if part)


# Lock files of this process's run directories, held open (flock) until the process exits: a run that
# is still booting, or whose results are still being read, is never pruned by a concurrent run.
_LIVE_RUNS: list[IO[str]] = []


def _in_use(run_directory: Path) -> bool:
    try:
        with (run_directory / ".live").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _new_run_directory() -> Path:
    RUNS.mkdir(parents=True, exist_ok=True)
    old = sorted((p for p in RUNS.iterdir() if p.name.startswith("run-")), key=lambda p: p.stat().st_mtime)
    for stale in old[: max(0, len(old) - (KEEP_RUNS - 1))]:
        if not _in_use(stale):
            shutil.rmtree(stale, ignore_errors=True)
    directory = RUNS / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{len(_LIVE_RUNS)}"
    (directory / "results").mkdir(parents=True)
    lock = (directory / ".live").open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    _LIVE_RUNS.append(lock)
    return directory


def qemu_command(
    image: Path, overlay: Path, results: Path, serial: Path, kernel: str = DEFAULT_KERNEL
) -> list[str]:
    k = KERNELS[kernel]
    return [
        "qemu-system-x86_64",
        "-accel", f"tcg,thread={k.tcg_threads}",
        "-machine", "q35",
        "-cpu", "max",
        "-smp", "2",
        "-m", str(MEMORY_MB),
        "-display", "none",
        "-nodefaults",
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(image / k.vmlinuz),
        "-initrd", str(image / k.initrd),
        # oops=panic with panic=-1 and -no-reboot: a kernel oops ends QEMU at once, and the run reports it
        # (GuestRun.kernel_crash), instead of a wedged guest waiting out the run's timeout.
        "-append", "console=ttyS0 root=/dev/vda rw init=/sbin/blockwire-init oops=panic panic=-1 loglevel=4",
        "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
        "-virtfs", f"local,path={REPO},mount_tag=src,security_model=none,readonly=on",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
        "-serial", f"file:{serial}",
    ]  # fmt: skip


def run_guest(
    files: Sequence[str] = (),
    *,
    record: bool = False,
    timeout: float = RUN_TIMEOUT,
    image: Path | None = None,
    kernel: str = DEFAULT_KERNEL,
) -> GuestRun:
    """Boots the guest once on `kernel` (KERNELS): pytest over `files` (paths relative to the repo;
    default all of inside/; only the tests of that kernel run), or the recorder when `record`. QEMU is
    killed after `timeout` seconds, and always on the way out."""
    if kernel not in KERNELS:
        raise GuestError(f"no guest kernel {kernel!r}: one of {sorted(KERNELS)}")
    image = image or ensure_image()
    missing = [name for name in KERNELS[kernel].files if not (image / name).exists()]
    if missing:
        raise GuestError(f"the image {image} has no {' or '.join(missing)} (kernel {kernel!r}): rebuild it")
    run = GuestRun(directory=_new_run_directory(), kernel=kernel)
    overlay = run.directory / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(image / "rootfs.img"),
            "-F",
            "raw",
            str(overlay),
        ],
        check=True,
        timeout=60,
    )
    env = {
        "BLOCKWIRE_INSIDE_FILES": " ".join(files) or "tests/guest/inside",
        "BLOCKWIRE_RECORD": "1" if record else "0",
        "BLOCKWIRE_REQUIRE_TIERS": os.environ.get("BLOCKWIRE_REQUIRE_TIERS", ""),
        "BLOCKWIRE_INSIDE_TEST_TIMEOUT": str(INSIDE_TEST_TIMEOUT),
        "BLOCKWIRE_GUEST_KERNEL": kernel,
    }
    (run.results / "run.env").write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))
    command = qemu_command(image, overlay, run.results, run.serial, kernel)
    (run.directory / "qemu.cmd").write_text(" ".join(command) + "\n")
    started = time.monotonic()
    _log(f"booting the guest on its {kernel} kernel ({run.directory}), at most {timeout:.0f}s")
    with (run.directory / "qemu.log").open("wb") as qemu_log:
        proc = subprocess.Popen(command, stdout=qemu_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            run.notes.append(f"the guest did not power off within {timeout:.0f}s: QEMU killed")
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    run.seconds = time.monotonic() - started
    _log(f"QEMU ended after {run.seconds:.0f}s")
    with contextlib.suppress(FileNotFoundError):
        overlay.unlink()
    rc_file = run.results / "rc"
    if rc_file.exists():
        with contextlib.suppress(ValueError):
            run.returncode = int(rc_file.read_text().strip())
    crash = run.kernel_crash()
    if crash:
        run.notes.append(f"the guest kernel crashed: {crash}")
    if run.returncode is None and not run.timed_out:
        run.notes.append(f"QEMU exited with {proc.returncode} before the guest wrote its exit code")
    return run


def guest_versions(image: Path) -> str:
    path = image / "versions.txt"
    return path.read_text() if path.exists() else ""


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guest.image", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build what is missing from the cache and print its paths")
    run_parser = sub.add_parser("run", help="boot and run inside tests")
    run_parser.add_argument("files", nargs="*")
    run_parser.add_argument(
        "--kernel", choices=sorted(KERNELS), default=DEFAULT_KERNEL, help="the guest kernel to boot"
    )
    sub.add_parser("record", help="boot, record real tool output, copy it into tests/data/recorded")
    args = parser.parse_args(argv)
    missing = requirements_missing()
    if missing:
        print(f"guest: {missing}", file=sys.stderr)
        return 2
    if args.command == "build":
        started = time.monotonic()
        image = ensure_image()
        print(json.dumps({"image": str(image), "seconds": round(time.monotonic() - started, 1)}))
        return 0
    run = run_guest(
        getattr(args, "files", ()),
        record=args.command == "record",
        kernel=getattr(args, "kernel", DEFAULT_KERNEL),
    )
    print(f"guest: {run.directory} rc={run.returncode} {run.seconds:.0f}s {' '.join(run.notes)}")
    if run.returncode is None:
        print(run.serial_tail(), file=sys.stderr)
        return 1
    if args.command == "record":
        recorded = run.results / "recorded"
        target = REPO / "tests" / "data" / "recorded"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(recorded.iterdir()):
            shutil.copy2(path, target / path.name)
        print(f"guest: copied {len(list(recorded.iterdir()))} files into {target}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(_main())
