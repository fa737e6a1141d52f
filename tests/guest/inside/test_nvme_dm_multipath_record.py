"""Records, in the guest, what dm-multipath makes of NVMe/TCP namespaces when native NVMe multipath is off
(nvme_core multipath=N): each controller's own namespace device nvmeNn1 with the same wwid, multipathd's
paths and map over them (multipath-tools 0.9.4, kernel 6.1), for the parsers' unit tests. Files go to
$BLOCKWIRE_GUEST_RESULTS/recorded-nvme-mp/ (copied into tests/data/recorded/ as nvme_mp_*).

Two subsystems on the test's own nvmet target: one on two ports with a namespace carrying an NGUID and a
UUID (the kernel's wwid is then uuid.<UUID>), one on one port whose namespace has an NGUID only
(wwid eui.<NGUID>). nvme_core is reloaded with multipath=N for the test and with multipath=Y after.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.inside import kernel, nvmet

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6f1f6c8e-1b7e-4c55-9e52-0a7e3b2d9c11"
HOSTID = "6f1f6c8e-1b7e-4c55-9e52-0a7e3b2d9c11"
NQN = "nqn.2026-01.io.blockwire.test:mp1"
NQN2 = "nqn.2026-01.io.blockwire.test:mp2"
NGUID = "0f3c2a9e5d7b4c61a2b3c4d5e6f70811"
NS_UUID = "3b9e2f4a-6c1d-4e8f-9a0b-1c2d3e4f5a6b"
NGUID2 = "7a1b2c3d4e5f60718293a4b5c6d7e8f9"


@pytest.fixture
def target() -> Iterator[nvmet.Nvmet]:
    why = nvmet.available() or nvmet.reload_host_driver(multipath=False)
    if why:
        pytest.fail(f"NVMe/TCP without native multipath is not available in the guest: {why}", pytrace=False)
    t = nvmet.Nvmet()
    try:
        yield t
    finally:
        for name in kernel.maps():
            subprocess.run(["multipath", "-f", name], check=False, capture_output=True, timeout=60)
        nvmet.disconnect_all()
        kernel.settle()
        t.close()
        assert not nvmet.reload_host_driver(multipath=True)


def fabrics(options: str) -> str:
    fd = os.open("/dev/nvme-fabrics", os.O_RDWR)
    try:
        os.write(fd, options.encode())
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def save(out: Path, name: str, argv: list[str], rc_file: bool = False) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    text = proc.stdout
    if rc_file:
        head = f"$ {' '.join(argv)}\nrc: {proc.returncode}\n"
        text = f"{head}--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}"
    (out / name).write_text(text)
    return proc.stdout


def attrs(dev: str) -> str:
    lines = []
    for a in ("nsid", "nguid", "uuid", "wwid", "size", "hidden"):
        p = Path("/sys/block", dev, a)
        lines.append(f"{a} {p.read_text().strip() if p.exists() else '<none>'}")
    for d in ("holders", "slaves"):
        lines.append(f"{d} {' '.join(sorted(x.name for x in Path('/sys/block', dev, d).iterdir()))}")
    lines.append(f"device {os.readlink(Path('/sys/block', dev, 'device'))}")
    return "\n".join(lines) + "\n"


def record_state(out: Path, tag: str) -> None:
    save(out, f"multipathd_show_paths{tag}.txt", ["multipathd", "show", "paths"])
    save(out, f"multipathd_show_paths_format{tag}.txt",
         ["multipathd", "show", "paths", "format", "%d %w %t %T %o %i"])  # fmt: skip
    save(
        out, f"multipathd_show_maps_format{tag}.txt", ["multipathd", "show", "maps", "format", "%n %w %d %N"]
    )
    save(out, f"multipath_ll{tag}.txt", ["multipath", "-ll"])
    save(out, f"dmsetup_table{tag}.txt", ["dmsetup", "table"])
    save(out, f"dmsetup_info{tag}.txt", ["dmsetup", "info", "-c", "-o", "name,uuid,open,segments"])


def test_record_nvme_dm_multipath(target: nvmet.Nvmet, tmp_path: Path) -> None:
    out = Path(os.environ.get("BLOCKWIRE_GUEST_RESULTS", str(tmp_path)), "recorded-nvme-mp")
    out.mkdir(parents=True, exist_ok=True)
    (out / "module_nvme_core_multipath.txt").write_text(nvmet.MULTIPATH_PARAM.read_text())
    save(out, "multipath_version.txt", ["multipath", "-t"])
    target.subsystem(NQN, HOSTNQN)
    target.namespace(NQN, 1, tmp_path / "ns1.img", 32 << 20, nguid=NGUID, ns_uuid=NS_UUID)
    target.subsystem(NQN2, HOSTNQN, addresses=(nvmet.ADDRESSES[0],))
    ns2 = target.namespace(NQN2, 1, tmp_path / "ns2.img", 16 << 20, nguid=NGUID2)
    # no UUID on the second: nvmet makes one up when device_uuid is empty, so clear it explicitly
    (nvmet.CONFIGFS / "subsystems" / NQN2 / "namespaces" / "1" / "enable").write_text("0")
    (nvmet.CONFIGFS / "subsystems" / NQN2 / "namespaces" / "1" / "device_uuid").write_text(
        "00000000-0000-0000-0000-000000000000"
    )
    (nvmet.CONFIGFS / "subsystems" / NQN2 / "namespaces" / "1" / "enable").write_text("1")
    answers = []
    for a in nvmet.ADDRESSES:
        opts = f"transport=tcp,traddr={a},trsvcid=4420,nqn={NQN},hostnqn={HOSTNQN},hostid={HOSTID}"
        answers.append(fabrics(f"{opts},ctrl_loss_tmo=30,reconnect_delay=1,fast_io_fail_tmo=2"))
    answers.append(fabrics(f"transport=tcp,traddr={nvmet.ADDRESSES[0]},trsvcid=4420,nqn={NQN2},"
                           f"hostnqn={HOSTNQN},hostid={HOSTID}"))  # fmt: skip
    (out / "fabrics_answers.txt").write_text("\n".join(answers) + "\n")
    kernel.settle()
    kernel.wait_until("a multipath map", lambda: bool(kernel.maps()), 30)
    kernel.settle()
    save(out, "ls_sys_block.txt", ["ls", "-l", "/sys/block"])
    for b in sorted(Path("/sys/block").glob("nvme*")):
        (out / f"sysfs_block_{b.name}.txt").write_text(attrs(b.name))
        save(out, f"udevadm_info_{b.name}.txt", ["udevadm", "info", f"/dev/{b.name}"])
    for b in sorted(Path("/sys/block").glob("dm-*")):
        save(out, f"udevadm_info_{b.name}.txt", ["udevadm", "info", f"/dev/{b.name}"])
        (out / f"sysfs_block_{b.name}.txt").write_text(
            f"dm/name {(b / 'dm/name').read_text().strip()}\ndm/uuid {(b / 'dm/uuid').read_text().strip()}\n"
            f"slaves {' '.join(sorted(x.name for x in (b / 'slaves').iterdir()))}\n"
        )
    save(out, "ls_sys_class_nvme.txt", ["ls", "-l", "/sys/class/nvme", "/sys/class/nvme-subsystem"])
    for s in sorted(nvmet.SYS_SUBSYS.iterdir()):
        save(out, f"ls_{s.name}.txt", ["ls", "-l", str(s)])
    for c in sorted(nvmet.SYS_NVME.iterdir()):
        save(out, f"ls_class_nvme_{c.name}.txt", ["ls", "-l", str(c) + "/"])
    record_state(out, "")
    save(out, "multipath_a_rc.txt", ["multipath", "-a", f"uuid.{NS_UUID}"], rc_file=True)
    # one port down: I/O through the map goes on over the other path
    mp = next(iter(kernel.maps()))
    dm = kernel.dm_device(mp)
    target.hide(NQN, nvmet.ADDRESSES[1])
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={dm}", "bs=1M", "count=4", "oflag=direct"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    (out / "dd_one_port_down_rc.txt").write_text(f"rc: {proc.returncode}\n{proc.stderr}")
    record_state(out, "_one_down")
    (out / "controllers_one_down.txt").write_text(repr(nvmet.controllers()))
    target.expose(NQN, nvmet.ADDRESSES[1])
    kernel.wait_until(
        "both controllers live",
        lambda: all(a.get("state") == "live" for a in nvmet.controllers().values()),
        60,
    )
    kernel.settle()
    record_state(out, "_back")
    save(out, "multipath_f_rc.txt", ["multipath", "-f", mp], rc_file=True)
    save(out, "multipath_f_again_rc.txt", ["multipath", "-f", mp], rc_file=True)
    record_state(out, "_flushed")
    save(out, "dmesg_tail.txt", ["dmesg"])
    assert ns2.nguid == NGUID2
    assert proc.returncode == 0, proc.stderr
