"""The CLI's volume and snapshot commands against the real StorageServicer (SQLite catalog, file backend):
the shared StorageRig, whose FakeExporter these commands never reach (they never export).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire import cli
from tests.fakes.grpc_server import serve
from tests.fakes.images import image_file
from tests.fakes.storage_rig import StorageRig

MIB = 1024**2


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    rig = StorageRig.make(tmp_path)
    try:
        with serve(rig.servicer) as running:
            yield running.address
    finally:
        rig.close()


def run(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["--storage", address, "--timeout", "30", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_volume_commands(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, address, "--json", "volume", "create", "data1", "64M", "--label", "app=db")
    assert code == 0, err
    vol = json.loads(out)
    assert (vol["name"], vol["size_bytes"], vol["state"]) == (
        "data1",
        str(64 * MIB),
        "VOLUME_STATE_AVAILABLE",
    )
    assert vol["labels"] == {"app": "db"}
    assert (
        json.loads(
            run(capsys, address, "--json", "volume", "create", "data1", "64M", "--label", "app=db")[1]
        )["id"]
        == vol["id"]
    )  # idempotent by name
    assert run(capsys, address, "volume", "create", "data1", "128M")[0] == cli.EXIT_CONFLICT

    code, out, _ = run(capsys, address, "volume", "list")
    assert code == 0
    assert out.splitlines()[1].split() == [vol["id"], "data1", "64MiB", "available", "file", "0"]
    assert [
        v["id"] for v in json.loads(run(capsys, address, "volume", "list", "--json", "--label", "app=db")[1])
    ] == [vol["id"]]
    assert vol["id"] in run(capsys, address, "volume", "show", vol["id"])[1]

    code, out, err = run(capsys, address, "--json", "volume", "extend", vol["id"], "128M")
    assert code == 0, err
    assert json.loads(out)["size_bytes"] == str(128 * MIB)
    assert run(capsys, address, "volume", "extend", vol["id"], "64M")[0] == cli.EXIT_CONFLICT
    assert run(capsys, address, "volume", "create", "odd", "1000")[0] == cli.EXIT_USAGE

    code, out, err = run(capsys, address, "--json", "snapshot", "create", vol["id"], "s1")
    assert code == 0, err
    snap = json.loads(out)
    assert snap["volume_id"] == vol["id"]
    assert [s["id"] for s in json.loads(run(capsys, address, "--json", "snapshot", "list")[1])] == [
        snap["id"]
    ]
    assert run(capsys, address, "snapshot", "delete", snap["id"])[0] == 0

    assert run(capsys, address, "volume", "delete", vol["id"])[0] == 0
    assert run(capsys, address, "volume", "delete", vol["id"])[0] == 0  # gone already: fine
    code, _, err = run(capsys, address, "volume", "show", vol["id"])
    assert code == cli.EXIT_NOT_FOUND
    assert "hint:" in err


def test_volume_create_from_image_waits_until_available(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = image_file(tmp_path, "image.qcow2", "qcow2", 32 * MIB)
    code, out, err = run(
        capsys, address, "--json", "--progress", "volume", "create", "root", "--from-image", str(image)
    )
    assert code == 0, err
    vol = json.loads(out)
    assert vol["state"] == "VOLUME_STATE_AVAILABLE"
    assert vol["size_bytes"] == str(32 * MIB)
    assert vol["source_image"]["path"] == str(image)
    assert "root: available" in err


def test_type_and_qos_commands(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, address, "--json", "qos", "create", "silver", "--limit", "total_iops_sec_per_gb=10"
    )
    assert code == 0, err
    qos = json.loads(out)
    assert (qos["name"], qos["consumer"], qos["specs"]) == (
        "silver",
        "front-end",
        {"total_iops_sec_per_gb": "10"},
    )
    assert (
        run(capsys, address, "qos", "create", "silver", "--limit", "total_iops_sec=5")[0] == cli.EXIT_CONFLICT
    )
    code, _, err = run(capsys, address, "qos", "create", "bad", "--limit", "iops=5")
    assert code == cli.EXIT_USAGE
    assert "specs[iops]" in err

    args = ("--json", "type", "create", "fast", "--spec", "thin_provisioning=<is> True", "--qos", "silver")
    code, out, err = run(capsys, address, *args)
    assert code == 0, err
    vtype = json.loads(out)
    assert vtype["extra_specs"] == {"thin_provisioning": "<is> True"}
    assert vtype["qos_specs_id"] == qos["id"]
    assert json.loads(run(capsys, address, *args)[1])["id"] == vtype["id"]  # idempotent by name
    code, out, _ = run(capsys, address, "type", "list")
    assert code == 0
    assert out.splitlines()[1].split()[:2] == [vtype["id"], "fast"]
    assert "thin_provisioning=<is> True" in run(capsys, address, "type", "show", "fast")[1]

    code, out, err = run(capsys, address, "--json", "volume", "create", "v1", "64M", "--type", "fast")
    assert code == 0, err
    vol = json.loads(out)
    assert vol["volume_type"] == "fast"
    assert run(capsys, address, "type", "delete", "fast")[0] == cli.EXIT_CONFLICT  # in use
    assert run(capsys, address, "volume", "delete", vol["id"])[0] == 0

    code, out, err = run(
        capsys, address, "--json", "type", "set", "fast", "--spec", "kind=file", "--description", "d"
    )
    assert code == 0, err
    assert (json.loads(out)["extra_specs"], json.loads(out)["description"]) == ({"kind": "file"}, "d")
    assert (
        json.loads(run(capsys, address, "--json", "type", "set", "fast", "--no-specs")[1])["extra_specs"]
        == {}
    )
    assert run(capsys, address, "type", "set", "fast")[0] == cli.EXIT_USAGE
    assert json.loads(run(capsys, address, "--json", "type", "qos", "fast")[1])["qos_specs_id"] == ""
    code, out, _ = run(capsys, address, "--json", "qos", "set", "silver", "--limit", "read_iops_sec=7")
    assert json.loads(out)["specs"] == {"read_iops_sec": "7"}
    assert "read_iops_sec=7" in run(capsys, address, "qos", "list")[1]
    assert run(capsys, address, "qos", "show", "silver")[0] == 0

    assert run(capsys, address, "type", "delete", "fast")[0] == 0
    assert run(capsys, address, "type", "delete", "fast")[0] == 0  # gone already: fine
    assert run(capsys, address, "qos", "delete", "silver")[0] == 0
    assert run(capsys, address, "type", "list")[1].strip() == "no volume types"
