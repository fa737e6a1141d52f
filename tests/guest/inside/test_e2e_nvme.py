"""End to end through blockwire's daemons over NVMe/TCP: `blockwire-storage` with the `file` backend and
the `nvmet` exporter on two ports (127.0.0.1:4420, 127.0.0.2:4420), `blockwire-agent` with the kernel's
NVMe/TCP host driver (hostagent/connectors/nvme.py), a no-OS domain.

* two ports -> two controllers, one namespace head (native multipath) with the announced NGUID and UUID
  -> hot-plugged into the running domain -> data written through the head is in the volume's file ->
  one port down (the target stops offering the subsystem there): I/O goes on over the other -> the
  port back: both controllers live again -> DetachVolume -> nothing left (no controller, subsystem or
  namespace on the host; no subsystem in the target's configfs);
* a namespace that carries another (attached) volume's NGUID, exported by a second target the test
  makes, is refused (FAILED_PRECONDITION, before any block device) by AttachVolume and ConnectVolume;
  the attached volume's controllers, head, disk and data are untouched, also by a forced
  DisconnectVolume of the refused connection info;
* ANA followed: the target puts one port's ANA group `inaccessible` -> the host's path device says so,
  I/O goes on over the other path, the agent reports that path down (PATH_DOWN, "ANA state
  inaccessible") without touching a controller, and up again when the group is `optimized` again;
* ExtendVolume while attached reaches the domain;
* eight volumes attached at once and detached at once, nothing left;
* DH-HMAC-CHAP (storage with `dhchap = true`, bidirectional): accepted with the secrets storage announced
  (both directions), refused with a wrong host secret, a wrong controller secret or none, nothing left
  connected. Runs on the guest's backports kernel only (`guest_kernel("backports")`, 6.12): Debian 12's
  6.1 kernel is built without CONFIG_NVME_AUTH and CONFIG_NVME_TARGET_AUTH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blockwire.client import NO_RETRY, HostAgentClient
from blockwire.errors import BlockwireError, FailedPrecondition, PermissionDenied
from blockwire.v1 import hostagent_pb2
from blockwire.v1 import types_pb2 as pb
from hostagent import api
from storagesvc.targets.nvmet import ANA_GROUP
from tests.guest.inside import kernel, nvmet
from tests.guest.inside.conftest import Stack, start_stack
from tests.guest.inside.kernel import MiB
from tests.rig import KILLED

PORTALS = ("127.0.0.1:4420", "127.0.0.2:4420")
AUTH_PORTALS = ("127.0.0.1:4432", "127.0.0.2:4432")  # the DH-HMAC-CHAP stack's own ports
CONFIGFS = Path("/sys/kernel/config/nvmet")


def nvmet_sections(
    workdir: Path, prefix: str, *, portals: tuple[str, ...] = PORTALS, dhchap: bool = False
) -> str:
    listed = ", ".join(f'"{p}"' for p in portals)
    return (
        f'[[backends]]\nname = "file"\nkind = "file"\npath = "{workdir}/backend"\nexporter = "nvmet"\n'
        f'[exporters.nvmet]\nkind = "nvmet"\nportals = [{listed}]\nnqn_prefix = "{prefix}"\n'
        f'dhchap = {"true" if dhchap else "false"}\ndhchap_key_file = "{workdir}/dhchap.key"\n'
    )


@pytest.fixture(scope="module")
def nvme_stack(libvirtd: None) -> Iterator[Stack]:
    why = nvmet.available()
    if why:
        pytest.fail(f"NVMe/TCP is not available in the guest: {why}", pytrace=False)
    # On the root file system, not /tmp: nvmet opens a file backing with O_DIRECT, which 6.1's tmpfs refuses.
    workdir = Path(f"/var/tmp/bw-e2e-nvme-{uuid.uuid4().hex[:6]}")
    prefix = f"nqn.2026-01.io.blockwire.e{uuid.uuid4().hex[:8]}"
    stack = start_stack(workdir, nvmet_sections(workdir, prefix))
    try:
        connector = stack.agent.get_connector()
        assert pb.TRANSPORT_NVME_TCP in connector.transports, connector
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def subsystem_in_configfs(nqn: str) -> bool:
    return (CONFIGFS / "subsystems" / nqn).exists()


def port_link(address: str, nqn: str) -> Path:
    for port in CONFIGFS.glob("ports/*"):
        if (port / "addr_traddr").read_text().strip() == address:
            return port / "subsystems" / nqn
    raise AssertionError(f"no nvmet port on {address}")


def ctrl_states(nqn: str) -> dict[str, str]:
    """traddr -> state of the host's controllers to `nqn`."""
    return {
        a["address"].split(",")[0].removeprefix("traddr="): a["state"]
        for a in nvmet.controllers().values()
        if a.get("subsysnqn") == nqn
    }


def head_attrs(dev: str) -> dict[str, str]:
    name = dev.removeprefix("/dev/")
    return {a: (Path("/sys/block") / name / a).read_text().strip() for a in ("nguid", "uuid", "nsid")}


def test_two_ports_hotplug_port_down_and_back_then_nothing_left(
    clean_nvme: None, nvme_stack: Stack, domain: str
) -> None:
    s = nvme_stack
    steps = kernel.Steps()
    took, timings = steps.took, steps.timings

    vol = s.storage.create_volume(f"e2e-nvme-{uuid.uuid4().hex[:6]}", 64 * MiB, backend="file")
    attached = False
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        attached = True
        took("attach")
        ci = att.connection_info.nvmeof
        nqn = ci.subsystem_nqn
        assert sorted(p.address for p in ci.portals) == sorted(PORTALS)
        # the host: two live controllers, one head with the announced identity
        assert ctrl_states(nqn) == {"127.0.0.1": "live", "127.0.0.2": "live"}
        attrs = head_attrs(att.host_device)
        assert attrs["nguid"].replace("-", "") == ci.namespace_nguid
        assert attrs["uuid"] == ci.namespace_uuid
        assert att.host_device.startswith("/dev/nvme")
        assert "c" not in att.host_device.removeprefix("/dev/nvme")  # the head, not a path device
        # the domain: the head hot-plugged
        disk = next(d for d in kernel.domain_disks(domain) if d.target == att.target_dev)
        assert disk.source == att.host_device
        # data through the head reaches the volume's file
        pattern = kernel.write_pattern(att.host_device, 5)
        assert kernel.read_at(s.volume_file(vol.id), 5) == pattern
        took("checks + I/O")

        # one port down: the target stops offering the subsystem on 127.0.0.2
        link = port_link("127.0.0.2", nqn)
        link.unlink()
        kernel.wait_until("the 127.0.0.2 path down", lambda: ctrl_states(nqn).get("127.0.0.2") != "live", 60)
        pattern = kernel.write_pattern(att.host_device, 9)
        assert kernel.read_at(s.volume_file(vol.id), 9) == pattern
        assert kernel.read_at(att.host_device, 5) == kernel.read_at(s.volume_file(vol.id), 5)
        took("path down, I/O")
        # the port back (storage's export checks may have put it back already): the kernel reconnects
        with contextlib.suppress(FileExistsError):
            link.symlink_to(CONFIGFS / "subsystems" / nqn)
        kernel.wait_until(
            "both paths live again",
            lambda: ctrl_states(nqn) == {"127.0.0.1": "live", "127.0.0.2": "live"},
            90,
        )
        pattern = kernel.write_pattern(att.host_device, 13)
        assert kernel.read_at(s.volume_file(vol.id), 13) == pattern
        took("path back")

        s.agent.detach_volume(domain, vol.id)
        attached = False
        took("detach")
        assert not [d for d in kernel.domain_disks(domain) if d.target == att.target_dev]
        kernel.settle()
        assert nvmet.host_leftovers() == {}
        assert not subsystem_in_configfs(nqn)
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)
    print(f"timings (s): {timings}")


def port_ana_state(address: str) -> Path:
    for port in CONFIGFS.glob("ports/*"):
        if (port / "addr_traddr").read_text().strip() == address:
            return port / "ana_groups" / ANA_GROUP / "ana_state"
    raise AssertionError(f"no nvmet port on {address}")


def host_ana_states(nqn: str) -> dict[str, str]:
    """traddr -> the ANA state of the namespace over that controller, as the host kernel reports it."""
    out = {}
    for name, attrs in nvmet.controllers().items():
        if attrs.get("subsysnqn") != nqn:
            continue
        addr = attrs["address"].split(",")[0].removeprefix("traddr=")
        for path in Path("/sys/class/nvme", name).glob("nvme*c*n*"):
            state = kernel.attr(path / "ana_state")
            if state is not None:  # None: the controller went away during the walk
                out[addr] = state
    return out


def test_an_ana_change_is_followed_and_io_goes_on(clean_nvme: None, nvme_stack: Stack, domain: str) -> None:
    s = nvme_stack
    vol = s.storage.create_volume(f"e2e-ana-{uuid.uuid4().hex[:6]}", 32 * MiB, backend="file")
    seen: list[hostagent_pb2.WatchEventsResponse] = []
    stream = s.agent.watch_events(
        volume_id=vol.id, types=[hostagent_pb2.EVENT_TYPE_PATH_DOWN, hostagent_pb2.EVENT_TYPE_PATH_UP]
    )
    consumer = threading.Thread(target=lambda: seen.extend(stream), daemon=True)
    consumer.start()
    state = port_ana_state("127.0.0.2")
    attached = False
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        attached = True
        nqn = att.connection_info.nvmeof.subsystem_nqn
        assert host_ana_states(nqn) == {"127.0.0.1": "optimized", "127.0.0.2": "optimized"}
        ctrls_before = dict(ctrl_states(nqn))

        state.write_text("inaccessible\n")
        kernel.wait_until(
            "the host sees 127.0.0.2 inaccessible",
            lambda: host_ana_states(nqn).get("127.0.0.2") == "inaccessible",
            60,
        )
        pattern = kernel.write_pattern(att.host_device, 3)
        assert kernel.read_at(s.volume_file(vol.id), 3) == pattern
        kernel.wait_until(
            "PATH_DOWN for 127.0.0.2",
            lambda: any(e.type == hostagent_pb2.EVENT_TYPE_PATH_DOWN and e.path == PORTALS[1] for e in seen),
            60,
        )
        down = next(e for e in seen if e.type == hostagent_pb2.EVENT_TYPE_PATH_DOWN)
        assert "ANA state inaccessible" in down.message, down
        assert ctrl_states(nqn) == ctrls_before  # reported, not repaired: every controller kept, live

        state.write_text("optimized\n")
        kernel.wait_until(
            "PATH_UP for 127.0.0.2",
            lambda: any(e.type == hostagent_pb2.EVENT_TYPE_PATH_UP and e.path == PORTALS[1] for e in seen),
            60,
        )
        assert host_ana_states(nqn) == {"127.0.0.1": "optimized", "127.0.0.2": "optimized"}
        assert [e.path for e in seen] == [PORTALS[1], PORTALS[1]]  # the other path never went down

        s.agent.detach_volume(domain, vol.id)
        attached = False
        kernel.settle()
        assert nvmet.host_leftovers() == {}
    finally:
        with contextlib.suppress(OSError):
            state.write_text("optimized\n")
        stream.cancel()
        consumer.join(timeout=10)
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)


def test_a_namespace_with_another_volumes_nguid_is_refused_and_nothing_else_touched(
    clean_nvme: None, nvme_stack: Stack, domain: str
) -> None:
    s = nvme_stack
    b = s.storage.create_volume(f"e2e-nvme-b-{uuid.uuid4().hex[:6]}", 32 * MiB, backend="file")
    other = nvmet.Nvmet(trsvcid=4430)
    image = Path(f"/var/tmp/bw-reused-{uuid.uuid4().hex[:6]}.img")
    try:
        att_b = s.agent.attach_volume(domain, volume_id=b.id)
        ci_b = att_b.connection_info.nvmeof
        pattern = kernel.write_pattern(att_b.host_device, 3)
        before = (nvmet.controllers(), nvmet.heads(), kernel.domain_xml(domain))

        # volume A's connection info, but the namespace there carries B's NGUID and UUID
        host_nqn = s.agent.get_connector().nvme_host_nqn
        a_nqn = "nqn.2026-01.io.blockwire.test:reused"
        other.subsystem(a_nqn, host_nqn, addresses=("127.0.0.1",))
        other.namespace(a_nqn, 1, image, 32 * MiB,
                        nguid=ci_b.namespace_nguid, ns_uuid=ci_b.namespace_uuid)  # fmt: skip
        info_a = pb.ConnectionInfo(
            volume_id="vol-a-reused",
            nvmeof=pb.NvmeofConnection(
                subsystem_nqn=a_nqn,
                portals=[pb.NvmeofPortal(address="127.0.0.1:4430", transport="tcp")],
                namespace_id=1,
                namespace_nguid=uuid.uuid4().hex,
                namespace_uuid=str(uuid.uuid4()),
                host_nqn=host_nqn,
            ),
        )
        started = time.monotonic()
        with pytest.raises(FailedPrecondition, match="storage announced"):
            s.agent.connect_volume(info_a)
        refused_s = time.monotonic() - started
        with pytest.raises(FailedPrecondition, match="storage announced"):
            s.agent.attach_volume(domain, connection_info=info_a)
        s.agent.disconnect_volume(info_a, force=True)
        kernel.settle()
        assert not ctrl_states(a_nqn), "the refused connects left controllers"
        assert (nvmet.controllers(), nvmet.heads(), kernel.domain_xml(domain)) == before
        assert kernel.read_at(att_b.host_device, 3) == pattern
        assert kernel.read_at(s.volume_file(b.id), 3) == pattern
        s.agent.detach_volume(domain, b.id)
        print(f"refused in {refused_s:.2f}s")
    finally:
        with contextlib.suppress(Exception):
            s.agent.detach_volume(domain, b.id, force=True)
        s.storage.delete_volume(b.id)
        nvmet.disconnect_all()
        kernel.settle()
        other.close()
        image.unlink(missing_ok=True)


def test_extend_while_attached_reaches_the_domain(clean_nvme: None, nvme_stack: Stack, domain: str) -> None:
    s = nvme_stack
    vol = s.storage.create_volume(f"e2e-nvme-grow-{uuid.uuid4().hex[:6]}", 32 * MiB, backend="file")
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        assert kernel.domblk_capacity(domain, att.target_dev) == 32 * MiB
        pattern = kernel.write_pattern(att.host_device, 30)
        started = time.monotonic()
        assert s.storage.extend_volume(vol.id, 48 * MiB).size_bytes == 48 * MiB
        assert s.agent.extend_volume(vol.id, 48 * MiB) == 48 * MiB
        extend_s = time.monotonic() - started
        assert kernel.domblk_capacity(domain, att.target_dev) == 48 * MiB
        name = att.host_device.removeprefix("/dev/")
        assert int((Path("/sys/block") / name / "size").read_text()) * 512 == 48 * MiB
        assert kernel.read_at(att.host_device, 30) == pattern
        pattern = kernel.write_pattern(att.host_device, 47)
        assert kernel.read_at(s.volume_file(vol.id), 47) == pattern
        s.agent.detach_volume(domain, vol.id)
        print(f"extend (storage + agent): {extend_s:.1f}s")
    finally:
        s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)


def test_eight_volumes_at_once(clean_nvme: None, nvme_stack: Stack, domain: str) -> None:
    s = nvme_stack
    n = 8
    tag = uuid.uuid4().hex[:6]
    vols = [s.storage.create_volume(f"e2e-nvme-many-{tag}-{i}", 16 * MiB, backend="file") for i in range(n)]
    try:
        with ThreadPoolExecutor(n) as pool:
            started = time.monotonic()
            atts = list(pool.map(lambda v: s.agent.attach_volume(domain, volume_id=v.id), vols))
            attach_s = time.monotonic() - started
            disks = {d.target: d for d in kernel.domain_disks(domain)}
            assert len({a.host_device for a in atts}) == n
            for a in atts:
                assert disks[a.target_dev].source == a.host_device
                nqn = a.connection_info.nvmeof.subsystem_nqn
                assert ctrl_states(nqn) == {"127.0.0.1": "live", "127.0.0.2": "live"}
                assert (
                    head_attrs(a.host_device)["nguid"].replace("-", "")
                    == a.connection_info.nvmeof.namespace_nguid
                )
            for i, a in enumerate(atts):
                pattern = kernel.write_pattern(a.host_device, i)
                assert kernel.read_at(s.volume_file(a.volume_id), i) == pattern
            started = time.monotonic()
            list(pool.map(lambda v: s.agent.detach_volume(domain, v.id), vols))
            detach_s = time.monotonic() - started
        assert kernel.domain_disks(domain) == []
        kernel.settle()
        assert nvmet.host_leftovers() == {}
        print(f"{n} volumes: attach {attach_s:.1f}s, detach {detach_s:.1f}s (concurrent)")
    finally:
        for v in vols:
            s.agent.detach_volume(domain, v.id, force=True)
            s.storage.delete_volume(v.id)


@pytest.fixture
def dhchap_stack(libvirtd: None) -> Iterator[Stack]:
    """Both daemons, storage's nvmet exporter with `dhchap = true` (bidirectional: host and controller
    secrets per host NQN) on its own ports (AUTH_PORTALS)."""
    why = nvmet.available()
    if why:
        pytest.fail(f"NVMe/TCP is not available in the guest: {why}", pytrace=False)
    why = nvmet.target_auth()
    if why:
        # Not a missing tier: this kernel cannot do it at all (the unit tier shows the secret goes to
        # /dev/nvme-fabrics only, never to an argv). The backports boot has it (tests/guest/image.py).
        pytest.skip(
            f"DH-HMAC-CHAP cannot run on {os.uname().release}: {why} (needs CONFIG_NVME_AUTH, "
            "CONFIG_NVME_HOST_AUTH, CONFIG_NVME_TARGET_AUTH; Debian 12's 6.1 kernel has none)"
        )
    workdir = Path(f"/var/tmp/bw-e2e-nvme-auth-{uuid.uuid4().hex[:6]}")
    prefix = f"nqn.2026-01.io.blockwire.a{uuid.uuid4().hex[:8]}"
    stack = start_stack(workdir, nvmet_sections(workdir, prefix, portals=AUTH_PORTALS, dhchap=True))
    try:
        yield stack
    finally:
        stack.stop()  # keeps both daemons' logs in the run's results
        shutil.rmtree(workdir, ignore_errors=True)


def with_secrets(
    ci: pb.ConnectionInfo, *, host: str | None = None, ctrl: str | None = None
) -> pb.ConnectionInfo:
    """A copy of `ci` with other DH-HMAC-CHAP secrets ("" clears one)."""
    out = pb.ConnectionInfo()
    out.CopyFrom(ci)
    if host is not None:
        out.nvmeof.dhchap_host_secret = host
    if ctrl is not None:
        out.nvmeof.dhchap_ctrl_secret = ctrl
    return out


def controller_secrets(nqn: str) -> dict[str, tuple[bool, bool]]:
    """traddr -> whether the host's controller to `nqn` holds a host secret and a controller secret
    (sysfs dhchap_secret / dhchap_ctrl_secret: "none" when unset). The secrets themselves are not kept."""
    out = {}
    for name, attrs in nvmet.controllers().items():
        if attrs.get("subsysnqn") != nqn:
            continue
        addr = attrs["address"].split(",")[0].removeprefix("traddr=")
        found = []
        for attr in ("dhchap_secret", "dhchap_ctrl_secret"):
            found.append(kernel.attr(Path("/sys/class/nvme", name, attr)) not in (None, "", "none"))
        out[addr] = (found[0], found[1])
    return out


@pytest.mark.guest_kernel("backports")
def test_dh_hmac_chap_accepted_and_refused(clean_nvme: None, dhchap_stack: Stack, domain: str) -> None:
    """Storage (dhchap on, bidirectional) announces the host's secrets in the connection info; the agent
    connects with them (both directions authenticated) and hot-plugs the volume; a wrong host secret, a
    wrong controller secret and no secret at all are refused by the kernel, with nothing left connected."""
    s = dhchap_stack
    vol = s.storage.create_volume(f"e2e-auth-{uuid.uuid4().hex[:6]}", 32 * MiB, backend="file")
    connector = s.agent.get_connector()
    attached = False
    exported = ""  # the attachment id while storage exports the volume for the refused connects
    timings: dict[str, float] = {}
    try:
        # Refused, through the agent's ConnectVolume with storage's own connection info, secrets changed.
        att = s.storage.create_attachment(vol.id, connector)
        exported = att.id
        ci = att.connection_info
        nqn = ci.nvmeof.subsystem_nqn
        assert ci.nvmeof.dhchap_host_secret.startswith("DHHC-1:"), "storage announced no host secret"
        assert ci.nvmeof.dhchap_ctrl_secret.startswith("DHHC-1:"), "storage announced no controller secret"
        host_key = (CONFIGFS / "hosts" / connector.nvme_host_nqn / "dhchap_key").read_text().strip()
        assert host_key == ci.nvmeof.dhchap_host_secret, "the target holds another host secret"
        for case, bad in (
            ("a wrong host secret", with_secrets(ci, host=nvmet.dhchap_key(), ctrl="")),
            ("a wrong controller secret", with_secrets(ci, ctrl=nvmet.dhchap_key())),
            ("no secret", with_secrets(ci, host="", ctrl="")),
        ):
            started = time.monotonic()
            with pytest.raises(BlockwireError) as refused:
                s.agent.connect_volume(bad)
            timings[f"refused: {case}"] = round(time.monotonic() - started, 2)
            print(f"{case}: {type(refused.value).__name__}: {refused.value}")
            assert isinstance(refused.value, PermissionDenied), (case, refused.value)
            assert "DH-HMAC-CHAP" in str(refused.value), (case, refused.value)
            for secret in (ci.nvmeof.dhchap_host_secret, ci.nvmeof.dhchap_ctrl_secret):
                assert secret not in str(refused.value)
            kernel.settle()
            assert not ctrl_states(nqn), f"{case}: controllers left: {ctrl_states(nqn)}"
            assert nvmet.host_leftovers() == {}, case
        s.storage.delete_attachment(att.id)
        exported = ""

        # Accepted: AttachVolume through both daemons, with the announced secrets, on both ports.
        started = time.monotonic()
        a = s.agent.attach_volume(domain, volume_id=vol.id)
        attached = True
        timings["attach"] = round(time.monotonic() - started, 2)
        assert ctrl_states(nqn) == {"127.0.0.1": "live", "127.0.0.2": "live"}
        # both directions: each controller was made with a host secret and a controller secret
        assert controller_secrets(nqn) == {"127.0.0.1": (True, True), "127.0.0.2": (True, True)}
        assert head_attrs(a.host_device)["nguid"].replace("-", "") == a.connection_info.nvmeof.namespace_nguid
        pattern = kernel.write_pattern(a.host_device, 7)
        assert kernel.read_at(s.volume_file(vol.id), 7) == pattern
        for pid in (s.storage_daemon.pid, s.agent_daemon.pid, os.getpid()):
            cmdline = Path(f"/proc/{pid}/cmdline").read_text()
            assert ci.nvmeof.dhchap_host_secret not in cmdline
        for log in (s.storage_daemon.log, s.agent_daemon.log):
            text = log.read_text()
            assert ci.nvmeof.dhchap_host_secret not in text, f"the host secret is in {log}"
            assert ci.nvmeof.dhchap_ctrl_secret not in text, f"the controller secret is in {log}"
        s.agent.detach_volume(domain, vol.id)
        attached = False
        kernel.settle()
        assert nvmet.host_leftovers() == {}
        assert not subsystem_in_configfs(nqn)
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        nvmet.disconnect_all()
        if exported:
            s.storage.delete_attachment(exported)
        s.storage.delete_volume(vol.id)
    print(f"timings (s): {timings}")


@pytest.mark.parametrize(
    ("failpoint", "outcome"),
    [(api.FP_ATTACH_AFTER_CONNECT, "nothing"), (api.FP_ATTACH_AFTER_HOTPLUG, "complete")],
)
def test_agent_killed_mid_attach_all_or_nothing(
    clean_nvme: None, nvme_stack: Stack, domain: str, failpoint: str, outcome: str
) -> None:
    """SIGKILL after the controllers are made: the restarted agent leaves nothing (no controller,
    namespace or subsystem on the host, no storage attachment); after the hot-plug: one complete
    attachment over both ports, which then detaches to nothing."""
    s = nvme_stack
    vol = s.storage.create_volume(f"e2e-nvme-kill-{uuid.uuid4().hex[:6]}", 16 * MiB, backend="file")

    def restart(failpoints: str = "") -> None:
        s.agent.close()
        s.agent_daemon.stop()  # nothing to do when a failpoint killed it
        s.agent_daemon.start(failpoints)
        s.agent = HostAgentClient(f"unix://{s.agent_daemon.socket}")

    try:
        restart(f"{failpoint}=kill")
        client = HostAgentClient(f"unix://{s.agent_daemon.socket}", retry=NO_RETRY)
        with client, contextlib.suppress(BlockwireError):
            client.attach_volume(domain, volume_id=vol.id)
        assert s.agent_daemon.died(60) == KILLED
        assert nvmet.host_leftovers(), "the kill came before the connect"
        restart()  # reconciles before it serves
        kernel.settle()
        if outcome == "nothing":
            assert nvmet.host_leftovers() == {}
            assert kernel.domain_disks(domain) == []
            assert s.storage.list_attachments(volume_id=vol.id) == []
        else:
            att = s.agent.get_attachment(vol.id, domain)
            nqn = att.connection_info.nvmeof.subsystem_nqn
            assert ctrl_states(nqn) == {"127.0.0.1": "live", "127.0.0.2": "live"}
            assert [d.source for d in kernel.domain_disks(domain)] == [att.host_device]
            s.agent.detach_volume(domain, vol.id)
            kernel.settle()
            assert nvmet.host_leftovers() == {}
    finally:
        if not s.agent_daemon.running:
            restart()
        s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)
