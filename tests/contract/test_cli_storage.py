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
