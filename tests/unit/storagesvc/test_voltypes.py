"""Volume types and QoS specs below the RPCs: the [scheduler] and per-backend config keys, the catalog's
migration 2 on a catalog written by version 1, the records' round trip, and the QoS limits an
attachment gets (per-GB limits times the volume's GiB)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from blockwire.errors import InvalidArgument
from blockwire.model import IoTune
from storagesvc.catalog.sql import MIGRATIONS, statements
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.config import ConfigError, SchedulerConfig, parse
from storagesvc.model import QosSpecs, VolumeType
from storagesvc.voltypes import check_extra_specs, check_qos, iotune, type_says

GIB = 1 << 30
MIB = 1 << 20
T0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
BASE: dict[str, Any] = {
    "backends": [{"name": "f", "kind": "file", "exporter": "tgt", "path": "/x"}],
    "exporters": {"tgt": {"portals": ["127.0.0.1:3260"]}},
}


def test_scheduler_config_defaults_and_checks() -> None:
    assert parse(BASE).scheduler == SchedulerConfig(max_attempts=3, weigher="free_capacity")
    c = parse(
        {**BASE, "scheduler": {"max_attempts": 5, "weigher": "volume_count", "default_volume_type": "t"}}
    )
    assert (c.scheduler.max_attempts, c.scheduler.weigher, c.scheduler.default_volume_type) == (
        5,
        "volume_count",
        "t",
    )
    for bad, match in (
        ({"max_attempts": 0}, "max_attempts"),
        ({"weigher": "random"}, "weigher"),
        ({"default_volume_type": "a b"}, "default_volume_type"),
        ({"retries": 1}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse({**BASE, "scheduler": bad})


def test_backend_zone_and_capabilities() -> None:
    backend = {**BASE["backends"][0], "availability_zone": "az1", "capabilities": {"ssd": True, "iops": 5000}}
    b = parse({**BASE, "backends": [backend]}).backends[0]
    assert b.availability_zone == "az1"
    assert dict(b.capabilities) == {"ssd": "true", "iops": "5000"}
    with pytest.raises(ConfigError, match="capabilities is a table"):
        parse({**BASE, "backends": [{**backend, "capabilities": {"x": [1]}}]})
    with pytest.raises(ConfigError, match="oversubscription_ratio"):
        parse({**BASE, "backends": [{**backend, "oversubscription_ratio": 0.5}]})


def test_migration_2_upgrades_a_version_1_catalog_and_keeps_its_volumes(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = sqlite3.connect(path)
    for s in statements(MIGRATIONS[0]):
        db.execute(s)
    db.execute(
        "INSERT INTO volumes (id, name, backend, create_ns, size_bytes, doc) VALUES (?, ?, ?, ?, ?, ?)",
        ("a" * 32, "old", "f", 1, MIB, '{"placeholder": true}'),
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    c = SqliteCatalog(path)
    assert c.schema_version == len(MIGRATIONS)
    assert c.count_volumes_of_type("") == 1  # the old volume has no type
    assert c.list_volume_types(after=None, limit=10) == []
    c.close()


def test_type_and_qos_round_trip(tmp_path: Path) -> None:
    c = SqliteCatalog(tmp_path / "c.db")
    q = QosSpecs(
        id="q" * 32, name="silver", consumer="both", create_time=T0, update_time=T0, specs={"a": "1"}
    )
    t = VolumeType(
        id="t" * 32,
        name="fast",
        create_time=T0,
        update_time=T0,
        description="d",
        extra_specs={"k": "v"},
        qos_specs_id=q.id,
    )
    c.insert_qos_specs(q)
    c.insert_volume_type(t)
    assert c.get_qos_specs(q.id) == q
    assert c.volume_type_by_name("fast") == t
    assert c.list_volume_types(after=None, limit=10, qos_specs_id=q.id) == [t]
    assert c.list_volume_types(after=None, limit=10, qos_specs_id="x" * 32) == []
    c.close()


def qos(**specs: str) -> QosSpecs:
    return QosSpecs(id="q", name="q", consumer="front-end", create_time=T0, update_time=T0, specs=specs)


def test_per_gb_limits_are_multiplied_by_the_size_rounded_up_to_a_gib() -> None:
    q = qos(read_iops_sec_per_gb="10", write_bytes_sec="1000", total_bytes_sec_per_gb="0")
    assert iotune(q, GIB) == IoTune(read_iops_sec=10, write_bytes_sec=1000)
    assert iotune(q, GIB + 1) == IoTune(read_iops_sec=20, write_bytes_sec=1000)
    assert iotune(q, 100 * GIB) == IoTune(read_iops_sec=1000, write_bytes_sec=1000)
    assert iotune(None, GIB) == IoTune()
    back_end = QosSpecs(
        id="q", name="q", consumer="back-end", create_time=T0, update_time=T0, specs={"read_iops_sec": "5"}
    )
    assert iotune(back_end, GIB) == IoTune()  # the hypervisor does not apply back-end limits


def test_spec_checks_name_the_key() -> None:
    assert check_qos("both", {"total_iops_sec": "10"}) == {"total_iops_sec": "10"}
    with pytest.raises(InvalidArgument, match=r"specs\[read_bytes_sec\]: .*exclusive"):
        check_qos("front-end", {"total_bytes_sec_per_gb": "1", "read_bytes_sec": "2"})
    with pytest.raises(InvalidArgument, match=r"specs\[read_iops_sec\]: '1.5' is not a whole number"):
        check_qos("front-end", {"read_iops_sec": "1.5"})
    with pytest.raises(InvalidArgument, match=r"extra_specs\[a:b:c\]"):
        check_extra_specs({"a:b:c": "1"})
    with pytest.raises(InvalidArgument, match=r"extra_specs\[encryption\]: '<is> True' or '<is> False'"):
        check_extra_specs({"encryption": "yes please"})
    with pytest.raises(InvalidArgument, match=r"extra_specs\[k\]: a value is 1-255"):
        check_extra_specs({"k": " "})
    assert check_extra_specs({"capabilities:x": "<or> a <or> b", "volume_backend_name": "f"})


def test_type_properties() -> None:
    t = VolumeType(id="t", name="t", create_time=T0, update_time=T0, extra_specs={"multiattach": "<is> True"})
    assert type_says(t, "multiattach")
    assert not type_says(t, "encryption")
    assert not type_says(None, "multiattach")
    f = VolumeType(id="t", name="t", create_time=T0, update_time=T0, extra_specs={"multiattach": "False"})
    assert not type_says(f, "multiattach")
