"""The agent and encrypted volumes, on fakes: a private 'volume' secret per attachment holds the key and
the disk gets <encryption>; the journal never holds the key; detach and reconcile remove the secret; a
missing key is refused before anything is connected."""

from __future__ import annotations

from dataclasses import replace

import pytest

from blockwire.errors import FailedPrecondition
from blockwire.model import Encryption
from blockwire.secret import Secret
from hostagent.encryption import SECRET_TYPE
from hostagent.virt.diskxml import DiskEncryption
from tests.fakes.executor import Reply
from tests.unit.hostagent.conftest import Rig, iscsi_info

KEY = "volume-key-passphrase-1234"
ENC = Encryption(key_ref="kmip:42", passphrase=Secret(KEY), header_bytes=2 << 20)


def volume_secrets(rig: Rig) -> dict[str, str]:
    return {u: v.reveal() for (u, t), v in rig.hv.secrets.items() if t == SECRET_TYPE}


def test_encrypted_attach_defines_a_volume_secret_and_writes_encryption(rig: Rig) -> None:
    rig.storage.infos["vol-e"] = replace(iscsi_info("vol-e"), encryption=ENC)
    a = rig.agent.attach("vm1", volume_id="vol-e")
    (spec,) = rig.hv.disks_by_domain["vm1"]
    usage = f"blockwire-luks/vol-e/{a.attachment_id}"
    assert volume_secrets(rig) == {usage: KEY}
    assert spec.encryption is not None
    assert spec.encryption.format == "luks"
    assert spec.encryption.engine == "qemu"
    for p in (rig.state / "attachments").glob("*.json"):
        text = p.read_text()
        assert KEY not in text
        assert "kmip:42" in text  # the reference stays, to know the volume is encrypted
    assert rig.agent.get("vol-e", "vm1").connection_info.encryption is not None
    assert rig.agent.detach("vm1", "vol-e")
    assert volume_secrets(rig) == {}


def test_missing_key_is_refused_before_anything_is_connected(rig: Rig) -> None:
    rig.storage.infos["vol-e"] = replace(iscsi_info("vol-e"), encryption=replace(ENC, passphrase=None))
    with pytest.raises(FailedPrecondition, match="carries no key"):
        rig.agent.attach("vm1", volume_id="vol-e")
    assert rig.hv.disks_by_domain["vm1"] == []
    assert volume_secrets(rig) == {}
    assert not list((rig.state / "attachments").glob("*.json"))
    assert not [c for c in rig.runner.calls if "iscsi-inq" in " ".join(map(str, c))]


def test_reconcile_sweeps_volume_secrets_no_attachment_accounts_for(rig: Rig) -> None:
    rig.storage.infos["vol-e"] = replace(iscsi_info("vol-e"), encryption=ENC)
    rig.agent.attach("vm1", volume_id="vol-e")
    rig.hv.define_secret("blockwire-luks/gone/att-9", SECRET_TYPE, Secret("orphan"))
    actions = rig.agent.reconcile()
    assert any(x.detail == "libvirt secret blockwire-luks/gone/att-9" for x in actions)
    assert list(volume_secrets(rig).values()) == [KEY]  # the live attachment's secret stays
    assert isinstance(rig.hv.disks_by_domain["vm1"][0].encryption, DiskEncryption)


def test_doctor_lists_and_fixes_an_orphaned_volume_secret_only(rig: Rig) -> None:
    rig.storage.infos["vol-e"] = replace(iscsi_info("vol-e"), encryption=ENC)
    rig.agent.attach("vm1", volume_id="vol-e")
    rig.hv.define_secret("blockwire-luks/gone/att-9", SECRET_TYPE, Secret("orphan"))
    found = [f for f in rig.agent.audit() if f.kind == "libvirt_secret"]
    assert [f.name for f in found] == ["blockwire-luks/gone/att-9"]
    fixed = [f for f in rig.agent.audit(fix=True) if f.kind == "libvirt_secret"]
    assert [f.fixed for f in fixed] == [True]
    assert list(volume_secrets(rig).values()) == [KEY]


def test_extend_gives_the_encrypted_disk_the_payload_size(rig: Rig) -> None:
    """libvirt resizes QEMU's luks layer, whose size is the payload's: the header's bytes come off the
    device's size (given in full, QEMU would grow the device beneath by the header's size)."""
    rig.storage.infos["vol-e"] = replace(iscsi_info("vol-e"), encryption=ENC)
    rig.agent.attach("vm1", volume_id="vol-e")
    rig.runner.on(r"iscsi-readcapacity16", Reply(stdout=f"Total size:{(32 << 20) + (2 << 20)}\n"))
    assert rig.agent.extend("vol-e", 32 << 20) == (32 << 20) + (2 << 20)  # what the host sees
    (resized,) = rig.hv.resized
    assert resized[2] == 32 << 20
