"""Builds a HostAgent from an AgentConfig with the real collaborators. No grpc: embedders use it too.

This is the only place that chooses implementations; everything below it is given its collaborators.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from blockwire.model import Connector, Transport
from blockwire.observability import NO_STEPS, StepObserver, TimedRunner
from blockwire.runtime.clock import Clock, SystemClock
from blockwire.runtime.executor import Executor, Runner
from blockwire.runtime.failpoints import Failpoints
from hostagent.api import HostAgent
from hostagent.config import AgentConfig
from hostagent.connectors.base import VolumeConnector
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.connectors.local import LocalConnector
from hostagent.connectors.rbd import QemuRbdConnector
from hostagent.encryption import VolumeKeys
from hostagent.events import EventBus
from hostagent.host.ceph import CephProbe, RadosProbe
from hostagent.host.libiscsi import InprocLibiscsi, lun_reader
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import PyudevWaiter, UdevWaiter
from hostagent.hostinfo import (
    HostFiles,
    build_connector,
    kernel_iscsi_available,
    nvme_tcp_available,
    rbd_available,
)
from hostagent.journal import Journal
from hostagent.model import ConnectorKind
from hostagent.storage import StorageApi
from hostagent.timing import TimedCephProbe, TimedHypervisor, TimedLunReader, TimedStorage, TimedUdev
from hostagent.tools.libiscsi import Libiscsi, LunReader
from hostagent.virt.domains import LibvirtHypervisor

if TYPE_CHECKING:
    from hostagent.pathcheck import PathSupervisor

log = logging.getLogger(__name__)


def use_kernel_iscsi(config: AgentConfig, sysfs: Sysfs) -> bool:
    if config.iscsi_mode == "auto":
        return kernel_iscsi_available(sysfs)
    return config.iscsi_mode == "kernel"


def build_lun_reader(
    config: AgentConfig, runner: Runner, clock: SystemClock, steps: StepObserver
) -> LunReader:
    """libiscsi in process when it loads (no process per identity read), its tools otherwise."""
    reader: LunReader = lun_reader(
        Libiscsi(runner, timeout=config.login_timeout), clock, timeout=config.login_timeout
    )
    if isinstance(reader, InprocLibiscsi) and steps is not NO_STEPS:
        reader = TimedLunReader(reader, steps, clock)  # the tools are timed as commands by the runner
    return reader


def build_agent(
    config: AgentConfig, storage: StorageApi | None, steps: StepObserver = NO_STEPS
) -> tuple[HostAgent, LibvirtHypervisor]:
    """The agent and its hypervisor (close it on shutdown). With `steps`, the runner, udev, libvirt and
    storage report the duration of each step to it (`hostagent.timing`)."""
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)
    clock = SystemClock()
    runner: Runner = Executor()
    sysfs = Sysfs(config.sysfs_root)
    udev: UdevWaiter = PyudevWaiter()
    ceph: CephProbe = RadosProbe()
    if steps is NO_STEPS:
        hypervisor = LibvirtHypervisor(config.libvirt_uri, connect_timeout=config.libvirt_connect_timeout)
    else:
        runner, udev = TimedRunner(runner, steps, clock), TimedUdev(udev, steps, clock)
        ceph = TimedCephProbe(ceph, steps, clock)
        storage = TimedStorage(storage, steps, clock) if storage is not None else None
        hypervisor = TimedHypervisor(
            config.libvirt_uri, connect_timeout=config.libvirt_connect_timeout, steps=steps, clock=clock
        )
    kernel = use_kernel_iscsi(config, sysfs)
    files = HostFiles(str(state), config.initiator_file, config.hostnqn_file, config.hostid_file)
    rbd = rbd_available(sysfs, config.rbd_mode)
    nvme = nvme_tcp_available(sysfs)
    connector = build_connector(
        sysfs,
        files,
        kernel_iscsi=kernel,
        multipath_allowed=config.multipath != "never",
        rbd=rbd,
        nvme_tcp=nvme,
    )
    if config.host_name:
        connector = replace(connector, host=config.host_name)
    reader = build_lun_reader(config, runner, clock, steps)
    qemu_iscsi = QemuIscsiConnector(hypervisor, reader, initiator_iqn=connector.initiator_iqn)
    connectors: dict[Transport, VolumeConnector] = {
        Transport.LOCAL: LocalConnector(udev, sysfs, clock, device_timeout=config.device_timeout),
        Transport.ISCSI: qemu_iscsi,
    }
    qemu_rbd = QemuRbdConnector(hypervisor, ceph, timeout=config.rbd_timeout)
    connectors[Transport.RBD] = qemu_rbd
    extra: tuple[VolumeConnector, ...] = ()
    if config.rbd_mode == "kernel":
        from hostagent.connectors.rbd import KernelRbdConnector  # noqa: PLC0415 - kernel paths only
        from hostagent.host.openers import ProcOpeners  # noqa: PLC0415

        connectors[Transport.RBD] = KernelRbdConnector(
            runner,
            sysfs,
            udev,
            clock,
            openers=ProcOpeners(sysfs),
            keyfile_dir=str(state / "rbd-keys"),
            device_timeout=config.device_timeout,
            timeout=config.rbd_timeout,
        )
        extra = (qemu_rbd,)  # attachments made before a mode change can still be detached
    log.info(
        "RBD through %s%s",
        "the kernel's rbd" if config.rbd_mode == "kernel" else "QEMU's librbd",
        "" if rbd else " (not available on this host: RBD is not announced)",
    )
    if kernel:
        from hostagent.connectors.fc import FcConnector  # noqa: PLC0415 - kernel paths only
        from hostagent.connectors.iscsi import IscsiConnector  # noqa: PLC0415
        from hostagent.host.openers import ProcOpeners  # noqa: PLC0415
        from hostagent.tools.iscsiadm import Iscsiadm  # noqa: PLC0415
        from hostagent.tools.multipath import Multipath  # noqa: PLC0415

        multipath = Multipath(runner)
        openers = ProcOpeners(sysfs)
        connectors[Transport.ISCSI] = IscsiConnector(
            Iscsiadm(runner, clock, timeout=config.login_timeout),
            sysfs,
            udev,
            multipath,
            clock,
            initiator_iqn=connector.initiator_iqn,
            openers=openers,
            device_timeout=config.device_timeout,
            use_multipath=connector.multipath,
            map_single_path=config.multipath == "always",
        )
        connectors[Transport.FC] = FcConnector(
            sysfs,
            udev,
            multipath,
            clock,
            openers=openers,
            device_timeout=config.device_timeout,
            use_multipath=connector.multipath,
            map_single_path=config.multipath == "always",
        )
        extra = (*extra, qemu_iscsi)  # attachments made before a mode change can still be detached
    if nvme:
        connectors[Transport.NVME_TCP] = _nvme_connector(config, connector, sysfs, udev, clock, runner=runner)
    log.info("iSCSI through %s", "the kernel initiator" if kernel else "QEMU's initiator")
    agent = HostAgent(
        hypervisor=hypervisor,
        volume_keys=VolumeKeys(hypervisor),
        connectors=connectors,
        journal=Journal(state),
        connector=connector,
        clock=clock,
        storage=storage,
        events=EventBus(),
        detach_timeout=config.detach_timeout,
        extra_connectors=extra,
        failpoints=Failpoints.from_environment(os.environ),
    )
    return agent, hypervisor


def _nvme_connector(
    config: AgentConfig, connector: Connector, sysfs: Sysfs, udev: UdevWaiter, clock: Clock, *, runner: Runner
) -> VolumeConnector:
    """The kernel's NVMe/TCP host driver, with the controller loss policy of the config; dm-multipath
    (multipathd) for when native NVMe multipath is off, where the host announces multipath."""
    from hostagent.connectors.dm_multipath import MultipathMaps  # noqa: PLC0415 - kernel paths only
    from hostagent.connectors.nvme import NvmeConnector  # noqa: PLC0415
    from hostagent.host.nvme import DevFabrics, NvmeHost  # noqa: PLC0415
    from hostagent.host.openers import ProcOpeners  # noqa: PLC0415
    from hostagent.tools.multipath import Multipath  # noqa: PLC0415
    from hostagent.tools.nvme import Timeouts  # noqa: PLC0415

    openers = ProcOpeners(sysfs)
    maps = MultipathMaps(
        sysfs,
        udev,
        Multipath(runner),
        clock,
        openers=openers,
        device_timeout=config.device_timeout,
        use_multipath=connector.multipath,
        map_single_path=config.multipath == "always",
    )
    nvme = NvmeConnector(
        NvmeHost(sysfs),
        DevFabrics(),
        udev,
        clock,
        openers=openers,
        host_nqn=connector.nvme_host_nqn,
        host_id=connector.nvme_host_id,
        timeouts=Timeouts(
            ctrl_loss_tmo=config.nvme_ctrl_loss_tmo,
            reconnect_delay=config.nvme_reconnect_delay,
            fast_io_fail_tmo=config.nvme_fast_io_fail_tmo,
        ),
        device_timeout=config.device_timeout,
        maps=maps,
    )
    log.info("NVMe/TCP through the kernel's host driver (host NQN %s)", connector.nvme_host_nqn)
    return nvme


def build_path_supervisor(config: AgentConfig, agent: HostAgent) -> PathSupervisor | None:
    """The path supervisor (hostagent.pathcheck), when the agent uses the kernel iSCSI initiator or NVMe/TCP;
    start it after `reconcile()`, stop it before the agent goes."""
    from hostagent.pathcheck import PathSupervisor  # noqa: PLC0415 - kernel paths only

    kinds = (ConnectorKind.ISCSI_KERNEL, ConnectorKind.NVME_TCP)
    if all(agent.connector_of_kind(k) is None for k in kinds):
        return None
    return PathSupervisor(agent, Sysfs(config.sysfs_root), SystemClock(), config.path_check_interval)
