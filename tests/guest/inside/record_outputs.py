"""Records real output of the tools the host agent parses, inside the guest, into a directory.

Run by tests/guest/test-init.sh when the host asks for a recording (`python -m tests.guest.image record`,
which then copies the files into tests/data/recorded/). Plain files hold a command's stdout exactly;
files named *_rc*.txt hold the command, its exit code, stdout and stderr. INDEX.txt lists every file
with its command and exit code.

Setup: tgtd on 127.0.0.1:3260 and 127.0.0.2:3260; target 1 announces an identity set with
`--params scsi_id=...,scsi_sn=...`, target 2 keeps tgt's default identity, target 3 needs CHAP.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.guest.inside import kernel
from tests.host.daemons import Tgtd

IQN = "iqn.2024-01.test.blockwire:rec1"
IQN_DEFAULT = "iqn.2024-01.test.blockwire:rec2"
IQN_CHAP = "iqn.2024-01.test.blockwire:rec3"
SCSI_ID = "bw-0f3c2a9e5d7b4c61"
SCSI_SN = "BW0F3C2A9E5D7B4C61"
CHAP_USER, CHAP_SECRET = "blockwire", "correct-secret-1"
P1, P2 = kernel.PORTALS


class Recorder:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.index: list[str] = []

    def save(self, name: str, argv: list[str], *, with_rc: bool = False, timeout: float = 120) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        command = " ".join(a if a and " " not in a else repr(a) for a in argv)
        if with_rc:
            text = (
                f"$ {command}\nrc: {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}"
            )
        else:
            text = proc.stdout
            if proc.returncode != 0:
                print(f"record: {command} exited {proc.returncode}: {proc.stderr.strip()}", file=sys.stderr)
        (self.out / name).write_text(text)
        self.index.append(f"{name}\trc={proc.returncode}\t$ {command}")
        return proc.stdout

    def write(self, name: str, text: str, what: str) -> None:
        (self.out / name).write_text(text)
        self.index.append(f"{name}\t-\t{what}")


def chap_node(iqn: str, portal: str, secret: str) -> None:
    kernel.node_new(iqn, portal)
    for key, value in (
        ("node.session.auth.authmethod", "CHAP"),
        ("node.session.auth.username", CHAP_USER),
        ("node.session.auth.password", secret),
    ):
        kernel.run(
            ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-o", "update", "-n", key, "-v", value]
        )


def record(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out)
    tgtd = Tgtd(portals=kernel.PORTALS)
    tgtd.start()
    work = Path("/tmp/record")
    work.mkdir(exist_ok=True)
    try:
        kernel.make_target(tgtd, 1, IQN, work / "lun1.img", scsi_id=SCSI_ID, scsi_sn=SCSI_SN)
        kernel.make_target(tgtd, 2, IQN_DEFAULT, work / "lun2.img")
        kernel.make_target(tgtd, 3, IQN_CHAP, work / "lun3.img")
        tgtd.adm("--op", "new", "--mode", "account", "--user", CHAP_USER, "--password", CHAP_SECRET)
        tgtd.adm("--op", "bind", "--mode", "account", "--tid", "3", "--user", CHAP_USER)
        rec.write(
            "tgtadm_show_target.txt",
            tgtd.adm("--op", "show", "--mode", "target").stdout,
            "tgtadm --lld iscsi --op show --mode target",
        )

        # Nothing yet: the "no records" exit codes.
        rec.save("iscsiadm_session_none_rc.txt", ["iscsiadm", "-m", "session"], with_rc=True)
        rec.save("iscsiadm_node_none_rc.txt", ["iscsiadm", "-m", "node"], with_rc=True)
        rec.save(
            "iscsiadm_node_unknown_rc.txt",
            ["iscsiadm", "-m", "node", "-T", "iqn.2024-01.test.blockwire:nosuch", "-p", P1, "--login"],
            with_rc=True,
        )
        rec.save(
            "iscsiadm_discovery_st.txt",
            ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", P1, "-o", "nonpersistent"],
        )

        # A static node record for a target the portal does not have: login fails.
        kernel.node_new("iqn.2024-01.test.blockwire:wrong", P1)
        rec.save(
            "iscsiadm_login_wrong_target_rc.txt",
            ["iscsiadm", "-m", "node", "-T", "iqn.2024-01.test.blockwire:wrong", "-p", P1, "--login"],
            with_rc=True,
        )
        kernel.run(["iscsiadm", "-m", "node", "-o", "delete", "-T", "iqn.2024-01.test.blockwire:wrong"])

        # Wrong CHAP secret: exit 24.
        chap_node(IQN_CHAP, P1, "wrong-secret-12")
        rec.save(
            "iscsiadm_login_wrong_chap_rc.txt",
            ["iscsiadm", "-m", "node", "-T", IQN_CHAP, "-p", P1, "--login"],
            with_rc=True,
        )
        kernel.run(["iscsiadm", "-m", "node", "-o", "delete", "-T", IQN_CHAP])

        # Log in to target 1 on both portals while udev's event stream is captured.
        for portal in kernel.PORTALS:
            kernel.node_new(IQN, portal)
        kernel.settle()
        with (out / "udevadm_monitor_login.txt").open("w") as stream:
            monitor = subprocess.Popen(
                ["udevadm", "monitor", "--udev", "--property"], stdout=stream, stderr=subprocess.STDOUT
            )
            try:
                time.sleep(1)  # udevadm monitor has no readiness signal; it subscribes at once
                rec.save(
                    "iscsiadm_login_rc.txt",
                    ["iscsiadm", "-m", "node", "-T", IQN, "-p", P1, "--login"],
                    with_rc=True,
                )
                kernel.login(IQN, P2)
                disks = {p: kernel.disk_for(p, IQN) for p in kernel.PORTALS}
                kernel.settle()
                wwid = kernel.sysfs_wwid(disks[P1])
                serial = kernel.udev_properties(f"/dev/{disks[P1]}")["ID_SERIAL"]
                name = kernel.wait_until("map", lambda: kernel.map_for(serial), 60)
                kernel.wait_until(
                    "two active paths",
                    lambda: sum(p.wwid == serial and p.dm_state == "active" for p in kernel.map_paths()) == 2,
                    60,
                )
                kernel.settle()
            finally:
                monitor.terminate()
                monitor.wait(timeout=10)
        rec.index.append("udevadm_monitor_login.txt\t-\tudevadm monitor --udev --property during both logins")
        sd = disks[P1]
        dm = kernel.dm_device(name)

        rec.save(
            "iscsiadm_session_exists_rc.txt",
            ["iscsiadm", "-m", "node", "-T", IQN, "-p", P1, "--login"],
            with_rc=True,
        )
        rec.save("iscsiadm_session.txt", ["iscsiadm", "-m", "session"])
        rec.save("iscsiadm_session_P1.txt", ["iscsiadm", "-m", "session", "-P", "1"])
        rec.save("iscsiadm_session_P3.txt", ["iscsiadm", "-m", "session", "-P", "3"])
        sid = kernel.run(["iscsiadm", "-m", "session"]).stdout.split("[", 1)[1].split("]", 1)[0]
        rec.save("iscsiadm_session_r_P3.txt", ["iscsiadm", "-m", "session", "-r", sid, "-P", "3"])
        rec.save("iscsiadm_node.txt", ["iscsiadm", "-m", "node"])
        rec.save("iscsiadm_node_record.txt", ["iscsiadm", "-m", "node", "-T", IQN, "-p", P1])
        rec.save("iscsiadm_iface.txt", ["iscsiadm", "-m", "iface"])
        rec.save("multipath_ll.txt", ["multipath", "-ll"])
        rec.save("multipath_ll_v3.txt", ["multipath", "-ll", "-v3"])
        rec.save("multipathd_show_paths.txt", ["multipathd", "show", "paths", "format", "%d %w %t %T %o %i"])
        rec.save("multipathd_show_paths_default.txt", ["multipathd", "show", "paths"])
        rec.save("multipathd_show_maps.txt", ["multipathd", "show", "maps", "format", "%n %w %d %N"])
        rec.save("multipathd_show_maps_json.txt", ["multipathd", "show", "maps", "json"])
        rec.save("multipathd_show_topology.txt", ["multipathd", "show", "topology"])
        rec.save("dmsetup_table.txt", ["dmsetup", "table"])
        rec.save("dmsetup_info_map.txt", ["dmsetup", "info", name])
        rec.save("udevadm_info_sd.txt", ["udevadm", "info", "--query=property", f"--name=/dev/{sd}"])
        rec.save("udevadm_info_dm.txt", ["udevadm", "info", "--query=property", f"--name=/dev/{dm}"])
        rec.save("ls_disk_by_path.txt", ["ls", "-l", "/dev/disk/by-path"])
        rec.save("ls_disk_by_id.txt", ["ls", "-l", "/dev/disk/by-id"])
        rec.save("lsscsi.txt", ["lsscsi", "-t", "-i"])
        rec.save("lsblk.txt", ["lsblk", "-o", "NAME,KNAME,TYPE,SIZE,WWN,SERIAL,VENDOR,MODEL,TRAN"])
        rec.write("sysfs_wwid.txt", kernel.sysfs_wwid(sd) + "\n", f"cat /sys/block/{sd}/device/wwid")
        for page in ("vpd_pg83", "vpd_pg80"):
            data = (Path("/sys/block", sd, "device", page)).read_bytes()
            rec.write(f"sysfs_{page}.hex", data.hex() + "\n", f"/sys/block/{sd}/device/{page} as hex")
        attrs = "".join(
            f"{a}: {(Path('/sys/block', sd, 'device', a)).read_text().strip()}\n"
            for a in ("vendor", "model", "rev", "wwid", "state", "queue_depth")
        )
        rec.write("sysfs_scsi_device.txt", attrs, f"/sys/block/{sd}/device/{{vendor,model,rev,wwid,...}}")
        rec.save("sg_inq_pg83.txt", ["sg_inq", "-p", "0x83", f"/dev/{sd}"])
        rec.save("sg_inq_pg80.txt", ["sg_inq", "-p", "0x80", f"/dev/{sd}"])
        rec.save("sg_inq_std.txt", ["sg_inq", f"/dev/{sd}"])
        rec.save("scsi_id.txt", ["/lib/udev/scsi_id", "--whitelisted", "--export", f"--device=/dev/{sd}"])
        rec.write(
            "sysfs_iscsi_session.txt", _sysfs_sessions(), "/sys/class/iscsi_{session,connection} attributes"
        )

        # tgt's default identity (no scsi_id/scsi_sn): log in to target 2 on one portal.
        kernel.node_new(IQN_DEFAULT, P1)
        kernel.login(IQN_DEFAULT, P1)
        sd2 = kernel.disk_for(P1, IQN_DEFAULT)
        kernel.settle()
        rec.save(
            "default_identity_udevadm_info_sd.txt",
            ["udevadm", "info", "--query=property", f"--name=/dev/{sd2}"],
        )
        rec.write(
            "default_identity_sysfs_wwid.txt",
            kernel.sysfs_wwid(sd2) + "\n",
            f"cat /sys/block/{sd2}/device/wwid (tgt default identity)",
        )
        rec.write(
            "default_identity_sysfs_vpd_pg83.hex",
            Path("/sys/block", sd2, "device", "vpd_pg83").read_bytes().hex() + "\n",
            "vpd_pg83 (tgt default identity) as hex",
        )
        rec.save("default_identity_sg_inq_pg83.txt", ["sg_inq", "-p", "0x83", f"/dev/{sd2}"])
        rec.save("default_identity_multipath_ll.txt", ["multipath", "-ll"])

        # Logout and the state after one path is gone.
        rec.save(
            "iscsiadm_logout_rc.txt",
            ["iscsiadm", "-m", "node", "-T", IQN, "-p", P2, "--logout"],
            with_rc=True,
        )
        kernel.settle()
        kernel.wait_until("one path left", lambda: sum(p.wwid == serial for p in kernel.map_paths()) == 1, 60)
        rec.save("multipath_ll_one_path.txt", ["multipath", "-ll", name])
        kernel.flush_map(name)
        kernel.logout(IQN, P1)
        kernel.run(["multipath", "-F"])
        kernel.logout(IQN_DEFAULT, P1)
        kernel.run(["iscsiadm", "-m", "node", "-o", "delete"])
        kernel.settle()
        rec.write("identity_variants.txt", _identity_variants(tgtd, work), "see identity_variants()")
        rec.write(
            "identity_summary.txt",
            f"scsi_id={SCSI_ID} scsi_sn={SCSI_SN}\nsysfs wwid: {wwid}\nID_SERIAL: {serial}\nmap: {name}\n",
            "summary",
        )
    finally:
        kernel.force_cleanup()
        for tid in (1, 2, 3, 4):
            kernel.delete_target(tgtd, tid)
        tgtd.stop()
        (out / "INDEX.txt").write_text("\n".join(rec.index) + "\n")
    left = kernel.leftovers()
    if left:
        raise SystemExit(f"record: left behind {left}")


# scsi_id / scsi_sn values whose announced identity is recorded (identity_variants.txt)
VARIANTS = (
    ("0123456789abcdef", "SN16CHARS0000001"),
    ("0123456789abcdef01234567", "6f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b"),
    ("0123456789abcdef012345678", "SN-25"),
    ("0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef0123456789"),
    ("0123456789ABCDEF", "UPPER"),
    ("vol-0f3c2a9e", "vol-0f3c2a9e"),
)


def _identity_variants(tgtd: Tgtd, work: Path) -> str:
    """One target with a LUN per (scsi_id, scsi_sn) in VARIANTS: what the kernel, udev and multipath read."""
    iqn = "iqn.2024-01.test.blockwire:rec4"
    tgtd.adm("--op", "new", "--mode", "target", "--tid", "4", "-T", iqn)
    for lun, (scsi_id, scsi_sn) in enumerate(VARIANTS, start=1):
        backing = work / f"variant{lun}.img"
        with backing.open("wb") as f:
            f.truncate(8 * 1024 * 1024)
        tgtd.adm("--op", "new", "--mode", "logicalunit", "--tid", "4", "--lun", str(lun), "-b", str(backing))
        tgtd.adm("--op", "update", "--mode", "logicalunit", "--tid", "4", "--lun", str(lun),
                 "--params", f"scsi_id={scsi_id},scsi_sn={scsi_sn}")  # fmt: skip
    tgtd.adm("--op", "bind", "--mode", "target", "--tid", "4", "-I", "ALL")
    kernel.node_new(iqn, P1)
    kernel.login(iqn, P1)
    rows = ["scsi_id\tscsi_sn\tsysfs wwid\tID_SERIAL\tID_WWN_WITH_EXTENSION\tID_SCSI_SERIAL\t"
            "SCSI_IDENT_LUN_T10\tmultipath map WWID\tvpd_pg83 hex"]  # fmt: skip
    try:
        for lun, (scsi_id, scsi_sn) in enumerate(VARIANTS, start=1):
            sd = kernel.disk_for(P1, iqn, lun)
            kernel.settle()
            props = kernel.udev_properties(f"/dev/{sd}")
            serial = props.get("ID_SERIAL", "")
            name = kernel.wait_until(f"map of LUN {lun}", lambda s=serial: kernel.map_for(s), 60)
            vpd83 = Path("/sys/block", sd, "device", "vpd_pg83").read_bytes().hex()
            rows.append("\t".join((
                scsi_id, scsi_sn, kernel.sysfs_wwid(sd), serial, props.get("ID_WWN_WITH_EXTENSION", ""),
                props.get("ID_SCSI_SERIAL", ""), props.get("SCSI_IDENT_LUN_T10", ""),
                kernel.maps()[name], vpd83,
            )))  # fmt: skip
    finally:
        kernel.run(["multipath", "-F"], ok=(0, 1))
        kernel.logout(iqn, P1, ok=(0, kernel.ISCSI_ERR_NO_OBJS_FOUND))
        kernel.run(
            ["iscsiadm", "-m", "node", "-o", "delete", "-T", iqn], ok=(0, kernel.ISCSI_ERR_NO_OBJS_FOUND)
        )
        kernel.settle()
    return "\n".join(rows) + "\n"


def _sysfs_sessions() -> str:
    lines = []
    for cls in ("iscsi_session", "iscsi_connection"):
        for obj in sorted(Path("/sys/class", cls).iterdir()):
            for attr in sorted(obj.iterdir()):
                if attr.is_file() and attr.name not in ("uevent",):
                    try:
                        value = attr.read_text().strip()
                    except OSError as exc:
                        value = f"<{exc.strerror}>"
                    lines.append(f"{cls}/{obj.name}/{attr.name}: {value}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    record(Path(sys.argv[1]))
