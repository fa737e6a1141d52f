"""Host tier, real daemons: `blockwire-agent` and `blockwire-storage` killed with SIGKILL at every step of
attach, detach and export (failpoints armed by BLOCKWIRE_FAILPOINTS), then restarted. Reconciliation
must end with one complete attachment or nothing at all: on the host (libvirt live XML, libvirt
secrets, journal, loop device) and in storage (attachment rows, volume state, tgt targets, CHAP
accounts). The rule per step is in HostAgent.reconcile's and StorageService.reconcile's docstrings.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import types_pb2 as pb
from hostagent import api
from storagesvc import service
from storagesvc.targets import tgt
from tests.fakes.daemon_rig import (
    Rig,
    define_domain,
    force_cleanup,
    loop_device,
    remove_domain,
    rpc_code,
)
from tests.host.daemons import Started, Tgtd
from tests.rig import KILLED

COMPLETE, NOTHING = "complete", "nothing"
# The expected outcome of a kill at each failpoint (see HostAgent.reconcile).
AGENT_OUTCOME = {
    api.FP_ATTACH_AFTER_JOURNAL: NOTHING,
    api.FP_ATTACH_AFTER_CREATE_ATTACHMENT: NOTHING,
    api.FP_ATTACH_AFTER_CONNECT: NOTHING,
    api.FP_ATTACH_AFTER_HOTPLUG: COMPLETE,
    api.FP_ATTACH_BEFORE_COMPLETE: COMPLETE,
    api.FP_ATTACH_AFTER_COMPLETE: COMPLETE,
    **dict.fromkeys(api.DETACH_FAILPOINTS, NOTHING),
}
# Steps a local (connection info given, no storage) attachment goes through.
LOCAL_STEPS = [
    fp
    for fp in (*api.ATTACH_FAILPOINTS, *api.DETACH_FAILPOINTS)
    if fp
    not in (
        api.FP_ATTACH_AFTER_CREATE_ATTACHMENT,
        api.FP_DETACH_BEFORE_DELETE_ATTACHMENT,
        api.FP_DETACH_AFTER_DELETE_ATTACHMENT,
    )
]
STORAGE_EXPORT_STEPS = [
    service.FP_EXPORT_AFTER_CATALOG,
    tgt.FP_AFTER_TARGET_CREATE,
    tgt.FP_AFTER_ACCOUNT_CREATE,
    service.FP_EXPORT_AFTER_TARGET,
    service.FP_EXPORT_AFTER_ACL,
    service.FP_EXPORT_AFTER_ATTACHING,
]
STORAGE_UNEXPORT_STEPS = [service.FP_UNEXPORT_AFTER_DETACHING, service.FP_UNEXPORT_AFTER_TARGET_REMOVED]


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, tgtd: Tgtd, virt: libvirt.virConnect) -> Iterator[Rig]:
    with Rig(work=tmp_path_factory.mktemp("crash"), tgtd=tgtd, virt=virt).running(agent=False) as r:
        yield r


@pytest.fixture(scope="module")
def domain(rig: Rig) -> Iterator[str]:
    name = define_domain(rig.lv(), "bw-crash")
    yield name
    remove_domain(rig.lv(), name)


@pytest.fixture
def clean(rig: Rig, domain: str) -> Iterator[None]:
    """Each test starts with a running storage service, no agent and nothing attached; whatever it
    leaves (after a failure) is removed."""
    if rig.storage_proc is None or rig.storage_proc.proc.poll() is not None:
        rig.start_storage()
    yield
    if rig.agent_proc is not None:
        rig.agent_proc.kill()
        rig.agent_proc = None
    if rig.storage_proc is None or rig.storage_proc.proc.poll() is not None:
        rig.start_storage()
    force_cleanup(rig, domain)


def _retry(what: str, call: object, timeout: float = 30) -> None:
    """Calls until OK, as a client with retries does (channels reconnect after a daemon restart)."""
    deadline = time.monotonic() + timeout
    while True:
        code = rpc_code(call)  # type: ignore[arg-type]
        if code == grpc.StatusCode.OK:
            return
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED) or time.monotonic() > deadline:
            raise AssertionError(f"{what}: {code}")
        time.sleep(0.2)


@pytest.mark.parametrize("failpoint", list(AGENT_OUTCOME), ids=lambda f: f.removeprefix("agent."))
def test_agent_killed_at_each_step_qemu_iscsi(rig: Rig, domain: str, clean: None, failpoint: str) -> None:
    v = rig.create_volume()
    try:
        agent = rig.start_agent(failpoints=f"{failpoint}=kill")
        if failpoint in api.DETACH_FAILPOINTS:
            rig.attach(domain, v.id)
            code = rpc_code(lambda: rig.detach(domain, v.id))
        else:
            code = rpc_code(lambda: rig.attach(domain, v.id))
        assert agent.died() == KILLED, f"{failpoint} was not reached (call ended {code})"
        assert code == grpc.StatusCode.UNAVAILABLE

        rig.start_agent()  # reconciles before it serves
        if AGENT_OUTCOME[failpoint] == COMPLETE:
            assert rig.complete(domain, v.id) == {}
            assert len(rig.secrets()) == 1
            rig.detach(domain, v.id)  # the finished attachment detaches like any other
        assert rig.nothing_left(domain, v.id) == {}
        # and the volume attaches again
        rig.attach(domain, v.id)
        rig.detach(domain, v.id)
        assert rig.nothing_left(domain, v.id) == {}
    finally:
        if rig.agent_proc is not None:
            rig.agent_proc.stop()
            rig.agent_proc = None
        force_cleanup(rig, domain)
        rig.delete_volume(v.id)


@pytest.mark.parametrize("failpoint", LOCAL_STEPS, ids=lambda f: f.removeprefix("agent."))
def test_agent_killed_at_each_step_local_loop_device(
    rig: Rig, domain: str, clean: None, failpoint: str, tmp_path: Path
) -> None:
    with loop_device(tmp_path / "backing.img") as path:
        info = pb.ConnectionInfo(local=pb.LocalConnection(path=path), volume_id=f"loc-{uuid.uuid4().hex[:6]}")
        rig.volume_ids.add(info.volume_id)
        request = hpb.AttachVolumeRequest(domain=domain, connection_info=info)
        agent = rig.start_agent(failpoints=f"{failpoint}=kill")
        if failpoint in api.DETACH_FAILPOINTS:
            rig.agent.AttachVolume(request, timeout=30)
            code = rpc_code(lambda: rig.detach(domain, info.volume_id))
        else:
            code = rpc_code(lambda: rig.agent.AttachVolume(request, timeout=30))
        assert agent.died() == KILLED, f"{failpoint} was not reached (call ended {code})"

        rig.start_agent()
        if AGENT_OUTCOME[failpoint] == COMPLETE:
            (disk,) = rig.live_disks(domain)
            assert disk.find("source").get("dev") == path  # type: ignore[union-attr]
            got = rig.agent.GetAttachment(
                hpb.HostAgentServiceGetAttachmentRequest(volume_id=info.volume_id), timeout=10
            ).attachment
            assert got.state == pb.ATTACHMENT_STATE_ATTACHED
            assert got.target_dev == disk.find("target").get("dev")  # type: ignore[union-attr]
            rig.detach(domain, info.volume_id)
        assert rig.nothing_left(domain, "") == {}
        rig.agent.AttachVolume(request, timeout=30)  # the device is free again
        rig.detach(domain, info.volume_id)
        assert rig.nothing_left(domain, "") == {}
        rig.agent_proc.stop()  # type: ignore[union-attr]
        rig.agent_proc = None
    # the loop device was detached: QEMU held no reference to it any more


@pytest.mark.parametrize(
    "failpoint", STORAGE_EXPORT_STEPS + STORAGE_UNEXPORT_STEPS, ids=lambda f: f.removeprefix("storage.")
)
def test_storage_killed_in_the_middle_of_an_export(
    rig: Rig, domain: str, clean: None, failpoint: str
) -> None:
    v = rig.create_volume()
    try:
        assert rig.storage_proc is not None
        rig.storage_proc.stop()
        storage = rig.start_storage(failpoints=f"{failpoint}=kill")
        rig.start_agent()
        unexport = failpoint in STORAGE_UNEXPORT_STEPS
        if unexport:
            rig.attach(domain, v.id)
        call = (lambda: rig.detach(domain, v.id)) if unexport else (lambda: rig.attach(domain, v.id))
        deadline = time.monotonic() + 30
        while storage.proc.poll() is None:  # the agent's channel may need a moment after the restart
            assert time.monotonic() < deadline, f"{failpoint} was not reached"
            rpc_code(call)
        assert storage.died() == KILLED

        rig.start_storage()  # reconciles before it serves
        iqn = rig.agent_iqn()
        rows = rig.attachments(v.id)
        if failpoint == service.FP_EXPORT_AFTER_ATTACHING:
            # the catalog said ATTACHING: the export is rebuilt (the answer was lost, a repeat finds it)
            assert [a.state for a in rows] == [pb.ATTACHMENT_STATE_ATTACHING]
            assert list(rig.targets().values()) == [[iqn]]
            assert len(rig.accounts()) == 1
        else:  # rolled back (or the delete finished): no row, no target, no account
            assert rows == []
            assert rig.targets() == {}
            assert rig.accounts() == []
            assert rig.volume(v.id).state == pb.VOLUME_STATE_AVAILABLE

        # The host side converges when the caller repeats its call, as clients do on UNAVAILABLE.
        if unexport:
            _retry("detach", call)
        else:
            _retry("attach", call)
            assert rig.complete(domain, v.id) == {}
            rig.detach(domain, v.id)
        assert rig.nothing_left(domain, v.id) == {}
    finally:
        if rig.agent_proc is not None:
            rig.agent_proc.stop()
            rig.agent_proc = None
        if rig.storage_proc is None or rig.storage_proc.proc.poll() is not None:
            rig.start_storage()
        force_cleanup(rig, domain)
        rig.delete_volume(v.id)
