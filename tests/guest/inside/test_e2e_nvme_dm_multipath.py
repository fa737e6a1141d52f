"""End to end over NVMe/TCP with native NVMe multipath OFF (nvme_core multipath=N): dm-multipath over the
controllers' own namespace devices, through both daemons (`blockwire-storage` with the `file` backend and
the `nvmet` exporter on two ports, `blockwire-agent`, a no-OS domain).

The module's fixture reloads the host's NVMe driver with multipath=N (after checking that no mount is on
an NVMe device and no controller exists) and with multipath=Y after, whatever happened.

* AttachVolume over two ports -> two controllers, each with its own namespace device carrying the
  announced NGUID and UUID -> one dm-multipath map over both (dm uuid mpath-<the namespace's wwid>) ->
  hot-plugged into the domain -> data through the map is in the volume's file -> one port down: I/O
  through the map goes on -> the port back: both controllers live, multipathd has both paths again ->
  DetachVolume -> nothing left (no controller, namespace device or map; no subsystem in configfs);
* a namespace over two ports that carries another attached volume's NGUID and UUID is refused, and the
  attached volume's controllers, devices, map, disk and data are untouched.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from blockwire.errors import FailedPrecondition
from blockwire.v1 import types_pb2 as pb
from tests.guest.inside import kernel, nvmet
from tests.guest.inside.conftest import Stack, start_stack
from tests.guest.inside.kernel import MiB
from tests.guest.inside.test_e2e_nvme import (
    CONFIGFS,
    ctrl_states,
    nvmet_sections,
    port_link,
    subsystem_in_configfs,
)


@pytest.fixture(scope="module")
def dm_nvme_stack(libvirtd: None) -> Iterator[Stack]:
    why = nvmet.available()
    if why:
        pytest.fail(f"NVMe/TCP is not available in the guest: {why}", pytrace=False)
    why = nvmet.reload_host_driver(multipath=False)
    if why:
        pytest.fail(f"cannot turn native NVMe multipath off in the guest: {why}", pytrace=False)
    workdir = Path(f"/var/tmp/bw-e2e-nvme-dm-{uuid.uuid4().hex[:6]}")
    prefix = f"nqn.2026-01.io.blockwire.d{uuid.uuid4().hex[:8]}"
    try:
        stack = start_stack(workdir, nvmet_sections(workdir, prefix))
        try:
            connector = stack.agent.get_connector()
            assert pb.TRANSPORT_NVME_TCP in connector.transports, connector
            assert connector.multipath, connector  # multipathd runs in the guest
            yield stack
        finally:
            stack.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        nvmet.disconnect_all()
        kernel.settle()
        why = nvmet.reload_host_driver(multipath=True)
        assert not why, f"native NVMe multipath not restored: {why}"


def nvme_maps() -> list[str]:
    """Multipath maps whose paths are NVMe namespace devices."""
    out = []
    for dm in Path("/sys/block").glob("dm-*"):
        if (kernel.attr(dm / "dm/uuid") or "").startswith("mpath-") and any(
            p.name.startswith("nvme") for p in kernel.entries(dm / "slaves")
        ):
            out.append(dm.name)
    return sorted(out)


@pytest.fixture
def clean_dm_nvme() -> Iterator[None]:
    kernel.settle()
    assert nvmet.host_leftovers() == {}
    assert nvme_maps() == []
    yield
    kernel.settle()
    left = nvmet.host_leftovers()
    maps = nvme_maps()
    if left or maps:
        for name in kernel.dm_maps():
            kernel.run(["multipath", "-f", name], ok=(0, 1))
        nvmet.disconnect_all()
        pytest.fail(f"the test left behind: {left} maps {maps}", pytrace=False)


def own_devices(nqn: str) -> dict[str, str]:
    """traddr -> the namespace device of the controller to `nqn` there (nvmeNnM under class/nvme/nvmeN)."""
    out = {}
    for name, a in nvmet.controllers().items():
        if a.get("subsysnqn") != nqn:
            continue
        addr = a["address"].split(",")[0].removeprefix("traddr=")
        devs = [p.name for p in Path("/sys/class/nvme", name).glob("nvme*n*") if "c" not in p.name[4:]]
        if devs:
            out[addr] = devs[0]
    return out


def path_states(devs: Iterable[str]) -> dict[str, str]:
    """dev -> multipathd's dm state of that path ("active", "failed")."""
    rows = kernel.run(["multipathd", "show", "paths", "raw", "format", "%d %t"]).stdout.splitlines()
    wanted = set(devs)
    return {r.split()[0]: r.split()[1] for r in rows if len(r.split()) >= 2 and r.split()[0] in wanted}


def sysattr(dev: str, attr: str) -> str:
    return (Path("/sys/block") / dev / attr).read_text().strip()


def test_two_ports_one_dm_map_port_down_and_back_then_nothing_left(
    clean_dm_nvme: None, dm_nvme_stack: Stack, domain: str
) -> None:
    s = dm_nvme_stack
    assert not nvmet.native_multipath()
    steps = kernel.Steps()
    took, timings = steps.took, steps.timings

    vol = s.storage.create_volume(f"e2e-nvme-dm-{uuid.uuid4().hex[:6]}", 64 * MiB, backend="file")
    attached = False
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        attached = True
        took("attach")
        ci = att.connection_info.nvmeof
        nqn = ci.subsystem_nqn
        assert ctrl_states(nqn) == {"127.0.0.1": "live", "127.0.0.2": "live"}
        devs = own_devices(nqn)
        assert sorted(devs) == ["127.0.0.1", "127.0.0.2"], devs
        for dev in devs.values():  # each controller's namespace device is the volume's
            assert sysattr(dev, "nguid").replace("-", "") == ci.namespace_nguid
            assert sysattr(dev, "uuid") == ci.namespace_uuid
        wwid = sysattr(devs["127.0.0.1"], "wwid")
        # the map: over both devices, named by the namespace's wwid, and it is what the domain got
        assert att.host_device.startswith("/dev/dm-"), att.host_device
        dm = att.host_device.removeprefix("/dev/")
        assert sysattr(dm, "dm/uuid") == f"mpath-{wwid}"
        assert sorted(p.name for p in Path("/sys/block", dm, "slaves").iterdir()) == sorted(devs.values())
        disk = next(d for d in kernel.domain_disks(domain) if d.target == att.target_dev)
        assert disk.source == att.host_device
        pattern = kernel.write_pattern(att.host_device, 5)
        assert kernel.read_at(s.volume_file(vol.id), 5) == pattern
        took("checks + I/O")

        link = port_link("127.0.0.2", nqn)
        link.unlink()
        kernel.wait_until("the 127.0.0.2 path down", lambda: ctrl_states(nqn).get("127.0.0.2") != "live", 60)
        pattern = kernel.write_pattern(att.host_device, 9)
        assert kernel.read_at(s.volume_file(vol.id), 9) == pattern
        assert kernel.read_at(att.host_device, 5) == kernel.read_at(s.volume_file(vol.id), 5)
        took("path down, I/O")
        print(f"multipath -ll with 127.0.0.2 down:\n{kernel.run(['multipath', '-ll']).stdout}")

        with contextlib.suppress(FileExistsError):
            link.symlink_to(CONFIGFS / "subsystems" / nqn)
        kernel.wait_until(
            "both paths live again",
            lambda: ctrl_states(nqn) == {"127.0.0.1": "live", "127.0.0.2": "live"},
            90,
        )
        kernel.wait_until("multipathd has both paths active again", lambda: path_states(devs.values()) == {
            d: "active" for d in devs.values()
        }, 60)  # fmt: skip
        pattern = kernel.write_pattern(att.host_device, 13)
        assert kernel.read_at(s.volume_file(vol.id), 13) == pattern
        took("path back")

        s.agent.detach_volume(domain, vol.id)
        attached = False
        took("detach")
        assert not [d for d in kernel.domain_disks(domain) if d.target == att.target_dev]
        kernel.settle()
        assert nvmet.host_leftovers() == {}
        assert nvme_maps() == []
        assert not Path("/sys/block", dm).exists()
        assert not subsystem_in_configfs(nqn)
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)
    print(f"timings (s): {timings}")


def test_a_namespace_with_another_volumes_identity_is_refused_and_its_map_untouched(
    clean_dm_nvme: None, dm_nvme_stack: Stack, domain: str
) -> None:
    """Volume B attached (its map over two namespace devices); connection info of a volume A over two
    ports of a second target whose namespace carries B's NGUID and UUID: refused by ConnectVolume and
    AttachVolume, a forced DisconnectVolume of A's info removes nothing; B's controllers, devices, map,
    disk and data are as they were."""
    s = dm_nvme_stack
    b = s.storage.create_volume(f"e2e-nvme-dm-b-{uuid.uuid4().hex[:6]}", 32 * MiB, backend="file")
    other = nvmet.Nvmet(trsvcid=4430)
    image = Path(f"/var/tmp/bw-reused-dm-{uuid.uuid4().hex[:6]}.img")
    try:
        att_b = s.agent.attach_volume(domain, volume_id=b.id)
        assert att_b.host_device.startswith("/dev/dm-"), att_b.host_device
        ci_b = att_b.connection_info.nvmeof
        pattern = kernel.write_pattern(att_b.host_device, 3)
        before = (nvmet.controllers(), nvmet.heads(), nvme_maps(), kernel.domain_xml(domain))

        host_nqn = s.agent.get_connector().nvme_host_nqn
        a_nqn = "nqn.2026-01.io.blockwire.test:reused-dm"
        other.subsystem(a_nqn, host_nqn)
        other.namespace(a_nqn, 1, image, 32 * MiB,
                        nguid=ci_b.namespace_nguid, ns_uuid=ci_b.namespace_uuid)  # fmt: skip
        info_a = pb.ConnectionInfo(
            volume_id="vol-a-reused",
            nvmeof=pb.NvmeofConnection(
                subsystem_nqn=a_nqn,
                portals=[
                    pb.NvmeofPortal(address="127.0.0.1:4430", transport="tcp"),
                    pb.NvmeofPortal(address="127.0.0.2:4430", transport="tcp"),
                ],
                namespace_id=1,
                namespace_nguid=uuid.uuid4().hex,
                namespace_uuid=str(uuid.uuid4()),
                host_nqn=host_nqn,
            ),
        )
        with pytest.raises(FailedPrecondition, match="storage announced"):
            s.agent.connect_volume(info_a)
        with pytest.raises(FailedPrecondition, match="storage announced"):
            s.agent.attach_volume(domain, connection_info=info_a)
        s.agent.disconnect_volume(info_a, force=True)
        kernel.settle()
        assert not ctrl_states(a_nqn), "the refused connects left controllers"
        assert (nvmet.controllers(), nvmet.heads(), nvme_maps(), kernel.domain_xml(domain)) == before
        assert kernel.read_at(att_b.host_device, 3) == pattern
        assert kernel.read_at(s.volume_file(b.id), 3) == pattern
        s.agent.detach_volume(domain, b.id)
        kernel.settle()
        assert nvme_maps() == []
    finally:
        with contextlib.suppress(Exception):
            s.agent.detach_volume(domain, b.id, force=True)
        s.storage.delete_volume(b.id)
        nvmet.disconnect_all()
        kernel.settle()
        other.close()
        image.unlink(missing_ok=True)
