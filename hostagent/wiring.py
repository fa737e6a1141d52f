"""Builds a HostAgent from an AgentConfig with the real collaborators. No grpc: embedders use it too.

This is the only place that chooses implementations; everything below it is given its collaborators.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from blockwire.model import Transport
from blockwire.runtime.clock import SystemClock
from blockwire.runtime.executor import Executor
from blockwire.runtime.failpoints import Failpoints
from hostagent.api import HostAgent
from hostagent.config import AgentConfig
from hostagent.connectors.base import VolumeConnector
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.connectors.local import LocalConnector
from hostagent.events import EventBus
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import PyudevWaiter
from hostagent.hostinfo import HostFiles, build_connector, kernel_iscsi_available, nvme_tcp_available
from hostagent.journal import Journal
from hostagent.model import ConnectorKind
from hostagent.storage import StorageApi
from hostagent.tools.libiscsi import Libiscsi
from hostagent.virt.domains import LibvirtHypervisor

if TYPE_CHECKING:
    from hostagent.pathcheck import PathSupervisor

log = logging.getLogger(__name__)


def use_kernel_iscsi(config: AgentConfig, sysfs: Sysfs) -> bool:
    if config.iscsi_mode == "auto":
        return kernel_iscsi_available(sysfs)
    return config.iscsi_mode == "kernel"


def build_agent(config: AgentConfig, storage: StorageApi | None) -> tuple[HostAgent, LibvirtHypervisor]:
    """The agent and its hypervisor (close it on shutdown)."""
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)
    clock = SystemClock()
    runner = Executor()
    sysfs = Sysfs(config.sysfs_root)
    udev = PyudevWaiter()
    hypervisor = LibvirtHypervisor(config.libvirt_uri, connect_timeout=config.libvirt_connect_timeout)
    kernel = use_kernel_iscsi(config, sysfs)
    files = HostFiles(str(state), config.initiator_file, config.hostnqn_file, config.hostid_file)
    nvme = nvme_tcp_available(sysfs)
    connector = build_connector(
        sysfs, files, kernel_iscsi=kernel, multipath_allowed=config.multipath != "never", nvme_tcp=nvme
    )
    qemu_iscsi = QemuIscsiConnector(
        hypervisor, Libiscsi(runner, timeout=config.login_timeout), initiator_iqn=connector.initiator_iqn
    )
    connectors: dict[Transport, VolumeConnector] = {
        Transport.LOCAL: LocalConnector(udev, sysfs, clock, device_timeout=config.device_timeout),
        Transport.ISCSI: qemu_iscsi,
    }
    extra: tuple[VolumeConnector, ...] = ()
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
        extra = (qemu_iscsi,)  # attachments made before a mode change can still be detached
    if nvme:
        from hostagent.connectors.nvme import NvmeConnector  # noqa: PLC0415 - kernel paths only
        from hostagent.host.nvme import DevFabrics, NvmeHost  # noqa: PLC0415
        from hostagent.host.openers import ProcOpeners  # noqa: PLC0415
        from hostagent.tools.nvme import Timeouts  # noqa: PLC0415

        connectors[Transport.NVME_TCP] = NvmeConnector(
            NvmeHost(sysfs),
            DevFabrics(),
            udev,
            clock,
            openers=ProcOpeners(sysfs),
            host_nqn=connector.nvme_host_nqn,
            host_id=connector.nvme_host_id,
            timeouts=Timeouts(
                ctrl_loss_tmo=config.nvme_ctrl_loss_tmo,
                reconnect_delay=config.nvme_reconnect_delay,
                fast_io_fail_tmo=config.nvme_fast_io_fail_tmo,
            ),
            device_timeout=config.device_timeout,
        )
        log.info("NVMe/TCP through the kernel's host driver (host NQN %s)", connector.nvme_host_nqn)
    log.info("iSCSI through %s", "the kernel initiator" if kernel else "QEMU's initiator")
    agent = HostAgent(
        hypervisor=hypervisor,
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


def build_path_supervisor(config: AgentConfig, agent: HostAgent) -> PathSupervisor | None:
    """The path supervisor (hostagent.pathcheck), when the agent uses the kernel iSCSI initiator or NVMe/TCP;
    start it after `reconcile()`, stop it before the agent goes."""
    from hostagent.pathcheck import PathSupervisor  # noqa: PLC0415 - kernel paths only

    kinds = (ConnectorKind.ISCSI_KERNEL, ConnectorKind.NVME_TCP)
    if all(agent.connector_of_kind(k) is None for k in kinds):
        return None
    return PathSupervisor(agent, Sysfs(config.sysfs_root), SystemClock(), config.path_check_interval)
