"""tests/rig.py: the test domain's XML for every variant the tiers use, and the bounded wait."""

from __future__ import annotations

import time

import pytest
from lxml import etree

from tests.rig import domain_xml, wait_until

HEAD = """<name>vm</name><memory unit='MiB'>{mib}</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='{machine}'>hvm</type></os>"""
SCSI = "<controller type='scsi' index='{i}' model='virtio-scsi'/>"
EMULATOR = "<emulator>/usr/bin/qemu-system-x86_64</emulator>"


def canonical(xml: str) -> str:
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(xml.encode(), parser), method="c14n").decode()


@pytest.mark.parametrize(
    ("kw", "golden"),
    [
        (  # the host tier's domain (tests/fakes/daemon_rig.py, test_agent_daemon, test_domain_units)
            {},
            f"<domain type='kvm'>{HEAD.format(mib=64, machine='q35')}"
            f"<devices>{EMULATOR}{SCSI.format(i=0)}</devices></domain>",
        ),
        (  # test_data_path: free PCIe root ports for a virtio disk
            {"pci_root_ports": 8},
            f"<domain type='kvm'>{HEAD.format(mib=64, machine='q35')}<devices>{EMULATOR}{SCSI.format(i=0)}"
            "<controller type='pci' index='0' model='pcie-root'/>"
            + "".join(f"<controller type='pci' index='{i}' model='pcie-root-port'/>" for i in range(1, 9))
            + "</devices></domain>",
        ),
        (  # inside the guest (TCG): the end-to-end scenarios' domain
            {"virt_type": "qemu", "machine": "pc", "memory_mib": 32, "scsi_controllers": 2, "acpi": True},
            f"<domain type='qemu'>{HEAD.format(mib=32, machine='pc')}<features><acpi/></features>"
            f"<devices>{EMULATOR}{SCSI.format(i=0)}{SCSI.format(i=1)}</devices></domain>",
        ),
        (  # bench/attach_guest.py
            {"virt_type": "qemu"},
            f"<domain type='qemu'>{HEAD.format(mib=64, machine='q35')}"
            f"<devices>{EMULATOR}{SCSI.format(i=0)}</devices></domain>",
        ),
    ],
    ids=["host", "host-pci", "guest", "bench"],
)
def test_domain_xml_variants(kw: dict[str, object], golden: str) -> None:
    assert canonical(domain_xml("vm", **kw)) == canonical(golden)  # type: ignore[arg-type]


def test_pci_root_ports_need_q35() -> None:
    with pytest.raises(ValueError, match="q35"):
        domain_xml("vm", machine="pc", pci_root_ports=1)


def test_a_name_is_escaped() -> None:
    assert etree.fromstring(domain_xml("a<b & 'c'").encode()).findtext("name") == "a<b & 'c'"


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([None, 0, "", "ready"])
    assert wait_until("ready", lambda: next(values), 5) == "ready"


def test_wait_until_fails_at_its_deadline() -> None:
    began = time.monotonic()
    with pytest.raises(AssertionError, match=r"never: not within 0.05s"):
        wait_until("never", lambda: False, 0.05, every=0.01)
    assert time.monotonic() - began < 1
