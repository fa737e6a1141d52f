"""NVMe/TCP: nvme-cli argv and parsers on output recorded in the guest, the sysfs reader, and the connector
on a fake kernel (tests/fakes/nvme.py: the recorded sysfs layout behind the Fabrics seam)."""

from __future__ import annotations

import errno
from dataclasses import replace
from pathlib import Path

import pytest

from blockwire.errors import (
    FailedPrecondition,
    IdentityMismatch,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from blockwire.model import ConnectionInfo, NvmeofConnection, NvmeofPortal, Transport
from blockwire.secret import Secret
from hostagent.config import AgentConfig, config_from_mapping
from hostagent.connectors.nvme import NvmeConnector, decisive
from hostagent.host.nvme import NvmeHost, normal_id, parse_ns_descriptors
from hostagent.host.sysfs import Sysfs
from hostagent.hostinfo import HostFiles, build_connector, nvme_tcp_available
from hostagent.model import ConnectorKind
from hostagent.tools.nvme import (
    Timeouts,
    connect_argv,
    connect_error,
    disconnect_argv,
    fabrics_options,
    parse_address,
    parse_connect_answer,
    parse_list,
    parse_list_subsys,
    render_options,
    split_portal,
)
from tests.fakes.clock import FakeClock
from tests.fakes.nvme import FakeNs, FakeNvmeKernel
from tests.fakes.openers import FakeOpeners
from tests.fakes.udev import FakeUdev

REC = Path(__file__).resolve().parents[2] / "data" / "recorded"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6f1f6c8e-1b7e-4c55-9e52-0a7e3b2d9c11"
HOSTID = "6f1f6c8e-1b7e-4c55-9e52-0a7e3b2d9c11"
NQN = "nqn.2026-01.io.blockwire:vol-1"
P1, P2 = "127.0.0.1:4420", "127.0.0.2:4420"
NGUID = "0f3c2a9e5d7b4c61a2b3c4d5e6f70811"
UUID = "3b9e2f4a-6c1d-4e8f-9a0b-1c2d3e4f5a6b"
KEY = "DHHC-1:00:" + "A" * 48 + ":"


def recorded(name: str) -> str:
    return (REC / name).read_text()


# -- tools/nvme.py: argv, options, parsers on recorded output -----------------------------------------------


def test_list_subsys_parses_the_recorded_json() -> None:
    (s,) = parse_list_subsys(recorded("nvme_list_subsys_json.txt"))
    assert (s.name, s.nqn, s.host_nqn) == ("nvme-subsys0", "nqn.2026-01.io.blockwire.test:rec1", HOSTNQN)
    assert [(p.name, p.state) for p in s.paths] == [("nvme0", "live"), ("nvme1", "live")]
    assert parse_address(s.paths[1].address) == {
        "traddr": "127.0.0.2",
        "trsvcid": "4420",
        "src_addr": "127.0.0.1",
    }
    (down,) = parse_list_subsys(recorded("nvme_list_subsys_json_one_down.txt"))
    assert sorted(p.state for p in down.paths) == ["connecting", "live"]
    assert parse_list_subsys("") == []


def test_list_parses_the_recorded_json() -> None:
    (d,) = parse_list(recorded("nvme_list_json.txt"))
    assert (d.path, d.nsid, d.size_bytes, d.model) == ("/dev/nvme0n1", 1, 32 << 20, "Linux")


def test_the_fabrics_answer_and_errnos() -> None:
    answer = recorded("nvme_fabrics_connect_answer.txt").split("\n", 1)[1]
    assert parse_connect_answer(answer) == (0, 1)
    assert "EALREADY" in recorded("nvme_fabrics_connect_again.txt")
    with pytest.raises(Unavailable):
        parse_connect_answer("garbage")
    assert isinstance(connect_error(errno.EKEYREJECTED, "x"), PermissionDenied)
    assert isinstance(connect_error(errno.ENOKEY, "x"), PermissionDenied)
    assert isinstance(connect_error(errno.ECONNREFUSED, "x"), Unavailable)
    assert isinstance(connect_error(errno.EINVAL, "x"), InvalidArgument)


def test_options_keep_the_secret_a_secret_until_the_write() -> None:
    opts = fabrics_options(
        subsystem_nqn=NQN, traddr="127.0.0.1", trsvcid="4420", host_nqn=HOSTNQN, host_id=HOSTID,
        timeouts=Timeouts(ctrl_loss_tmo=1800, reconnect_delay=2, fast_io_fail_tmo=-1),
        dhchap_secret=Secret(KEY), dhchap_ctrl_secret=Secret(KEY.replace("A", "B")),
    )  # fmt: skip
    shown = render_options(opts)
    assert KEY not in shown
    assert "dhchap_secret=********" in shown
    assert shown.startswith(
        f"nqn={NQN},transport=tcp,traddr=127.0.0.1,trsvcid=4420,hostnqn={HOSTNQN},hostid={HOSTID}"
    )
    assert "ctrl_loss_tmo=1800,reconnect_delay=2" in shown
    assert "fast_io_fail_tmo" not in shown
    revealed = render_options(opts, reveal=True)
    assert f"dhchap_secret={KEY}," in revealed
    assert "dhchap_ctrl_secret=DHHC-1:00:BBBB" in revealed


def test_nvme_cli_argv() -> None:
    argv = connect_argv(
        subsystem_nqn="nqn.2026-01.io.blockwire.test:rec1", traddr="127.0.0.2", trsvcid="4420",
        host_nqn=HOSTNQN, host_id=HOSTID,
        timeouts=Timeouts(ctrl_loss_tmo=30, reconnect_delay=2, fast_io_fail_tmo=5),
    )  # fmt: skip
    # the recorded, accepted command line has the same shape
    rec = recorded("nvme_connect_rc.txt").splitlines()[0].removeprefix("$ ").split()
    assert argv[: len(rec)] == rec
    assert argv[-2:] == ["--fast_io_fail_tmo", "5"]
    assert disconnect_argv("nvme3") == ["nvme", "disconnect", "-d", "nvme3"]
    assert disconnect_argv(subsystem_nqn=NQN) == ["nvme", "disconnect", "-n", NQN]
    assert split_portal("[fe80::1]:4421") == ("fe80::1", "4421")
    assert split_portal("10.0.0.1") == (
        "10.0.0.1",
        "4420",
    )


# -- host/nvme.py: the reader on the recorded layout -----------------------------------------------


def recorded_tree(root: Path) -> Sysfs:
    """The sysfs files recorded in the guest (nvme_sysfs_*), rebuilt as a tree."""

    def build(dest: Path, dump: str) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for line in dump.splitlines():
            kind, _, rest = line.partition(" ")
            name, _, value = rest.partition(" ")
            if kind == "f" and name and not value.startswith("<"):
                (dest / name).write_text(value + "\n")
            elif kind in ("d", "l") and name.startswith(("nvme", "ng")):
                (dest / name).mkdir(exist_ok=True)

    for c in ("nvme0", "nvme1"):
        build(root / "class/nvme" / c, recorded(f"nvme_sysfs_class_nvme_{c}.txt"))
    build(
        root / "class/nvme-subsystem/nvme-subsys0",
        recorded("nvme_sysfs_class_nvme-subsystem_nvme-subsys0.txt"),
    )
    build(root / "block/nvme0n1", recorded("nvme_sysfs_block_nvme0n1.txt"))
    (root / "class/nvme/nvme1/nvme0c1n1").mkdir(exist_ok=True)
    (root / "module/nvme_core/parameters").mkdir(parents=True)
    (root / "module/nvme_core/parameters/multipath").write_text(recorded("nvme_module_multipath.txt"))
    return Sysfs(root)


def test_reader_on_the_recorded_sysfs(tmp_path: Path) -> None:
    host = NvmeHost(recorded_tree(tmp_path))
    assert host.native_multipath()
    c0, c1 = host.controllers("nqn.2026-01.io.blockwire.test:rec1")
    assert (c0.name, c0.portal, c0.state, c0.hostnqn, c0.subsystem) == (
        "nvme0",
        ("127.0.0.1", "4420"),
        "live",
        HOSTNQN,
        "nvme-subsys0",
    )
    assert c1.portal == ("127.0.0.2", "4420")
    (ns,) = host.namespaces("nvme-subsys0")
    assert (ns.name, ns.nsid, ns.nguid, ns.uuid, ns.size_bytes) == (
        "nvme0n1",
        1,
        NGUID,
        normal_id(UUID),
        32 << 20,
    )
    assert ns.paths == ("nvme0c0n1", "nvme0c1n1")
    assert host.subsystem_of_namespace("nvme0n1") == "nvme-subsys0"
    assert normal_id("00000000-0000-0000-0000-000000000000") == ""


# -- connectors/nvme.py on the fake kernel -----------------------------------------------------------


def info(volume: str = "vol-1", *, nqn: str = NQN, nguid: str = NGUID, uuid: str = UUID,
         portals: tuple[str, ...] = (P1, P2),
         secret: str = "", ctrl: str = "", nsid: int = 1) -> ConnectionInfo:  # fmt: skip
    return ConnectionInfo(
        transport=NvmeofConnection(
            subsystem_nqn=nqn,
            portals=tuple(NvmeofPortal(p) for p in portals),
            namespace_id=nsid,
            namespace_nguid=nguid,
            namespace_uuid=uuid,
            dhchap_host_secret=Secret(secret) if secret else None,
            dhchap_ctrl_secret=Secret(ctrl) if ctrl else None,
        ),
        volume_id=volume,
    )


class Rig:
    def __init__(self, tmp_path: Path, multipath: bool = True, identify: bool = False) -> None:
        self.udev = FakeUdev()
        self.kernel = FakeNvmeKernel(tmp_path / "sys", self.udev, multipath=multipath)
        self.openers = FakeOpeners()
        self.clock = FakeClock()
        self.conn = NvmeConnector(
            NvmeHost(Sysfs(tmp_path / "sys"), self.kernel.identify if identify else lambda c, n: None),
            self.kernel, self.udev, self.clock,
            openers=self.openers, host_nqn=HOSTNQN, host_id=HOSTID,
            timeouts=Timeouts(ctrl_loss_tmo=1800, reconnect_delay=2), device_timeout=5,
        )  # fmt: skip

    def export(
        self,
        nqn: str = NQN,
        nguid: str = NGUID,
        uuid: str = UUID,
        nsid: int = 1,
        key: str = "",
        ctrl_key: str = "",
    ) -> None:
        self.kernel.export(
            nqn, (P1, P2), HOSTNQN, FakeNs(nsid, nguid, uuid, 16 << 20), key=key, ctrl_key=ctrl_key
        )


@pytest.fixture
def r(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_connect_two_portals_one_head_then_nothing_left(r: Rig) -> None:
    r.export()
    dev = r.conn.connect(info())
    assert (dev.path, dev.wwn, dev.size_bytes) == ("/dev/nvme0n1", NGUID, 16 << 20)
    assert sorted(dev.path_devices) == ["/dev/nvme0", "/dev/nvme1"]
    assert r.conn.paths(info()) == ["/dev/nvme0", "/dev/nvme1"]
    assert r.conn.expected_paths(info()) == 2
    assert all(
        "ctrl_loss_tmo=1800,reconnect_delay=2" in w and f"hostid={HOSTID}" in w for w in r.kernel.written
    )
    # a repeat reuses the live controllers: no second connect, no "already connected"
    assert r.conn.connect(info()) == dev
    assert len(r.kernel.written) == 2
    r.conn.disconnect(info())
    assert r.kernel.controllers() == []
    assert r.kernel.heads() == []
    r.conn.disconnect(info())  # idempotent


def test_a_reconnecting_controller_is_reused_and_a_lost_one_restored(r: Rig) -> None:
    r.export()
    r.conn.connect(info())
    r.kernel.set_state("nvme1", "connecting")
    assert r.conn.connect(info()).path == "/dev/nvme0n1"
    assert len(r.kernel.written) == 2
    assert r.conn.paths(info()) == ["/dev/nvme0"]
    r.kernel.drop("nvme1")  # ctrl_loss_tmo ran out
    assert r.conn.restore_paths(info()) == ["/dev/nvme2"]
    assert r.conn.paths(info()) == ["/dev/nvme0", "/dev/nvme2"]
    r.conn.disconnect(info())
    assert r.kernel.controllers() == []


def test_another_identity_is_refused_and_what_connect_made_removed(r: Rig) -> None:
    r.export(nguid="11" * 16)
    with pytest.raises(IdentityMismatch, match=f"storage announced NGUID {NGUID}"):
        r.conn.connect(info())
    assert r.kernel.controllers() == []
    assert r.kernel.heads() == []
    r.export(uuid="11111111-2222-3333-4444-555555555555")  # the NGUID right, the UUID not
    with pytest.raises(IdentityMismatch):
        r.conn.connect(info())
    assert r.kernel.controllers() == []


def test_identify_refuses_before_any_block_device(tmp_path: Path) -> None:
    """The controller's Identify answer says another NGUID: refused before a block device is waited for
    (the kernel makes none for an NGUID another subsystem on this host has)."""
    r = Rig(tmp_path, identify=True)
    r.export(nguid="44" * 16)
    with pytest.raises(IdentityMismatch, match="controller /dev/nvme"):
        r.conn.connect(info())
    assert "block device" not in " ".join(r.udev.waits)
    assert not [w for w in r.udev.waits if w.startswith("namespace")]
    assert r.kernel.controllers() == []
    r.export()
    assert r.conn.connect(info()).path.startswith("/dev/nvme")
    r.conn.disconnect(info())


def test_ns_descriptors_parse() -> None:
    data = bytes([3, 16, 0, 0]) + bytes.fromhex(UUID.replace("-", "")) + bytes([2, 16, 0, 0])
    data += bytes.fromhex(NGUID) + bytes(64)
    assert parse_ns_descriptors(data) == {"uuid": UUID.replace("-", ""), "nguid": NGUID}


def test_a_refused_connect_never_touches_controllers_it_reused(r: Rig) -> None:
    """Volume B is connected through subsystem S; A's stale connection info names S with A's identity:
    refused, and B's controllers and head stay."""
    r.export(nguid="22" * 16, uuid="22222222-2222-4222-8222-222222222222")
    b = info("vol-b", nguid="22" * 16, uuid="22222222-2222-4222-8222-222222222222")
    r.conn.connect(b)
    with pytest.raises(IdentityMismatch):
        r.conn.connect(info("vol-a"))
    assert [c["name"] for c in r.kernel.controllers()] == ["nvme0", "nvme1"]
    assert r.kernel.heads() == ["nvme0n1"]
    r.conn.disconnect(info("vol-a"), force=True)  # stale info, even forced: B's namespace is not A's
    assert [c["name"] for c in r.kernel.controllers()] == ["nvme0", "nvme1"]
    assert r.kernel.heads() == ["nvme0n1"]
    r.conn.disconnect(b)
    assert r.kernel.controllers() == []


def test_controllers_another_namespace_uses_are_kept(r: Rig) -> None:
    """A per-host subsystem with two volumes: the first detach keeps the controllers."""
    r.kernel.export(NQN, (P1, P2), HOSTNQN, FakeNs(1, NGUID, UUID, 8 << 20),
                    FakeNs(2, "33" * 16, "33333333-3333-4333-8333-333333333333", 8 << 20))  # fmt: skip
    a = info()
    b = info("vol-b", nguid="33" * 16, uuid="33333333-3333-4333-8333-333333333333", nsid=2)
    assert r.conn.connect(a).path == "/dev/nvme0n1"
    assert r.conn.connect(b).path == "/dev/nvme0n2"
    r.conn.disconnect(a)
    assert len(r.kernel.controllers()) == 2
    r.kernel.remove_namespace(NQN, 1)  # storage removes A's namespace; the host drops its head
    r.conn.disconnect(b)
    assert r.kernel.controllers() == []
    assert r.kernel.heads() == []


def test_an_open_head_is_refused_unless_forced(r: Rig) -> None:
    r.export()
    r.conn.connect(info())
    r.openers.hold("nvme0n1", comm="qemu-system-x86")
    with pytest.raises(FailedPrecondition, match=r"/dev/nvme0n1: process 4242 \(qemu-system-x86\)"):
        r.conn.disconnect(info())
    assert len(r.kernel.controllers()) == 2
    r.conn.disconnect(info(), force=True)
    assert r.kernel.controllers() == []


def test_one_portal_down_still_connects_the_other_none_up_is_unavailable(r: Rig) -> None:
    r.kernel.export(NQN, (P1,), HOSTNQN, FakeNs(1, NGUID, UUID, 8 << 20))
    dev = r.conn.connect(info())
    assert dev.path_devices == ("/dev/nvme0",)
    assert r.conn.expected_paths(info()) == 2
    r.conn.disconnect(info())
    with pytest.raises(Unavailable, match="ECONNREFUSED"):
        r.conn.connect(info(nqn="nqn.2026-01.io.blockwire:nosuch"))
    assert r.kernel.controllers() == []


def test_the_6_12_kernels_dhchap_refusals_are_permission_denied() -> None:
    """What the kernel answered in the guest (6.12, tests/data/recorded/nvme_dhchap_*): each refusal is
    PERMISSION_DENIED naming DH-HMAC-CHAP, never a retryable UNAVAILABLE."""
    assert recorded("nvme_dhchap_uname.txt").startswith("6.12.")
    assert recorded("nvme_dhchap_fabrics_connect_dhchap_ok.txt").startswith("rc: 0\ninstance=")
    for case, name in (
        ("no_key", "ENOKEY"),
        ("wrong_host_key", "EKEYREJECTED"),
        ("wrong_ctrl_key", "EKEYREJECTED"),
    ):
        first = recorded(f"nvme_dhchap_fabrics_connect_{case}.txt").splitlines()[0]
        err = int(first.split()[1])
        assert errno.errorcode[err] == name, (case, first)
        refused = connect_error(err, "nqn on 127.0.0.1:4420")
        assert isinstance(refused, PermissionDenied), case
        assert "DH-HMAC-CHAP" in refused.message, case
    cli = recorded("nvme_dhchap_nvme_connect_wrong_dhchap_rc.txt")
    assert "rc: 1" in cli
    assert "Key was rejected by service" in cli


def test_a_refused_authentication_wins_over_another_paths_timeout() -> None:
    """Both portals fail: one with EIO (the 6.12 host's admin timeout after the target's failure1),
    the other refused: the refusal is what the caller gets, not a retryable UNAVAILABLE."""
    eio = connect_error(errno.EIO, "p1")
    rejected = connect_error(errno.EKEYREJECTED, "p2")
    assert decisive([eio, rejected]) is rejected
    assert decisive([eio]) is eio


def test_dhchap_secret_goes_to_the_fabrics_device_only(r: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    r.export(key=KEY)
    with pytest.raises(PermissionDenied, match="no secret"):  # ENOKEY: the subsystem demands one
        r.conn.connect(info())
    wrong = KEY.replace("A", "C")
    with pytest.raises(PermissionDenied, match="DH-HMAC-CHAP authentication failed"):  # EKEYREJECTED
        r.conn.connect(info(secret=wrong))
    assert r.kernel.controllers() == []
    assert r.conn.connect(info(secret=KEY)).path == "/dev/nvme0n1"
    assert f"dhchap_secret={KEY}" in r.kernel.written[-1]
    assert KEY not in caplog.text
    assert wrong not in caplog.text
    r.conn.disconnect(info(secret=KEY))


def test_a_controller_that_does_not_prove_the_controller_secret_is_refused(r: Rig) -> None:
    ctrl = KEY.replace("A", "D")
    r.export(key=KEY, ctrl_key=ctrl)
    with pytest.raises(PermissionDenied, match="controller secret"):  # the host refuses the controller
        r.conn.connect(info(secret=KEY, ctrl=KEY.replace("A", "E")))
    assert r.kernel.controllers() == []
    assert r.conn.connect(info(secret=KEY, ctrl=ctrl)).path == "/dev/nvme0n1"
    assert f"dhchap_ctrl_secret={ctrl}" in r.kernel.written[-1]
    r.conn.disconnect(info(secret=KEY, ctrl=ctrl))


def test_extend_rescans_and_returns_the_new_size(r: Rig) -> None:
    r.export()
    i = ConnectionInfo(transport=info().transport, volume_id="vol-1", size_bytes=16 << 20)
    r.conn.connect(i)
    for size in (24 << 20, 32 << 20):  # twice: the second grow is waited for too
        r.kernel.targets[NQN].namespaces[0].size = size
        assert r.conn.extend(replace(i, size_bytes=size)) == size
    assert r.conn.extend(i) == 32 << 20  # the size not given: a rescan, what the host sees
    r.conn.disconnect(i)
    with pytest.raises(FailedPrecondition):
        r.conn.extend(i)


def test_without_native_multipath_one_path(tmp_path: Path) -> None:
    r = Rig(tmp_path, multipath=False)
    r.export()
    r.conn.connect(info())
    assert len(r.kernel.written) == 1


def test_validate_and_config() -> None:
    conn = NvmeConnector.__new__(NvmeConnector)
    bad = ConnectionInfo(
        transport=NvmeofConnection(
            subsystem_nqn=NQN, portals=(NvmeofPortal(P1, "rdma"),), namespace_nguid=NGUID
        ),
        volume_id="vol-1",
    )
    with pytest.raises(InvalidArgument, match="tcp only"):
        conn.validate(bad)
    assert ConnectorKind.NVME_TCP.value == "nvme-tcp"
    c = AgentConfig()
    assert (c.nvme_ctrl_loss_tmo, c.nvme_reconnect_delay, c.nvme_fast_io_fail_tmo) == (1800, 2, -1)
    assert config_from_mapping({"nvme_ctrl_loss_tmo": -1}).nvme_ctrl_loss_tmo == -1
    for bad_value in (
        {"nvme_ctrl_loss_tmo": 0},
        {"nvme_reconnect_delay": 0},
        {"nvme_ctrl_loss_tmo": 1, "nvme_reconnect_delay": 5},
    ):
        with pytest.raises(InvalidArgument):
            config_from_mapping(bad_value)


def test_the_host_announces_nvme_tcp_when_it_has_it(tmp_path: Path) -> None:
    sysfs = Sysfs(tmp_path / "sys")
    assert not nvme_tcp_available(sysfs)
    FakeNvmeKernel(tmp_path / "sys", FakeUdev())
    assert nvme_tcp_available(sysfs)
    files = HostFiles(str(tmp_path / "state"), str(tmp_path / "i"), str(tmp_path / "n"), str(tmp_path / "h"))
    c = build_connector(sysfs, files, kernel_iscsi=False, nvme_tcp=True)
    assert Transport.NVME_TCP in c.transports
    assert Transport.NVME_TCP not in build_connector(sysfs, files, kernel_iscsi=False).transports


def test_the_doctor_lists_controllers_no_record_announces_and_never_removes_them(r: Rig) -> None:
    r.export()
    r.conn.connect(info())
    assert r.conn.audit([info()]) == []
    found = r.conn.audit([])
    assert sorted(f.name for f in found) == ["nvme0", "nvme1"]
    assert all(f.kind == "nvme_controller" and NQN in f.detail and not f.fixable for f in found)
    assert not any(r.conn.fix(f) for f in found)
    assert len(r.kernel.controllers()) == 2
    r.conn.disconnect(info())
