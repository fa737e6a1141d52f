"""Records real NVMe/TCP output in the guest (nvme-cli 2.3, kernel 6.1 sysfs) for the parsers' unit tests.

Against the test's own nvmet target (tests/guest/inside/nvmet.py): one subsystem on two ports, a
namespace with a known NGUID and UUID. Files go to $BLOCKWIRE_GUEST_RESULTS/recorded-nvme/ (copied into
tests/data/recorded/ by hand). The test also asserts what the connector relies on: the fabrics device
answers "instance=N,cntlid=M", a repeat of a connect is EALREADY, one head over two controllers.

DH-HMAC-CHAP (test_dhchap_raw) runs on the guest's backports kernel (6.12) only: a subsystem that
demands it, host and controller keys; through /dev/nvme-fabrics (what the agent does) and through
nvme-cli 2.3 (`nvme connect --dhchap-secret --dhchap-ctrl-secret`): the right keys accepted, a wrong host
key, a wrong controller key and no key refused with nothing left connected. Output (keys scrubbed) goes
to recorded-nvme-dhchap/.
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
    no_auth = nvmet.target_auth()
    (out / "nvmet_target_auth.txt").write_text(no_auth or "DH-HMAC-CHAP supported\n")
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


def auth_controllers() -> list[str]:
    return [name for name, a in nvmet.controllers().items() if a.get("subsysnqn") == NQN_AUTH]


@pytest.mark.guest_kernel("backports")
def test_dhchap_raw(target: nvmet.Nvmet, tmp_path: Path) -> None:
    why = nvmet.target_auth()
    if why:
        pytest.skip(
            f"DH-HMAC-CHAP cannot run on {os.uname().release}: {why} (needs CONFIG_NVME_AUTH, "
            "CONFIG_NVME_HOST_AUTH, CONFIG_NVME_TARGET_AUTH)"
        )
    out = Path(os.environ.get("BLOCKWIRE_GUEST_RESULTS", str(tmp_path)), "recorded-nvme-dhchap")
    out.mkdir(parents=True, exist_ok=True)
    key, ctrl_key = nvmet.dhchap_key(), nvmet.dhchap_key()
    keys = {key: "<host key>", ctrl_key: "<ctrl key>"}

    def scrub(text: str) -> str:
        for k, shown in keys.items():
            text = text.replace(k, shown)
        return text

    target.subsystem(NQN_AUTH, HOSTNQN, addresses=(nvmet.ADDRESSES[0],))
    target.host(HOSTNQN, key, ctrl_key)
    target.namespace(NQN_AUTH, 1, tmp_path / "ns2.img", 16 << 20)
    base = (f"traddr={nvmet.ADDRESSES[0]},transport=tcp,trsvcid=4420,nqn={NQN_AUTH},"
            f"hostnqn={HOSTNQN},hostid={HOSTID}")  # fmt: skip
    (out / "uname.txt").write_text(os.uname().release + "\n")

    # Refused through the fabrics device: a wrong host key, a wrong controller key, no key.
    refused = {
        "wrong_host_key": f"{base},dhchap_secret={nvmet.dhchap_key()}",
        "wrong_ctrl_key": f"{base},dhchap_secret={key},dhchap_ctrl_secret={nvmet.dhchap_key()}",
        "no_key": base,
    }
    for case, options in refused.items():
        rc, answer = fabrics(options)
        (out / f"fabrics_connect_{case}.txt").write_text(
            f"rc: {rc} ({errno.errorcode.get(rc, '')})\n{scrub(answer)}"
        )
        assert rc != 0, f"{case}: accepted ({answer})"
        kernel.settle()
        assert auth_controllers() == [], f"{case}: a controller was left"

    # Accepted, both directions: the host key and the controller key.
    rc, answer = fabrics(f"{base},dhchap_secret={key},dhchap_ctrl_secret={ctrl_key}")
    (out / "fabrics_connect_dhchap_ok.txt").write_text(f"rc: {rc}\n{scrub(answer)}")
    assert rc == 0, rc
    assert answer.startswith("instance="), answer
    kernel.settle()
    made = auth_controllers()
    assert len(made) == 1, made
    ctrl = nvmet.SYS_NVME / made[0]
    assert (ctrl / "state").read_text().strip() == "live"
    (out / f"sysfs_class_nvme_{made[0]}.txt").write_text(scrub(dump_tree(ctrl)))
    assert (ctrl / "dhchap_secret").read_text().strip() == key
    assert (ctrl / "dhchap_ctrl_secret").read_text().strip() == ctrl_key
    save(out, "nvme_disconnect_dhchap_rc.txt", ["nvme", "disconnect", "-n", NQN_AUTH], rc_file=True)
    kernel.settle()
    assert auth_controllers() == []

    # nvme-cli 2.3: the same through `nvme connect` (the secrets on its argv: not the agent's way).
    cli = ["nvme", "connect", "-t", "tcp", "-a", nvmet.ADDRESSES[0], "-s", "4420", "-n", NQN_AUTH,
           "--hostnqn", HOSTNQN, "--hostid", HOSTID]  # fmt: skip
    wrong = subprocess.run(
        [*cli, "--dhchap-secret", nvmet.dhchap_key()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    (out / "nvme_connect_wrong_dhchap_rc.txt").write_text(
        f"rc: {wrong.returncode}\n--- stdout ---\n{wrong.stdout}--- stderr ---\n{wrong.stderr}"
    )
    assert wrong.returncode != 0, "nvme connect with a wrong key succeeded"
    kernel.settle()
    assert auth_controllers() == []
    ok = subprocess.run(
        [*cli, "--dhchap-secret", key, "--dhchap-ctrl-secret", ctrl_key],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    (out / "nvme_connect_dhchap_ok_rc.txt").write_text(
        f"rc: {ok.returncode}\n--- stdout ---\n{scrub(ok.stdout)}--- stderr ---\n{scrub(ok.stderr)}"
    )
    assert ok.returncode == 0, scrub(ok.stderr)
    kernel.settle()
    made = auth_controllers()
    assert len(made) == 1, made
    assert (nvmet.SYS_NVME / made[0] / "state").read_text().strip() == "live"
    save(out, "nvme_list_subsys_dhchap.txt", ["nvme", "list-subsys", "-o", "json"])
    save(out, "nvme_disconnect_cli_rc.txt", ["nvme", "disconnect", "-n", NQN_AUTH], rc_file=True)
    kernel.settle()
    assert auth_controllers() == []
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    (out / "dmesg_auth.txt").write_text(
        scrub("\n".join(line for line in dmesg.splitlines() if "nvme" in line)) + "\n"
    )
