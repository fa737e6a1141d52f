"""Host tier, real daemons: `blockwire doctor` (AuditHost) against planted orphans.

Planted: an unused blockwire libvirt secret; a storage attachment of this host for a domain that does not
exist (fixable) and one for a domain running here (not: it may hold the disk); an attachment storage
dropped under a live disk (host only). The audit lists each and changes nothing; `--fix` removes the
secret and the first storage attachment only; a repeat lists what is left. (The kernel kinds, sessions,
node records, disks and maps, are planted in the guest tier.)
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire import cli
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from tests.fakes.daemon_rig import MIB, Rig, define_domain, force_cleanup, remove_domain
from tests.host.daemons import Started, Tgtd

SECRET_XML = """<secret ephemeral='no' private='yes'>
  <usage type='iscsi'><target>{usage}</target></usage>
</secret>"""


@pytest.fixture
def rig(tmp_path: Path, tgtd: Tgtd, host_daemons: Started) -> Iterator[Rig]:
    virt = libvirt.open("qemu:///system")
    r = Rig(work=tmp_path, tgtd=tgtd, virt=virt)
    with r.running():
        yield r
    virt.close()


def audit(rig: Rig, fix: bool = False) -> dict[tuple[str, str], hpb.AuditFinding]:
    findings = rig.agent.AuditHost(hpb.AuditHostRequest(fix=fix), timeout=60).findings
    return {(f.kind, f.name): f for f in findings if f.volume_id in rig.volume_ids}


def storage_rows(rig: Rig) -> set[str]:
    return {a.id for v in rig.volume_ids for a in rig.attachments(v)}


def test_doctor_lists_planted_orphans_and_fixes_only_the_provable_ones(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    domain = define_domain(rig.lv(), "bw-doctor")
    connector = rig.agent.GetConnector(hpb.GetConnectorRequest(), timeout=10).connector
    orphan = rig.create_volume(8 * MIB)
    usage = f"blockwire/{orphan.id}/att-{uuid.uuid4().hex[:8]}"
    secret = rig.lv().secretDefineXML(SECRET_XML.format(usage=usage))
    try:
        gone = rig.storage.CreateAttachment(
            spb.CreateAttachmentRequest(volume_id=orphan.id, connector=connector, domain="bw-doctor-gone"),
            timeout=30,
        ).attachment
        held_volume = rig.create_volume(8 * MIB)
        held = rig.storage.CreateAttachment(
            spb.CreateAttachmentRequest(volume_id=held_volume.id, connector=connector, domain=domain),
            timeout=30,
        ).attachment
        dropped = rig.create_volume(8 * MIB)
        rig.attach(domain, dropped.id)
        (row,) = rig.attachments(dropped.id)
        rig.storage.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=row.id), timeout=30)

        found = audit(rig)
        assert found[("libvirt_secret", usage)].fixable
        assert found[("storage_only", gone.id)].fixable
        assert not found[("storage_only", held.id)].fixable
        assert "runs here" in found[("storage_only", held.id)].detail
        assert ("host_only", f"{dropped.id}@{domain}") in found
        # read-only: nothing changed
        assert usage in [s.usageID() for s in rig.lv().listAllSecrets()]
        assert {gone.id, held.id} <= storage_rows(rig)

        # the CLI: a table, exit 10 while anything is left
        agent_socket = f"unix://{rig.work / 'agent.sock'}"
        assert cli.main(["--agent", agent_socket, "--json", "doctor"]) == cli.EXIT_FINDINGS
        listed = json.loads(capsys.readouterr().out)
        assert {"libvirt_secret", "storage_only", "host_only"} <= {f["kind"] for f in listed}

        fixed = audit(rig, fix=True)
        assert fixed[("libvirt_secret", usage)].fixed
        assert fixed[("storage_only", gone.id)].fixed
        assert not fixed[("storage_only", held.id)].fixed
        assert not fixed[("host_only", f"{dropped.id}@{domain}")].fixed
        assert usage not in [s.usageID() for s in rig.lv().listAllSecrets()]
        assert gone.id not in storage_rows(rig)
        assert held.id in storage_rows(rig)
        assert len(rig.live_disks(domain)) == 1  # the disk of the dropped attachment is untouched

        again = audit(rig)
        assert set(again) == {("storage_only", held.id), ("host_only", f"{dropped.id}@{domain}")}
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            secret.undefine()
        force_cleanup(rig, domain)
        remove_domain(rig.lv(), domain)
        for v in list(rig.volume_ids):
            for a in rig.attachments(v):
                with contextlib.suppress(grpc.RpcError):
                    rig.storage.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a.id), timeout=30)
            with contextlib.suppress(grpc.RpcError):
                rig.delete_volume(v)
