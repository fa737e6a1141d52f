"""The os-brick facade on a HostAgent wired to fakes: os-brick's keys and calls, blockwire's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockwire.errors import FailedPrecondition, InvalidArgument
from hostagent.brick import Brick, BrickConnector
from tests.fakes.agent import FAKE_IQN, fake_agent

DATA = Path(__file__).parents[2] / "data" / "cinder"


@pytest.fixture
def brick(tmp_path: Path) -> Brick:
    return Brick(fake_agent(tmp_path))


def test_connector_properties_in_os_brick_keys(brick: Brick) -> None:
    props = brick.get_connector_properties("sudo", "192.0.2.7", multipath=True, enforce_multipath=False)
    assert props["initiator"] == FAKE_IQN
    assert props["ip"] == "192.0.2.7"
    assert props["host"] == "fake-host"
    assert props["os_type"] == "linux"
    assert props["multipath"] is False  # asked, but this host cannot build maps
    assert props["do_local_attach"] is False
    with pytest.raises(FailedPrecondition, match="multipath is enforced"):
        brick.get_connector_properties("sudo", "192.0.2.7", True, True)


def test_factory_takes_os_brick_protocol_names(brick: Brick) -> None:
    conn = brick.InitiatorConnector.factory("iscsi", "sudo", use_multipath=True, device_scan_attempts=5)
    assert isinstance(conn, BrickConnector)
    assert conn.driver_volume_type == "iscsi"
    with pytest.raises(InvalidArgument, match="one of ISCSI"):
        brick.InitiatorConnector.factory("AOE", "sudo")


def test_properties_are_read_as_cinder_data_with_scsi_wwn_as_identity(brick: Brick) -> None:
    conn = brick.InitiatorConnector.factory("ISCSI")
    data = json.loads((DATA / "lvm_tgt_iscsi.json").read_text())["data"]
    assert conn.info(data).wwn == ""
    info = conn.info({**data, "scsi_wwn": "36001405aabbccddeeff00112233445566"[:33]})
    assert info.wwn == "6001405aabbccddeeff0011223344556"
    with pytest.raises(InvalidArgument, match="unknown key bogus"):
        conn.info({**data, "bogus": 1})


def test_a_host_without_a_kernel_initiator_refuses_and_keeps_nothing(brick: Brick, tmp_path: Path) -> None:
    """QEMU's initiator makes no host device: os-brick's caller needs one, so connect is refused and what it
    made (the libvirt secret for CHAP) is removed again."""
    conn = brick.InitiatorConnector.factory("ISCSI")
    data = json.loads((DATA / "lvm_tgt_iscsi.json").read_text())["data"]
    hv = brick.agent.hypervisor
    with pytest.raises(FailedPrecondition, match='iscsi_mode = "kernel"'):
        conn.connect_volume(data)
    assert hv.secrets == {}  # type: ignore[attr-defined]


def test_ignore_errors_logs_instead_of_raising_but_never_for_bad_input(brick: Brick) -> None:
    conn = brick.InitiatorConnector.factory("ISCSI")
    data = json.loads((DATA / "lvm_tgt_iscsi.json").read_text())["data"]
    with pytest.raises(InvalidArgument):
        conn.disconnect_volume({**data, "target_lun": "x"}, None, ignore_errors=True)
    conn.disconnect_volume(data, None)  # nothing connected: quietly fine, as os-brick's


def test_the_identity_connect_found_outlives_the_connector_and_goes_with_disconnect(
    brick: Brick, tmp_path: Path
) -> None:
    conn = brick.InitiatorConnector.factory("ISCSI")
    data = json.loads((DATA / "lvm_tgt_iscsi.json").read_text())["data"]
    info = conn.info(data)
    conn.identities.put(info, "6001405aabbccddeeff0011223344556")
    again = brick.InitiatorConnector.factory("ISCSI")  # a new connector (a restarted caller) finds it
    assert again.identities.get(again.info(data)) == "6001405aabbccddeeff0011223344556"
    other = {**data, "target_lun": 2}
    assert again.identities.get(again.info(other)) == ""
    again.disconnect_volume(data, None)
    assert again.identities.get(info) == ""
    assert list((tmp_path / "state" / "brick").iterdir()) == []
