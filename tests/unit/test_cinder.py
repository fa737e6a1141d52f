"""Cinder's connection_info, as its drivers produce it, converted to the typed ConnectionInfo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blockwire.cinder import connection_info_from_cinder
from blockwire.errors import FailedPrecondition, InvalidArgument
from blockwire.model import (
    AccessMode,
    FcConnection,
    IoTune,
    IscsiConnection,
    IscsiPath,
    NvmeofConnection,
    NvmeofPortal,
    RbdConnection,
)

DATA = Path(__file__).parents[1] / "data" / "cinder"


def shape(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return doc


def test_lvm_tgt_iscsi_with_chap() -> None:
    info = connection_info_from_cinder(shape("lvm_tgt_iscsi"))
    t = info.transport
    assert isinstance(t, IscsiConnection)
    assert t.paths == (
        IscsiPath(
            "127.0.0.1:3260", "iqn.2010-10.org.openstack:volume-0b8b5f0e-5f4a-4d57-9a4f-1a2e2c9e8d11", 1
        ),
    )
    assert t.chap is not None
    assert t.chap.username == "bJ3kQ9zX2mP7"
    assert t.chap.password.reveal() == "Zt4wY8nLq2Rv6sKe"
    assert "Zt4wY8nLq2Rv6sKe" not in repr(info)
    assert info.volume_id == "0b8b5f0e-5f4a-4d57-9a4f-1a2e2c9e8d11"
    assert (info.wwn, info.serial) == ("", "")  # Cinder announces no identity
    assert info.access_mode is AccessMode.READ_WRITE
    assert info.qos == IoTune()


def test_lio_multipath_lists_win_over_the_single_portal_and_qos_and_mode_are_kept() -> None:
    info = connection_info_from_cinder(shape("lio_iscsi_multipath"))
    t = info.transport
    assert isinstance(t, IscsiConnection)
    assert [p.portal for p in t.paths] == ["127.0.0.1:3260", "127.0.0.2:3260"]
    assert {p.lun for p in t.paths} == {0}
    assert info.access_mode is AccessMode.READ_ONLY
    assert info.discard is True
    assert info.qos == IoTune(total_iops_sec=500, total_bytes_sec=104857600)


def test_rbd_key_comes_from_the_keyring_cinder_passes() -> None:
    info = connection_info_from_cinder(shape("rbd"))
    t = info.transport
    assert isinstance(t, RbdConnection)
    assert (t.pool, t.image, t.user) == ("volumes", "volume-2c9d4a7e-0f3b-4e61-9b8e-5a1d7c3e2f40", "cinder")
    assert t.monitors == ("127.0.0.1:6789", "127.0.0.2:6789")
    assert t.key is not None
    assert t.key.reveal() == "AQBzKm9lAAAAABAAe0lH0c3VtZ8kKn2vYw6Jqg=="


def test_rbd_without_a_key_is_a_precondition_naming_the_cinder_option() -> None:
    doc = shape("rbd")
    del doc["data"]["keyring"]
    with pytest.raises(FailedPrecondition, match="rbd_keyring_conf"):
        connection_info_from_cinder(doc)


def test_nvmeof_new_form() -> None:
    info = connection_info_from_cinder(shape("nvmeof_new"))
    t = info.transport
    assert isinstance(t, NvmeofConnection)
    assert t.subsystem_nqn == "nqn.nvme-subsystem-1-8e6a4b5c-1d2f-4a3b-9c8d-7e6f5a4b3c2d"
    assert t.portals == (NvmeofPortal("127.0.0.1:4420", "tcp"), NvmeofPortal("127.0.0.2:4420", "tcp"))
    assert t.namespace_id == 1
    assert t.namespace_uuid == "8e6a4b5c-1d2f-4a3b-9c8d-7e6f5a4b3c2d"
    assert t.namespace_nguid == "8e6a4b5c1d2f4a3b9c8d7e6f5a4b3c2d"
    assert t.host_nqn.startswith("nqn.2014-08.org.nvmexpress:uuid:")


def test_nvmeof_old_form() -> None:
    t = connection_info_from_cinder(shape("nvmeof_old")).transport
    assert isinstance(t, NvmeofConnection)
    assert t.portals == (NvmeofPortal("127.0.0.1:4420", "tcp"),)
    assert t.namespace_id == 1


def test_fibre_channel_wwns_are_normalized() -> None:
    t = connection_info_from_cinder(shape("fibre_channel")).transport
    assert isinstance(t, FcConnection)
    assert t.target_wwpns == ("500a098280feeba5", "500a098290feeba5")
    assert t.lun == 3
    assert t.initiator_target_map["21000024ff30441c"] == ("500a098280feeba5",)


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (lambda d: d["data"].update(target_lunn=1), "cinder_connection_info.data", "unknown key target_lunn"),
        (lambda d: d.update(extra=1), "cinder_connection_info", "unknown key extra"),
        (lambda d: d.update(driver_volume_type="nfs"), "cinder_connection_info.driver_volume_type", "one of"),
        (lambda d: d.pop("data"), "cinder_connection_info.data", "required"),
        (lambda d: d["data"].pop("target_iqn"), "cinder_connection_info.data.target_iqn", "required"),
        (lambda d: d["data"].update(target_lun="x"), "cinder_connection_info.data.target_lun", "integer"),
        (
            lambda d: d["data"].update(auth_method="kerberos"),
            "cinder_connection_info.data.auth_method",
            "CHAP",
        ),
        (lambda d: d["data"].pop("auth_password"), "cinder_connection_info.data.auth_password", "required"),
        (
            lambda d: d["data"].update(access_mode="rwx"),
            "cinder_connection_info.data.access_mode",
            "rw or ro",
        ),
        (lambda d: d["data"].update(discard="yes"), "cinder_connection_info.data.discard", "true or false"),
        (
            lambda d: d["data"].update(qos_specs={"iops": 5}),
            "cinder_connection_info.data.qos_specs",
            "unknown key iops",
        ),
        (
            lambda d: d["data"].update(target_portal="nohost"),
            "cinder_connection_info.iscsi.paths[0].portal",
            "",
        ),
    ],
)
def test_malformed_or_unknown_keys_are_refused_naming_them(edit: Any, field: str, words: str) -> None:
    doc = shape("lvm_tgt_iscsi")
    edit(doc)
    with pytest.raises(InvalidArgument) as err:
        connection_info_from_cinder(doc)
    assert err.value.field == field
    assert words in err.value.message
    assert "Zt4wY8nLq2Rv6sKe" not in str(err.value)


def test_mismatched_multipath_lists_are_refused() -> None:
    doc = shape("lio_iscsi_multipath")
    doc["data"]["target_luns"] = [0]
    with pytest.raises(InvalidArgument, match="equally long"):
        connection_info_from_cinder(doc)


def test_an_encrypted_volume_is_a_precondition_not_an_attach_in_clear() -> None:
    doc = shape("lvm_tgt_iscsi")
    doc["data"]["encrypted"] = True
    with pytest.raises(FailedPrecondition, match="encrypted"):
        connection_info_from_cinder(doc)


def test_every_shape_on_record_converts() -> None:
    shapes = sorted(p.stem for p in DATA.glob("*.json"))
    assert len(shapes) >= 6
    for name in shapes:
        assert connection_info_from_cinder(shape(name)).volume_id
