"""Inside the guest (BLOCKWIRE_IN_GUEST=1, root, a real kernel): the `blockwire-storage` daemon with the
`file` and `lvm-thin` backends and the `nvmet` exporter (the kernel NVMe target through configfs),
reached by the kernel's NVMe/TCP initiator with a raw `nvme connect` (nvme-cli) on two ports.

Checks: CreateAttachment for a host NQN makes one subsystem with namespace 1 announcing the volume's
NGUID and UUID, admitting that host only; `nvme connect` over both ports gives one namespace head over
two paths (native NVMe multipath) with that NGUID and UUID; data written through it is in the backing
file; a host NQN not admitted is refused; ExtendVolume while connected reaches the host; DeleteAttachment
leaves nothing in configfs (no subsystem, port link or host entry); a restarted service rebuilds an
export the target lost and removes a stray subsystem under its prefix; DH-HMAC-CHAP: on the default
kernel (6.1, built without CONFIG_NVME_TARGET_AUTH and CONFIG_NVME_AUTH) the exporter refuses to start
with dhchap on; on the backports boot (6.12, `guest_kernel("backports")`) a wrong secret is refused and
the announced pair (host and controller secret) accepted.

Real nvme-cli output is saved to BLOCKWIRE_GUEST_RESULTS/recorded-nvme/ for parser tests
(tests/data/recorded/nvmet_*).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from tests.guest.inside import kernel
from tests.guest.inside.conftest import GUEST_DAEMON
from tests.guest.inside.kernel import run
from tests.rig import Daemon, wait_until

pytestmark = pytest.mark.skipif(
    os.environ.get("BLOCKWIRE_IN_GUEST") != "1", reason="runs inside the guest only"
)

MIB = 1 << 20
PORTALS = ("127.0.0.1:4420", "127.0.0.2:4420")
CONFIGFS = Path("/sys/kernel/config")
NVMET = CONFIGFS / "nvmet"
SUBSYS_CLASS = Path("/sys/class/nvme-subsystem")
HOST_ID = str(uuid.uuid4())
HOST_NQN = f"nqn.2014-08.org.nvmexpress:uuid:{HOST_ID}"
STRANGER_ID = str(uuid.uuid4())
STRANGER_NQN = f"nqn.2014-08.org.nvmexpress:uuid:{STRANGER_ID}"


def recorded(name: str, text: str) -> None:
    """Keeps real tool output for the parsers' tests (copied into tests/data/recorded/ by hand)."""
    results = os.environ.get("BLOCKWIRE_GUEST_RESULTS")
    if results:
        out = Path(results, "recorded-nvme")
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)


def record_rc(name: str, proc: subprocess.CompletedProcess[str]) -> None:
    argv = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    recorded(
        name,
        f"$ {' '.join(argv)}\nrc: {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}",
    )


@pytest.fixture(scope="module")
def nvmet() -> None:
    if not CONFIGFS.is_dir() or not any(CONFIGFS.iterdir()):
        run(["mount", "-t", "configfs", "configfs", str(CONFIGFS)], ok=(0, 32))
    run(["modprobe", "-a", "nvme_fabrics", "nvme_tcp", "nvmet", "nvmet_tcp"])
    wait_until("nvmet in configfs", (NVMET / "subsystems").is_dir, 10)
    if shutil.which("nvme") is None:
        pytest.fail("nvme-cli is missing in the guest image (tests/guest/build-base.sh)", pytrace=False)


@dataclass
class ThinPool:
    vg: str
    pool: str
    loop: str


@pytest.fixture(scope="module")
def thin_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThinPool]:
    image = tmp_path_factory.mktemp("lvm-nvmet") / "pv.img"
    with image.open("wb") as f:
        f.truncate(256 * MIB)
    loop = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    vg = f"bwnv{uuid.uuid4().hex[:8]}"
    try:
        run(["pvcreate", "-q", "-y", loop])
        run(["vgcreate", "-q", vg, loop])
        run(["lvcreate", "-q", "-y", "-L", "192m", "-T", f"{vg}/pool"])
        yield ThinPool(vg, "pool", loop)
    finally:
        run(["vgremove", "-q", "-y", "-f", vg], ok=(0, 5))
        run(["pvremove", "-q", "-y", loop], ok=(0, 5))
        run(["losetup", "-d", loop], ok=(0, 1))


@dataclass
class Storage:
    daemon: Daemon
    prefix: str  # the exporter's nqn_prefix
    workdir: Path

    @property
    def stub(self) -> storage_pb2_grpc.StorageServiceStub:
        return storage_pb2_grpc.StorageServiceStub(self.daemon.channel)

    def volume_file(self, volume_id: str) -> Path:
        return self.workdir / "backend" / "volumes" / f"{volume_id}.raw"


def storage_config(workdir: Path, prefix: str, thin: ThinPool, *, dhchap: bool) -> Path:
    portals = ", ".join(f'"{p}"' for p in PORTALS)
    config = workdir / ("storage.toml" if not dhchap else "storage-dhchap.toml")
    config.write_text(
        f'[server]\nunix_socket = "{workdir}/storage.sock"\nlog_format = "kv"\nlog_level = "DEBUG"\n'
        f'[service]\ncatalog_path = "{workdir}/catalog.db"\niqn_prefix = "iqn.2026-01.io.blockwire.nv"\n'
        f'[[backends]]\nname = "file"\nkind = "file"\npath = "{workdir}/backend"\nexporter = "nvmet"\n'
        f'[[backends]]\nname = "thin"\nkind = "lvm-thin"\nvg = "{thin.vg}"\npool = "{thin.pool}"\n'
        f'exporter = "nvmet"\noversubscription_ratio = 2.0\n'
        f'[exporters.nvmet]\nkind = "nvmet"\nportals = [{portals}]\nnqn_prefix = "{prefix}"\n'
        f'dhchap = {"true" if dhchap else "false"}\ndhchap_key_file = "{workdir}/dhchap.key"\n'
    )
    return config


@pytest.fixture(scope="module")
def storage(nvmet: None, thin_pool: ThinPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    workdir = tmp_path_factory.mktemp("storage-nvmet")
    prefix = f"nqn.2026-01.io.blockwire.g{uuid.uuid4().hex[:8]}"
    config = storage_config(workdir, prefix, thin_pool, dhchap=False)
    daemon = Daemon.storage(config, workdir / "storage.sock", **GUEST_DAEMON)
    daemon.start()
    try:
        yield Storage(daemon, prefix, workdir)
    finally:
        daemon.stop()
        kernel.keep_log(daemon.log, "storage-nvmet.log")
        disconnect_all(prefix)
        for sub in (NVMET / "subsystems").glob(f"{prefix}*"):
            remove_subsystem(sub.name)


@pytest.fixture(autouse=True)
def tidy(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used `storage` (failed half-way or not): no controller, attachment or volume
    of it is left for the next test."""
    yield
    if "storage" not in request.fixturenames:
        return
    s: Storage = request.getfixturevalue("storage")
    disconnect_all(s.prefix)
    if not s.daemon.running:
        s.daemon.start()
    stub = s.stub
    for a in stub.ListAttachments(spb.ListAttachmentsRequest(), timeout=60).attachments:
        stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a.id), timeout=120)
    for v in stub.ListVolumes(spb.ListVolumesRequest(), timeout=60).volumes:
        stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=120)


# --- the host side: nvme-cli and sysfs ---------------------------------------------------------------


def connect(
    nqn: str,
    portal: str,
    host_nqn: str = HOST_NQN,
    host_id: str = HOST_ID,
    *extra: str,
    ok: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess[str]:
    address, port = portal.rsplit(":", 1)
    argv = ["nvme", "connect", "-t", "tcp", "-a", address, "-s", port, "-n", nqn]
    argv += ["--hostnqn", host_nqn, "--hostid", host_id, "--reconnect-delay=1", *extra]
    return run(argv, ok=ok, timeout=120)


def disconnect(nqn: str) -> None:
    run(["nvme", "disconnect", "-n", nqn], ok=(0, 1), timeout=120)


def disconnect_all(prefix: str) -> None:
    for sub in subsystems(prefix):
        nqn = kernel.attr(sub / "subsysnqn")
        if nqn:
            disconnect(nqn)


def subsystems(prefix: str) -> list[Path]:
    """The host's subsystems whose NQN starts with `prefix`; one going away during the walk is skipped."""
    return [
        s for s in kernel.entries(SUBSYS_CLASS) if (kernel.attr(s / "subsysnqn") or "").startswith(prefix)
    ]


def host_subsystem(nqn: str) -> Path | None:
    return next((s for s in subsystems(nqn) if kernel.attr(s / "subsysnqn") == nqn), None)


def controllers(nqn: str) -> list[Path]:
    sub = host_subsystem(nqn)
    if sub is None:
        return []
    return [p for p in kernel.entries(sub) if p.name.startswith("nvme") and (p / "transport").exists()]


def head(nqn: str) -> str | None:
    """The namespace head's block device (nvmeXnY) of the subsystem `nqn` on this host."""
    sub = host_subsystem(nqn)
    if sub is None:
        return None
    heads = [p.name for p in kernel.entries(sub) if re.fullmatch(r"nvme\d+n\d+", p.name)]
    return heads[0] if heads else None


def path_devices(nqn: str) -> list[str]:
    """The per-path (hidden) namespace devices, nvmeXcYnZ, of the subsystem's controllers."""
    path = re.compile(r"nvme\d+c\d+n\d+")
    return sorted(p.name for c in controllers(nqn) for p in kernel.entries(c) if path.fullmatch(p.name))


def sys_block(dev: str, attr: str) -> str:
    return (Path("/sys/block") / dev / attr).read_text().strip()


def remove_subsystem(nqn: str) -> None:
    """What a reboot without saved target configuration does to one subsystem: configfs loses it."""
    sub = NVMET / "subsystems" / nqn
    for port in (NVMET / "ports").iterdir():
        if (port / "subsystems" / nqn).is_symlink():
            (port / "subsystems" / nqn).unlink()
    if not sub.is_dir():
        return
    hosts = [h.name for h in (sub / "allowed_hosts").iterdir()]
    for h in hosts:
        (sub / "allowed_hosts" / h).unlink()
    for ns in (sub / "namespaces").iterdir():
        (ns / "enable").write_text("0")
        ns.rmdir()
    sub.rmdir()
    for h in hosts:
        if not any((s / "allowed_hosts" / h).is_symlink() for s in (NVMET / "subsystems").iterdir()):
            (NVMET / "hosts" / h).rmdir()


def configfs_of(nqn: str) -> list[str]:
    """Everything of the subsystem `nqn` in configfs: the subsystem, its port links, its host entries."""
    left = []
    if (NVMET / "subsystems" / nqn).exists():
        left.append(f"subsystems/{nqn}")
    left += [
        f"ports/{p.name}/subsystems/{nqn}"
        for p in (NVMET / "ports").iterdir()
        if (p / "subsystems" / nqn).is_symlink()
    ]
    left += [f"hosts/{h}" for h in (HOST_NQN, STRANGER_NQN) if (NVMET / "hosts" / h).exists()]
    return left


def _connector(host_nqn: str = HOST_NQN, host_id: str = HOST_ID) -> pb.Connector:
    return pb.Connector(
        host="guest",
        nvme_host_nqn=host_nqn,
        nvme_host_id=host_id,
        multipath=True,
        transports=[pb.TRANSPORT_NVME_TCP],
    )


def _ana_state(path_device: str) -> str:
    for c in SUBSYS_CLASS.glob("*/nvme*"):
        state = kernel.attr(c / path_device / "ana_state")
        if state is not None:
            return state
    return "-"


def _nguid(text: str) -> str:
    return text.replace("-", "").lower()


# --- the tests -----------------------------------------------------------------------------------------


def test_a_file_volume_over_two_ports_is_one_namespace_with_the_announced_identity(
    storage: Storage, tmp_path: Path
) -> None:
    stub = storage.stub
    vol = stub.CreateVolume(
        spb.CreateVolumeRequest(name="n1", size_bytes=64 * MIB, backend="file"), timeout=120
    ).volume
    att = stub.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=vol.id, connector=_connector()), timeout=120
    )
    ci = att.attachment.connection_info
    assert ci.WhichOneof("transport") == "nvmeof"
    nv = ci.nvmeof
    nqn = nv.subsystem_nqn
    assert nqn == f"{storage.prefix}:{vol.id}"
    assert sorted(p.address for p in nv.portals) == sorted(PORTALS)
    assert (nv.namespace_id, nv.host_nqn) == (1, HOST_NQN)
    assert nv.namespace_uuid == str(uuid.UUID(hex=vol.id))
    assert not nv.dhchap_host_secret  # dhchap = false on this kernel

    # The target side: one subsystem admitting this host only, namespace 1 with the identity.
    sub = NVMET / "subsystems" / nqn
    assert (sub / "attr_allow_any_host").read_text().strip() == "0"
    assert [h.name for h in (sub / "allowed_hosts").iterdir()] == [HOST_NQN]
    ns = sub / "namespaces" / "1"
    assert (ns / "enable").read_text().strip() == "1"
    assert (ns / "device_path").read_text().strip() == str(storage.volume_file(vol.id))
    assert _nguid((ns / "device_nguid").read_text().strip()) == nv.namespace_nguid
    assert (ns / "device_uuid").read_text().strip() == nv.namespace_uuid
    assert len(configfs_of(nqn)) == 2 + 1 + 1  # subsystem, two port links, the host entry

    # A host NQN not admitted is refused on every port.
    for portal in PORTALS:
        refused = connect(nqn, portal, STRANGER_NQN, STRANGER_ID, ok=tuple(range(1, 256)))
        assert refused.returncode != 0
        assert not controllers(nqn), f"the stranger got a controller through {portal}"
    record_rc("nvmet_connect_not_allowed_rc.txt", refused)

    try:
        # Both ports: two controllers (paths), one namespace head with the announced identity.
        first = connect(nqn, PORTALS[0])
        record_rc("nvmet_connect_rc.txt", first)
        connect(nqn, PORTALS[1])
        wait_until(
            "two live controllers",
            lambda: (
                len(controllers(nqn)) == 2
                and all(kernel.attr(c / "state") == "live" for c in controllers(nqn))
            ),
            60,
        )
        dev = wait_until("the namespace head", lambda: head(nqn), 60)
        kernel.settle()
        assert _nguid(sys_block(dev, "nguid")) == nv.namespace_nguid
        assert sys_block(dev, "uuid") == nv.namespace_uuid
        assert sys_block(dev, "wwid") == f"uuid.{nv.namespace_uuid}"
        assert int(sys_block(dev, "size")) * 512 == 64 * MIB
        assert int(sys_block(dev, "queue/logical_block_size")) == ci.logical_block_size == 4096  # a file
        paths = path_devices(nqn)
        assert len(paths) == 2, paths  # nvmeXcYnZ: one per controller under the one head
        head_of = dev[: dev.rindex("n")]  # nvme0n1 -> nvme0: its paths are nvme0c<controller>n1
        assert all(p.startswith(f"{head_of}c") for p in paths), (dev, paths)
        addresses = sorted((c / "address").read_text().strip() for c in controllers(nqn))
        assert [a.split(",")[0] for a in addresses] == ["traddr=127.0.0.1", "traddr=127.0.0.2"]
        serial = (controllers(nqn)[0] / "serial").read_text().strip()
        assert serial == vol.serial

        # Data written through the head is in the volume's file.
        pattern = kernel.write_pattern(f"/dev/{dev}", 5)
        assert kernel.read_at(storage.volume_file(vol.id), 5) == pattern

        # What the connector parses, recorded from this state.
        for name, argv in (
            ("nvmet_list_subsys.json", ["nvme", "list-subsys", "-o", "json"]),
            ("nvmet_list_subsys.txt", ["nvme", "list-subsys"]),
            ("nvmet_list_subsys_dev.json", ["nvme", "list-subsys", "-o", "json", f"/dev/{dev}"]),
            ("nvmet_list.json", ["nvme", "list", "-o", "json"]),
            ("nvmet_list_v.json", ["nvme", "list", "-v", "-o", "json"]),
            ("nvmet_id_ns.txt", ["nvme", "id-ns", f"/dev/{dev}"]),
            ("nvmet_id_ns.json", ["nvme", "id-ns", "-o", "json", f"/dev/{dev}"]),
            ("nvmet_ns_descs.json", ["nvme", "ns-descs", "-o", "json", f"/dev/{dev}"]),
            ("nvmet_id_ctrl.json", ["nvme", "id-ctrl", "-o", "json", f"/dev/{controllers(nqn)[0].name}"]),
            ("nvmet_ana_log.json", ["nvme", "ana-log", "-o", "json", f"/dev/{controllers(nqn)[0].name}"]),
        ):
            recorded(name, run(argv, ok=(0, 1, 2, 22)).stdout)
        recorded(
            "nvmet_sysfs_summary.txt",
            "".join(f"{a}: {sys_block(dev, a)}\n" for a in ("nguid", "uuid", "wwid", "nsid", "size"))
            + f"multipath: {' '.join(paths)}\n"
            + "".join(f"{p} ana_state: {_ana_state(p)}\n" for p in paths)
            + "".join(
                f"{c.name} address: {(c / 'address').read_text().strip()} "
                f"state: {(c / 'state').read_text().strip()}\n"
                for c in controllers(nqn)
            ),
        )
        # A path lost (one port's controller disconnected): the head stays, I/O goes on.
        run(["nvme", "disconnect", "-d", controllers(nqn)[1].name], timeout=120)
        wait_until("one controller left", lambda: len(controllers(nqn)) == 1, 60)
        pattern = kernel.write_pattern(f"/dev/{dev}", 9)
        assert kernel.read_at(storage.volume_file(vol.id), 9) == pattern
    finally:
        disconnect(nqn)
    wait_until("no controller left", lambda: not controllers(nqn), 60)
    stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.attachment.id), timeout=120)
    assert configfs_of(nqn) == []
    stub.DeleteAttachment(
        spb.DeleteAttachmentRequest(attachment_id=att.attachment.id), timeout=120
    )  # repeat: OK
    stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)


def test_a_thin_volume_grows_under_a_connected_host(storage: Storage, thin_pool: ThinPool) -> None:
    stub = storage.stub
    vol = stub.CreateVolume(
        spb.CreateVolumeRequest(name="n2", size_bytes=16 * MIB, backend="thin"), timeout=120
    ).volume
    att = stub.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=vol.id, connector=_connector()), timeout=120
    )
    nv = att.attachment.connection_info.nvmeof
    again = stub.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=vol.id, connector=_connector()), timeout=120
    )
    assert again.attachment.id == att.attachment.id  # repeat: the same attachment
    nqn = nv.subsystem_nqn
    assert (NVMET / "subsystems" / nqn / "namespaces" / "1" / "device_path").read_text().strip() == (
        f"/dev/{thin_pool.vg}/vol-{vol.id}"
    )
    try:
        connect(nqn, PORTALS[0])
        dev = wait_until("the namespace head", lambda: head(nqn), 60)
        assert _nguid(sys_block(dev, "nguid")) == nv.namespace_nguid
        block = att.attachment.connection_info.logical_block_size
        assert int(sys_block(dev, "queue/logical_block_size")) == block == 512  # a thin LV
        pattern = kernel.write_pattern(f"/dev/{dev}", 3)
        assert kernel.read_at(f"/dev/{thin_pool.vg}/vol-{vol.id}", 3) == pattern
        stub.ExtendVolume(spb.ExtendVolumeRequest(volume_id=vol.id, new_size_bytes=32 * MIB), timeout=120)
        wait_until("the host sees 32 MiB", lambda: int(sys_block(dev, "size")) * 512 == 32 * MIB, 60)
    finally:
        disconnect(nqn)
    wait_until("no controller left", lambda: not controllers(nqn), 60)
    stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.attachment.id), timeout=120)
    assert configfs_of(nqn) == []
    stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)


def test_a_restarted_service_rebuilds_an_export_the_target_lost(storage: Storage) -> None:
    stub = storage.stub
    vol = stub.CreateVolume(
        spb.CreateVolumeRequest(name="n3", size_bytes=16 * MIB, backend="file"), timeout=120
    ).volume
    att = stub.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=vol.id, connector=_connector()), timeout=120
    )
    nqn = att.attachment.connection_info.nvmeof.subsystem_nqn
    try:
        connect(nqn, PORTALS[0])
        dev = wait_until("the namespace head", lambda: head(nqn), 60)
        storage.daemon.stop()
        remove_subsystem(nqn)  # the target forgot it (a reboot without saved configuration)
        stray = f"{storage.prefix}:{'e' * 32}"
        (NVMET / "subsystems" / stray).mkdir()
        wait_until(
            "the host lost its path",
            lambda: all((c / "state").read_text().strip() != "live" for c in controllers(nqn)),
            60,
        )
        storage.daemon.start()
        assert len(configfs_of(nqn)) == 4  # subsystem, two port links, host entry
        assert not (NVMET / "subsystems" / stray).exists()
        # The host's controller reconnects by itself (reconnect_delay 1 s) and I/O goes on.
        wait_until(
            "the controller live again",
            lambda: any((c / "state").read_text().strip() == "live" for c in controllers(nqn)),
            90,
        )
        pattern = kernel.write_pattern(f"/dev/{dev}", 2)
        assert kernel.read_at(storage.volume_file(vol.id), 2) == pattern
    finally:
        disconnect(nqn)
    stub = storage.stub
    stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.attachment.id), timeout=120)
    assert configfs_of(nqn) == []
    stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)


def kernel_has_target_auth() -> bool:
    """Whether this kernel's nvmet can demand DH-HMAC-CHAP (host entries have dhchap_key)."""
    probe = NVMET / "hosts" / "nqn.2014-08.org.nvmexpress:bw-auth-probe"
    probe.mkdir()
    try:
        return (probe / "dhchap_key").exists()
    finally:
        probe.rmdir()


def test_dh_hmac_chap_on_refused_without_target_auth(
    nvmet: None, thin_pool: ThinPool, tmp_path: Path
) -> None:
    """With dhchap on, on a kernel whose target cannot authenticate (6.1: no dhchap_key in host entries),
    the service refuses to start, says which kernel option is missing, and leaves nothing."""
    if kernel_has_target_auth():
        pytest.skip(f"{os.uname().release} has NVMe target authentication: test_dh_hmac_chap covers it")
    prefix = f"nqn.2026-01.io.blockwire.a{uuid.uuid4().hex[:8]}"
    config = storage_config(tmp_path, prefix, thin_pool, dhchap=True)
    daemon = Daemon.storage(config, tmp_path / "storage.sock", **{**GUEST_DAEMON, "start_timeout": 60.0})
    with pytest.raises(AssertionError, match="exited with 1"):
        daemon.start()
    kernel.keep_log(daemon.log, "storage-nvmet-dhchap-refused.log")
    assert "CONFIG_NVME_TARGET_AUTH" in daemon.log.read_text()
    assert not list((NVMET / "subsystems").glob(f"{prefix}*"))
    assert not [h for h in (NVMET / "hosts").iterdir() if "probe" in h.name]


@pytest.mark.guest_kernel("backports")
def test_dh_hmac_chap(nvmet: None, thin_pool: ThinPool, tmp_path: Path) -> None:
    """With dhchap on (bidirectional), on a kernel whose target authenticates (the backports boot, 6.12):
    CreateAttachment announces a host and a controller secret; nvme-cli 2.3's `nvme connect` with a
    wrong host secret is refused (no controller left), with the announced pair accepted (the head
    appears, both secrets on the controller)."""
    if not kernel_has_target_auth():
        pytest.skip(
            f"DH-HMAC-CHAP cannot run on {os.uname().release}: its nvmet has no dhchap_key "
            "(needs CONFIG_NVME_TARGET_AUTH, CONFIG_NVME_AUTH, CONFIG_NVME_HOST_AUTH)"
        )
    prefix = f"nqn.2026-01.io.blockwire.a{uuid.uuid4().hex[:8]}"
    config = storage_config(tmp_path, prefix, thin_pool, dhchap=True)
    daemon = Daemon.storage(config, tmp_path / "storage.sock", **{**GUEST_DAEMON, "start_timeout": 60.0})
    daemon.start()
    try:
        stub = storage_pb2_grpc.StorageServiceStub(daemon.channel)
        vol = stub.CreateVolume(
            spb.CreateVolumeRequest(name="a1", size_bytes=16 * MIB, backend="file"), timeout=120
        ).volume
        att = stub.CreateAttachment(
            spb.CreateAttachmentRequest(volume_id=vol.id, connector=_connector()), timeout=120
        )
        nv = att.attachment.connection_info.nvmeof
        assert nv.dhchap_host_secret.startswith("DHHC-1:")
        assert nv.dhchap_ctrl_secret.startswith("DHHC-1:")
        wrong = "DHHC-1:00:" + "A" * 48 + ":"
        refused = connect(
            nv.subsystem_nqn,
            PORTALS[0],
            HOST_NQN,
            HOST_ID,
            f"--dhchap-secret={wrong}",
            ok=tuple(range(1, 256)),
        )
        assert refused.returncode != 0
        assert not controllers(nv.subsystem_nqn)
        try:
            connect(
                nv.subsystem_nqn, PORTALS[0], HOST_NQN, HOST_ID,
                f"--dhchap-secret={nv.dhchap_host_secret}", f"--dhchap-ctrl-secret={nv.dhchap_ctrl_secret}",
            )  # fmt: skip
            wait_until("the namespace head", lambda: head(nv.subsystem_nqn), 60)
            (ctrl,) = controllers(nv.subsystem_nqn)
            assert (ctrl / "dhchap_secret").read_text().strip() == nv.dhchap_host_secret
            assert (ctrl / "dhchap_ctrl_secret").read_text().strip() == nv.dhchap_ctrl_secret
        finally:
            disconnect(nv.subsystem_nqn)
        stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.attachment.id), timeout=120)
        stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)
    finally:
        daemon.stop()
        kernel.keep_log(daemon.log, "storage-nvmet-dhchap.log")
