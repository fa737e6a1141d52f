"""Records real NVMe/TCP output in the guest (nvme-cli 2.3, kernel 6.1 sysfs) for the parsers' unit tests.

Against the test's own nvmet target (tests/guest/inside/nvmet.py): one subsystem on two ports, a
namespace with a known NGUID and UUID, a second subsystem that needs DH-HMAC-CHAP. Files go to
$BLOCKWIRE_GUEST_RESULTS/recorded-nvme/ (copied into tests/data/recorded/ by hand). The test also
asserts what the connector relies on: the fabrics device answers "instance=N,cntlid=M", a repeat of a
connect is EALREADY, a wrong DH-HMAC-CHAP key is refused, one head over two controllers.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.inside import kernel, nvmet

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6f1f6c8e-1b7e-4c55-9e52-0a7e3b2d9c11"
HOSTID = "6f1f6c8e-1b7e-4c55-9e52-0a7e3b2d9c11"
NQN = "nqn.2026-01.io.blockwire.test:rec1"
NQN_AUTH = "nqn.2026-01.io.blockwire.test:rec2"
NGUID = "0f3c2a9e5d7b4c61a2b3c4d5e6f70811"
NS_UUID = "3b9e2f4a-6c1d-4e8f-9a0b-1c2d3e4f5a6b"


@pytest.fixture
def target(tmp_path: Path) -> Iterator[nvmet.Nvmet]:
    why = nvmet.available()
    if why:
        pytest.fail(f"NVMe/TCP is not available in the guest: {why}", pytrace=False)
    t = nvmet.Nvmet()
    try:
        yield t
    finally:
        nvmet.disconnect_all()
        kernel.settle()
        t.close()


def fabrics(options: str) -> tuple[int, str]:
    fd = os.open("/dev/nvme-fabrics", os.O_RDWR)
    try:
        try:
            os.write(fd, options.encode())
        except OSError as exc:
            return exc.errno or -1, ""
        return 0, os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def save(out: Path, name: str, argv: list[str], rc_file: bool = False) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    text = proc.stdout
    if rc_file:
        text = (
            f"$ {' '.join(argv)}\nrc: {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}"
        )
    (out / name).write_text(text)
    return proc.stdout


def dump_tree(root: Path, depth: int = 1) -> str:
    lines = []
    for p in sorted(root.iterdir()):
        kind = "l" if p.is_symlink() else "d" if p.is_dir() else "f"
        value = ""
        if kind == "l":
            value = os.readlink(p)
        elif kind == "f":
            try:
                value = p.read_text(errors="replace").strip()[:200]
            except OSError as exc:
                value = f"<{exc.strerror}>"
        lines.append(f"{kind} {p.name} {value}")
        if kind == "d" and depth > 1:
            lines += ["  " + line for line in dump_tree(p, depth - 1).splitlines()]
    return "\n".join(lines) + "\n"


def test_record_nvme(target: nvmet.Nvmet, tmp_path: Path) -> None:
    out = Path(os.environ.get("BLOCKWIRE_GUEST_RESULTS", str(tmp_path)), "recorded-nvme")
    out.mkdir(parents=True, exist_ok=True)
    target.subsystem(NQN, HOSTNQN)
    target.namespace(NQN, 1, tmp_path / "ns1.img", 32 << 20, nguid=NGUID, ns_uuid=NS_UUID)
    key = nvmet.dhchap_key()
    no_auth = nvmet.target_auth()
    (out / "nvmet_target_auth.txt").write_text(no_auth or "DH-HMAC-CHAP supported\n")
    if not no_auth:
        target.subsystem(NQN_AUTH, HOSTNQN, addresses=(nvmet.ADDRESSES[0],))
        target.host(HOSTNQN, key)
        target.namespace(NQN_AUTH, 1, tmp_path / "ns2.img", 16 << 20)
    (out / "module_nvme_core_multipath.txt").write_text(
        Path("/sys/module/nvme_core/parameters/multipath").read_text()
    )
    save(out, "nvme_version.txt", ["nvme", "version"])
    save(out, "nvme_connect_help.txt", ["nvme", "connect", "--help"], rc_file=True)

    base = f"transport=tcp,trsvcid=4420,nqn={NQN},hostnqn={HOSTNQN},hostid={HOSTID}"
    tmo = ",ctrl_loss_tmo=30,reconnect_delay=2"
    rc, answer = fabrics(f"traddr={nvmet.ADDRESSES[0]},{base}{tmo}")
    (out / "fabrics_connect_answer.txt").write_text(f"rc: {rc}\n{answer}")
    assert rc == 0, (rc, answer)
    assert answer.startswith("instance="), answer
    rc, answer = fabrics(f"traddr={nvmet.ADDRESSES[0]},{base}{tmo}")
    (out / "fabrics_connect_again.txt").write_text(f"rc: {rc} ({errno.errorcode.get(rc, '')})\n{answer}")
    assert rc == errno.EALREADY, rc
    # the second path through nvme-cli itself
    save(
        out,
        "nvme_connect_rc.txt",
        ["nvme", "connect", "-t", "tcp", "-a", nvmet.ADDRESSES[1], "-s", "4420", "-n", NQN,
         "--hostnqn", HOSTNQN, "--hostid", HOSTID, "--ctrl-loss-tmo", "30", "--reconnect-delay", "2"],
        rc_file=True,
    )  # fmt: skip
    save(
        out,
        "nvme_connect_again_rc.txt",
        ["nvme", "connect", "-t", "tcp", "-a", nvmet.ADDRESSES[1], "-s", "4420", "-n", NQN,
         "--hostnqn", HOSTNQN, "--hostid", HOSTID],
        rc_file=True,
    )  # fmt: skip
    # DH-HMAC-CHAP: a wrong key refused, the right one accepted
    wrong = nvmet.dhchap_key()
    rc, answer = fabrics(f"traddr={nvmet.ADDRESSES[0]},transport=tcp,trsvcid=4420,nqn={NQN_AUTH},"
                         f"hostnqn={HOSTNQN},hostid={HOSTID},dhchap_secret={wrong}")  # fmt: skip
    (out / "fabrics_connect_wrong_dhchap.txt").write_text(
        f"rc: {rc} ({errno.errorcode.get(rc, '')})\n{answer}"
    )
    rc_none, answer = fabrics(f"traddr={nvmet.ADDRESSES[0]},transport=tcp,trsvcid=4420,nqn={NQN_AUTH},"
                              f"hostnqn={HOSTNQN},hostid={HOSTID}")  # fmt: skip
    (out / "fabrics_connect_no_dhchap.txt").write_text(
        f"rc: {rc_none} ({errno.errorcode.get(rc_none, '')})\n{answer}"
    )
    rc_ok, answer = fabrics(f"traddr={nvmet.ADDRESSES[0]},transport=tcp,trsvcid=4420,nqn={NQN_AUTH},"
                            f"hostnqn={HOSTNQN},hostid={HOSTID},dhchap_secret={key}")  # fmt: skip
    (out / "fabrics_connect_dhchap_ok.txt").write_text(f"rc: {rc_ok}\n{answer.replace(key, '<key>')}")
    kernel.settle()
    save(out, "nvme_list_subsys_json.txt", ["nvme", "list-subsys", "-o", "json"])
    save(out, "nvme_list_subsys.txt", ["nvme", "list-subsys"])
    save(out, "nvme_list_json.txt", ["nvme", "list", "-o", "json"])
    save(out, "nvme_list_v_json.txt", ["nvme", "list", "-v", "-o", "json"])
    save(out, "nvme_list.txt", ["nvme", "list"])
    save(out, "ls_sys_block.txt", ["ls", "-l", "/sys/block"])
    save(out, "ls_sys_class_nvme.txt", ["ls", "-l", "/sys/class/nvme", "/sys/class/nvme-subsystem"])
    for c in sorted(nvmet.SYS_NVME.iterdir()):
        (out / f"sysfs_class_nvme_{c.name}.txt").write_text(dump_tree(c))
    for s in sorted(nvmet.SYS_SUBSYS.iterdir()):
        (out / f"sysfs_class_nvme-subsystem_{s.name}.txt").write_text(dump_tree(s))
    for b in sorted(Path("/sys/block").glob("nvme*")):
        (out / f"sysfs_block_{b.name}.txt").write_text(dump_tree(b))
        save(out, f"udevadm_info_{b.name}.txt", ["udevadm", "info", f"/dev/{b.name}"])
    save(out, "ls_dev_disk_by_id.txt", ["ls", "-l", "/dev/disk/by-id"])
    save(out, "nvme_ns_descs_json.txt", ["nvme", "ns-descs", "/dev/nvme0n1", "-o", "json"], rc_file=True)
    save(out, "nvme_id_ns_json.txt", ["nvme", "id-ns", "/dev/nvme0n1", "-o", "json"], rc_file=True)
    # one port down: that controller reconnects; list-subsys shows it
    target.hide(NQN, nvmet.ADDRESSES[1])
    kernel.wait_until(
        "a controller not live",
        lambda: any(a.get("state") != "live" for a in nvmet.controllers().values()),
        30,
    )
    save(out, "nvme_list_subsys_json_one_down.txt", ["nvme", "list-subsys", "-o", "json"])
    (out / "controllers_one_down.txt").write_text(repr(nvmet.controllers()))
    target.expose(NQN, nvmet.ADDRESSES[1])
    save(out, "nvme_disconnect_rc.txt", ["nvme", "disconnect", "-n", NQN], rc_file=True)
    save(out, "nvme_disconnect_none_rc.txt", ["nvme", "disconnect", "-n", NQN], rc_file=True)
    save(out, "dmesg_tail.txt", ["dmesg"])
    # DH-HMAC-CHAP is asserted where the kernel has it; this one's lack is recorded above
    # (nvmet_target_auth.txt) and test_e2e_nvme's DH-HMAC-CHAP test skips saying so.
    if not no_auth:
        assert rc != 0, "a wrong DH-HMAC-CHAP key was accepted"
        assert rc_ok == 0, rc_ok
