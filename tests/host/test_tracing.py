"""Host tier, real daemons: one attach is one trace across three processes. The SDK (this process, an
in-memory exporter) calls AttachVolume; the agent ([tracing] exporter = "jsonl:...") serves it and calls
storage; storage serves CreateAttachment. Every span has the SDK's trace id, and the parent links run
SDK client span -> agent server span -> agent steps and client span -> storage server span. (Client and
server spans of a call share its name, "blockwire.v1.<Service>/<Method>"; their kind tells them apart.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from blockwire import tracing
from blockwire.client import HostAgentClient
from tests.fakes.daemon_rig import MIB, Rig, define_domain, force_cleanup, remove_domain
from tests.host.daemons import Started, Tgtd


@pytest.fixture(scope="module")
def memory() -> InMemorySpanExporter:
    """This process's spans. OpenTelemetry has one provider per process: set once, kept."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(trace.get_tracer_provider(), TracerProvider), "another provider was set before"
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def rig(tmp_path: Path, tgtd: Tgtd, host_daemons: Started) -> Iterator[Rig]:
    virt = libvirt.open("qemu:///system")
    r = Rig(
        work=tmp_path,
        tgtd=tgtd,
        virt=virt,
        agent_config=f'[tracing]\nexporter = "jsonl:{tmp_path / "agent-spans.jsonl"}"\n',
        storage_config=f'[tracing]\nexporter = "jsonl:{tmp_path / "storage-spans.jsonl"}"\n',
    )
    with r.running():
        yield r
    virt.close()


def spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_one_attach_is_one_trace_across_the_sdk_the_agent_and_storage(
    rig: Rig, memory: InMemorySpanExporter
) -> None:
    domain = define_domain(rig.lv(), "bw-trace")
    try:
        v = rig.create_volume(8 * MIB)
        with HostAgentClient(f"unix://{rig.work / 'agent.sock'}") as agent:
            with tracing.span("test attach") as root:
                agent.attach_volume(domain, volume_id=v.id)
            trace_id = f"{root.get_span_context().trace_id:032x}"
            agent.detach_volume(domain, v.id)
    finally:
        force_cleanup(rig, domain)
        remove_domain(rig.lv(), domain)
    rig.stop()  # the daemons flush their exporters on the way out

    ours = [s for s in memory.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]
    (client,) = [s for s in ours if s.name == "blockwire.v1.HostAgentService/AttachVolume"]
    assert client.kind.name == "CLIENT"
    assert client.parent is not None
    assert client.parent.span_id == root.get_span_context().span_id

    agent_spans = [s for s in spans(rig.work / "agent-spans.jsonl") if s["trace_id"] == trace_id]
    storage_spans = [s for s in spans(rig.work / "storage-spans.jsonl") if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in agent_spans + storage_spans}
    (server,) = [s for s in agent_spans if s["name"] == "blockwire.v1.HostAgentService/AttachVolume"]
    assert (server["kind"], server["service"], server["status"]) == ("SERVER", "blockwire-agent", "UNSET")
    assert server["parent_span_id"] == f"{client.context.span_id:016x}"

    def under_server(s: dict[str, Any]) -> bool:
        seen = 0
        while s["parent_span_id"] in by_id and seen < 20:  # bounded: a cycle would be a bug
            s, seen = by_id[s["parent_span_id"]], seen + 1
            if s is server:
                return True
        return False

    steps = {s["name"] for s in agent_spans if s["name"].startswith("step ") and under_server(s)}
    assert {"step export", "step identity", "step hotplug", "step complete"} <= steps
    (outgoing,) = [
        s
        for s in agent_spans
        if s["name"] == "blockwire.v1.StorageService/CreateAttachment" and s["kind"] == "CLIENT"
    ]
    assert under_server(outgoing)
    (served,) = [s for s in storage_spans if s["name"] == "blockwire.v1.StorageService/CreateAttachment"]
    assert served["service"] == "blockwire-storage"
    assert served["parent_span_id"] == outgoing["span_id"]
    assert any(s["name"].startswith("step tgt_") and under_server(s) for s in storage_spans)
