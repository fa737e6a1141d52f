"""Host tier: where CHAP secrets go in a real attach and detach (blockwire-storage + tgtd, blockwire-agent
+ libvirtd + QEMU's initiator), with both daemons logging at DEBUG.

The secret must appear in none of: either daemon's log, any status message returned, the domain's
live XML (which refers to a libvirt secret by usage instead). Files that must hold it are private:
the catalog (0600), the agent's journal records (0600, directory 0700).
"""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc, storage_pb2_grpc
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from tests.host import test_agent_daemon as _daemons

# The daemons of test_agent_daemon (logging at DEBUG), as this module's own fixtures.
work = _daemons.work
rig = _daemons.rig
storage = _daemons.storage
agent = _daemons.agent
virt = _daemons.virt
domain = _daemons.domain
volume = _daemons.volume


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_chap_secrets_stay_out_of_logs_errors_xml_and_public_files(request: pytest.FixtureRequest) -> None:
    agent: hostagent_pb2_grpc.HostAgentServiceStub = request.getfixturevalue("agent")
    storage: storage_pb2_grpc.StorageServiceStub = request.getfixturevalue("storage")
    virt: libvirt.virConnect = request.getfixturevalue("virt")
    domain: str = request.getfixturevalue("domain")
    volume: pb.Volume = request.getfixturevalue("volume")
    work: Path = request.getfixturevalue("work")
    details: list[str] = []
    a = agent.AttachVolume(hpb.AttachVolumeRequest(domain=domain, volume_id=volume.id), timeout=60).attachment
    assert not a.connection_info.iscsi.chap.password  # the agent never returns it
    secret = storage.GetAttachment(
        spb.GetAttachmentRequest(attachment_id=a.id), timeout=10
    ).attachment.connection_info.iscsi.chap.password
    assert len(secret) >= 12

    # the domain's XML names a libvirt secret, never the value
    xml = virt.lookupByName(domain).XMLDesc(0)
    assert "<secret type='iscsi' usage='blockwire/" in xml
    assert secret not in xml

    # private files: the journal while attached, the catalog always
    journal = work / "agent-state" / "attachments"
    assert _mode(journal) == 0o700
    records = list(journal.glob("*.json"))
    assert records
    assert all(_mode(r) == 0o600 for r in records)
    for db in (work / "storage.db", work / "storage.db-wal", work / "storage.db-shm"):
        if db.exists():
            assert _mode(db) == 0o600, db

    # errors around it: a wrong secret, a second host's attach, malformed requests
    bad = pb.ConnectionInfo()
    bad.CopyFrom(
        storage.GetAttachment(
            spb.GetAttachmentRequest(attachment_id=a.id), timeout=10
        ).attachment.connection_info
    )
    bad.iscsi.chap.password = secret[::-1]
    for call in (
        lambda: agent.ConnectVolume(hpb.ConnectVolumeRequest(connection_info=bad), timeout=30),
        lambda: agent.AttachVolume(
            hpb.AttachVolumeRequest(domain="no-such-domain", connection_info=bad), timeout=30
        ),
        lambda: storage.CreateAttachment(
            spb.CreateAttachmentRequest(
                volume_id=volume.id, connector=pb.Connector(host="h2", initiator_iqn="x")
            ),
            timeout=10,
        ),
    ):
        try:
            call()
        except grpc.RpcError as err:
            details.append(err.details() or "")
    assert len(details) == 3

    agent.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=volume.id), timeout=60)
    assert list(journal.glob("*.json")) == []

    logs = {name: (work / name).read_text(errors="replace") for name in ("storage.log", "agent.log")}
    assert "level=debug" in logs["storage.log"]  # DEBUG lines were written, and still no secret
    for name, text in logs.items():
        assert secret not in text, f"the CHAP secret is in {name}"
        assert secret[::-1] not in text, f"the wrong CHAP secret is in {name}"
    for d in details:
        assert secret not in d
        assert secret[::-1] not in d
