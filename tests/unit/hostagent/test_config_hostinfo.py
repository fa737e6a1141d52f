"""Config loading and the host's connector (GetConnector) on a sysfs tree in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockwire.errors import InvalidArgument
from blockwire.model import Transport
from hostagent.config import AgentConfig, config_from_mapping, load_config
from hostagent.host.sysfs import Sysfs
from hostagent.hostinfo import HostFiles, build_connector, kernel_iscsi_available, parse_initiatorname

ROOT = Path(__file__).resolve().parents[3]


def test_example_config_documents_the_defaults() -> None:
    assert load_config(ROOT / "deploy" / "agent.example.toml") == AgentConfig()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"no_such_key": 1}, "no_such_key"),
        ({"iscsi_mode": "fast"}, "iscsi_mode"),
        ({"multipath": "yes"}, "multipath"),
        ({"device_timeout": "10"}, "device_timeout"),
        ({"reconcile_on_start": 1}, "reconcile_on_start"),
        ({"listen_unix": "", "listen_tcp": ""}, "listen_unix"),
        ({"detach_timeout": 0}, "detach_timeout"),
    ],
)
def test_bad_config_names_the_key(data: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        config_from_mapping(data)
    assert err.value.field == field


def test_integer_seconds_are_accepted() -> None:
    assert config_from_mapping({"device_timeout": 5}).device_timeout == 5.0


def test_connector_from_sysfs_and_generated_identities(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    (sys / "class/fc_host/host3").mkdir(parents=True)
    (sys / "class/fc_host/host3/port_name").write_text("0x10000090FA000001\n")
    (sys / "class/fc_host/host3/node_name").write_text("0x20000090fa000001\n")
    files = HostFiles(
        str(tmp_path / "state"), str(tmp_path / "none1"), str(tmp_path / "none2"), str(tmp_path / "none3")
    )
    c = build_connector(Sysfs(sys), files, kernel_iscsi=False)
    assert c.wwpns == ("10000090fa000001",)
    assert c.wwnns == ("20000090fa000001",)
    assert c.initiator_iqn.startswith("iqn.2026-01.io.blockwire:")
    assert c.nvme_host_nqn.startswith("nqn.2014-08.org.nvmexpress:uuid:")
    assert c.nvme_host_id == c.nvme_host_nqn.rpartition(":")[2]
    assert Transport.FC in c.transports
    assert not c.kernel_iscsi
    assert not c.multipath
    again = build_connector(Sysfs(sys), files, kernel_iscsi=False)
    assert (again.initiator_iqn, again.nvme_host_nqn) == (c.initiator_iqn, c.nvme_host_nqn)  # persisted


def test_existing_initiator_name_is_used(tmp_path: Path) -> None:
    name = tmp_path / "initiatorname.iscsi"
    name.write_text("## comment\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    files = HostFiles(str(tmp_path / "state"), str(name), str(tmp_path / "n"), str(tmp_path / "i"))
    assert (
        build_connector(Sysfs(tmp_path), files, kernel_iscsi=True).initiator_iqn
        == "iqn.1993-08.org.debian:01:abc"
    )
    assert parse_initiatorname("InitiatorName=") == ""


def test_kernel_iscsi_detection(tmp_path: Path) -> None:
    assert not kernel_iscsi_available(Sysfs(tmp_path))
    (tmp_path / "module/iscsi_tcp").mkdir(parents=True)
    assert kernel_iscsi_available(Sysfs(tmp_path))


@pytest.mark.parametrize(
    ("kernel_iscsi", "fc", "nvme_tcp", "multipathd", "allowed", "announced"),
    [
        (True, False, False, True, True, True),  # kernel iSCSI
        (False, False, True, True, True, True),  # NVMe/TCP only: dm-multipath is its fallback
        (False, True, False, True, True, True),  # an FC HBA
        (False, False, False, True, True, False),  # QEMU's iSCSI only: no kernel path to map
        (False, False, True, False, True, False),  # no multipathd
        (True, False, True, True, False, False),  # multipath = "never"
    ],
)
def test_multipath_is_announced_for_every_kernel_path_when_multipathd_is_there(
    tmp_path: Path,
    kernel_iscsi: bool,
    fc: bool,
    nvme_tcp: bool,
    multipathd: bool,
    allowed: bool,
    announced: bool,
) -> None:
    sys = tmp_path / "sys"
    sys.mkdir()
    if fc:
        (sys / "class/fc_host/host3").mkdir(parents=True)
        (sys / "class/fc_host/host3/port_name").write_text("0x10000090fa000001\n")
    files = HostFiles(str(tmp_path / "state"), str(tmp_path / "i"), str(tmp_path / "n"), str(tmp_path / "h"))
    c = build_connector(
        Sysfs(sys),
        files,
        kernel_iscsi=kernel_iscsi,
        multipath_allowed=allowed,
        nvme_tcp=nvme_tcp,
        multipathd=multipathd,
    )
    assert c.multipath is announced
