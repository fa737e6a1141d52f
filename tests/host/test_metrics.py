"""Host tier, real daemons: both daemons' Prometheus endpoints ([metrics] listen) move with a real attach
and detach (QEMU-native iSCSI with CHAP through tgtd, a no-OS domain): per-RPC counts by status code and
latency, the per-step histograms (export, identity, hotplug, unplug, unexport, tgtadm's steps), the
gauges (attachments by state, the catalog), and a refused call counted under its code."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from tests.fakes.daemon_rig import MIB, Rig, define_domain, force_cleanup, remove_domain
from tests.host.daemons import Started, Tgtd, free_port

LOOPBACK = ("127.0.0.1",)


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(LOOPBACK), free_port(LOOPBACK)


@pytest.fixture
def rig(tmp_path: Path, tgtd: Tgtd, host_daemons: Started, ports: tuple[int, int]) -> Iterator[Rig]:
    virt = libvirt.open("qemu:///system")
    r = Rig(
        work=tmp_path,
        tgtd=tgtd,
        virt=virt,
        agent_config=f'[metrics]\nlisten = "127.0.0.1:{ports[0]}"\n',
        storage_config=f'[metrics]\nlisten = "127.0.0.1:{ports[1]}"\n',
    )
    with r.running():
        yield r
    virt.close()


def scrape(port: int) -> dict[str, float]:
    """The endpoint's samples: 'name{labels}' -> value (labels as printed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sample of `name` whose labels include `labels`; 0 when there is none."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for key, v in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in re.split(r",(?=\w+=)", rest.rstrip("}")) for w in want):
            return v
    return 0.0


def test_metrics_move_with_a_real_attach_and_detach(rig: Rig, ports: tuple[int, int]) -> None:
    agent_port, storage_port = ports
    before_agent, before_storage = scrape(agent_port), scrape(storage_port)
    assert value(before_agent, "blockwire_rpc_total", method="AttachVolume", code="OK") == 0
    assert "process_resident_memory_bytes" in before_agent
    assert value(before_storage, "blockwire_rpc_total", method="CreateVolume", code="OK") == 0
    domain = define_domain(rig.lv(), "bw-metrics")
    try:
        v = rig.create_volume(8 * MIB)
        rig.attach(domain, v.id)
        attached = scrape(agent_port)
        assert value(attached, "blockwire_agent_attachments", state="attached") == 1
        rig.detach(domain, v.id)
        with pytest.raises(grpc.RpcError) as refused:
            rig.agent.GetAttachment(hpb.HostAgentServiceGetAttachmentRequest(volume_id=v.id), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        force_cleanup(rig, domain)
        remove_domain(rig.lv(), domain)

    agent, storage = scrape(agent_port), scrape(storage_port)
    assert value(agent, "blockwire_rpc_total", method="AttachVolume", code="OK") == 1
    assert value(agent, "blockwire_rpc_total", method="DetachVolume", code="OK") == 1
    assert value(agent, "blockwire_rpc_total", method="GetAttachment", code="NOT_FOUND") == 1
    assert value(agent, "blockwire_rpc_duration_seconds_count", method="AttachVolume") == 1
    assert 0 < value(agent, "blockwire_rpc_duration_seconds_sum", method="AttachVolume") < 60
    for step in ("export", "identity", "hotplug", "complete", "unplug", "unexport"):
        assert value(agent, "blockwire_step_duration_seconds_count", step=step) >= 1, step
    assert value(agent, "blockwire_agent_attachments", state="attached") == 0

    assert value(storage, "blockwire_rpc_total", method="CreateAttachment", code="OK") >= 1
    assert value(storage, "blockwire_rpc_total", method="DeleteAttachment", code="OK") >= 1
    assert value(storage, "blockwire_rpc_total", method="CreateVolume", code="OK") == 1
    assert value(storage, "blockwire_step_duration_seconds_count", step="tgt_target_new") >= 1
    assert value(storage, "blockwire_storage_catalog", backend="file", what="volumes") == 1
    assert value(storage, "blockwire_storage_exports_repaired") == 0
    rig.delete_volume(v.id)
    assert value(scrape(storage_port), "blockwire_storage_catalog", backend="file", what="volumes") == 0
    with pytest.raises(grpc.RpcError):
        rig.storage.GetVolume(spb.GetVolumeRequest(volume_id=v.id), timeout=10)
    assert value(scrape(storage_port), "blockwire_rpc_total", method="GetVolume", code="NOT_FOUND") == 1
