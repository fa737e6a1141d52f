"""NVMe over Fabrics: the connect options, nvme-cli's argv, and pure parsers of what both answer.

How a controller is made, and why not through nvme-cli's argv. `nvme connect` (nvme-cli 2.3, the
version Debian 12 ships) does nothing but write one comma-separated options string to
/dev/nvme-fabrics and read back "instance=N,cntlid=M"; its only way to take a DH-HMAC-CHAP secret is
`--dhchap-secret <secret>` / `--dhchap-ctrl-secret <secret>` on its command line, where every local
user reads it in /proc/PID/cmdline (nvme-cli 2.3's `--config` JSON file holds secrets only for
`connect-all`, and carries the whole discovery machinery with it). So the connector writes that same
options string to the fabrics device itself (`hostagent.host.nvme.DevFabrics`): the kernel's own
interface (drivers/nvme/host/fabrics.c, `nvmf_dev_write`), the secret goes from memory to the kernel
and is never on an argv, in the environment or in a file. `fabrics_options` builds the string (Secret
values stay Secret until the write), `parse_connect_answer` reads the answer.

nvme-cli is still what an operator and the tests use: `connect_argv` / `disconnect_argv` build its
argv (the raw `nvme connect` floor of the benchmark), `parse_list_subsys` and `parse_list` read its JSON
output (tested on output recorded in the guest, tests/data/recorded/nvme_*), `parse_address` the
controller's `address` attribute that both sysfs and `list-subsys` show.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from blockwire.errors import (
    BlockwireError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from blockwire.runtime.executor import Arg, Runner
from blockwire.secret import Secret

NVME = "nvme"
DEFAULT_TRSVCID = "4420"  # the IANA NVMe/TCP port


@dataclass(frozen=True)
class Timeouts:
    """The controller's loss policy, in seconds (the kernel's `ctrl_loss_tmo`, `reconnect_delay` and
    `fast_io_fail_tmo` connect options). `ctrl_loss_tmo` -1 means reconnect forever; `fast_io_fail_tmo`
    -1 means I/O waits (queued) until the controller is lost. The agent's defaults and why:
    README "NVMe/TCP" and `hostagent.config.AgentConfig`."""

    ctrl_loss_tmo: int = 1800
    reconnect_delay: int = 2
    fast_io_fail_tmo: int = -1
    keep_alive_tmo: int = 0  # 0: the kernel's default (5 s)


def split_portal(address: str) -> tuple[str, str]:
    """ "10.0.0.1:4420" / "[fe80::1]:4420" / "10.0.0.1" -> (traddr, trsvcid)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest.lstrip(":") or DEFAULT_TRSVCID
    if address.count(":") == 1:
        host, _, port = address.partition(":")
        return host, port or DEFAULT_TRSVCID
    return address, DEFAULT_TRSVCID


def fabrics_options(
    *,
    subsystem_nqn: str,
    traddr: str,
    trsvcid: str,
    host_nqn: str,
    host_id: str,
    transport: str = "tcp",
    timeouts: Timeouts = Timeouts(),
    dhchap_secret: Secret | None = None,
    dhchap_ctrl_secret: Secret | None = None,
) -> list[tuple[str, str | Secret]]:
    """The options a connect writes to /dev/nvme-fabrics, in the order nvme-cli writes them. Values
    were validated on entry (`blockwire.validate`: no ',' or '=' can be in an NQN, address or secret)."""
    opts: list[tuple[str, str | Secret]] = [
        ("nqn", subsystem_nqn),
        ("transport", transport),
        ("traddr", traddr),
        ("trsvcid", trsvcid),
        ("hostnqn", host_nqn),
    ]
    if host_id:
        opts.append(("hostid", host_id))
    if timeouts.keep_alive_tmo > 0:
        opts.append(("keep_alive_tmo", str(timeouts.keep_alive_tmo)))
    opts.append(("ctrl_loss_tmo", str(timeouts.ctrl_loss_tmo)))
    opts.append(("reconnect_delay", str(timeouts.reconnect_delay)))
    if timeouts.fast_io_fail_tmo >= 0:
        opts.append(("fast_io_fail_tmo", str(timeouts.fast_io_fail_tmo)))
    if dhchap_secret is not None:
        opts.append(("dhchap_secret", dhchap_secret))
        if dhchap_ctrl_secret is not None:
            opts.append(("dhchap_ctrl_secret", dhchap_ctrl_secret))
    return opts


def render_options(opts: Sequence[tuple[str, str | Secret]], *, reveal: bool = False) -> str:
    """ "nqn=...,transport=tcp,..."; Secret values shown as ******** unless `reveal` (only the fabrics
    device write reveals them)."""
    return ",".join(f"{k}={v.reveal() if reveal and isinstance(v, Secret) else v}" for k, v in opts)


def parse_connect_answer(text: str) -> tuple[int, int]:
    """The fabrics device's answer to a connect, "instance=0,cntlid=1" -> (0, 1): the new controller
    is /dev/nvme<instance>."""
    values = dict(part.split("=", 1) for part in text.strip().split(",") if "=" in part)
    try:
        return int(values["instance"]), int(values.get("cntlid", "-1"))
    except (KeyError, ValueError):
        raise Unavailable(f"unexpected answer of /dev/nvme-fabrics: {text.strip()[:80]!r}") from None


def connect_error(err: int, where: str) -> BlockwireError:
    """The status of a connect the kernel refused with errno `err` (the fabrics write's error).
    EALREADY (a live controller with the same subsystem, address and host NQN) is not an error for the
    connector, which looks for that controller first; it is here for callers that did not."""
    name = errno.errorcode.get(err, str(err))
    # What the kernel answers (6.12, recorded in tests/data/recorded/nvme_dhchap_*): EKEYREJECTED for a
    # wrong host secret (the target's failure1) and for a controller that did not prove the controller
    # secret (the host refuses it); ENOKEY when the subsystem demands authentication and no secret was
    # given. Neither goes away by retrying.
    if err in (errno.EKEYREJECTED, errno.EKEYEXPIRED, errno.EACCES, errno.EPERM):
        return PermissionDenied(
            f"{where}: DH-HMAC-CHAP authentication failed ({name}): the subsystem refused this host's "
            "secret, or the controller did not prove the controller secret; check the secrets storage "
            "announced for this host NQN"
        )
    if err == errno.ENOKEY:
        return PermissionDenied(
            f"{where}: the subsystem demands DH-HMAC-CHAP authentication and the connection info has no "
            f"secret for it ({name}); storage must announce dhchap_host_secret for this host NQN"
        )
    if err in (errno.EINVAL,):
        return InvalidArgument("connection_info.nvmeof", f"{where}: the kernel refused the options ({name})")
    if err in (errno.ENOENT, errno.ENODEV):
        return NotFound(f"{where}: no such subsystem for this host ({name})")
    if err == errno.EALREADY:
        return Unavailable(f"{where}: already connected ({name})")
    return Unavailable(f"{where}: connect failed ({name}: {os.strerror(err)}); retry")


def connect_argv(
    *,
    subsystem_nqn: str,
    traddr: str,
    trsvcid: str,
    host_nqn: str,
    host_id: str,
    transport: str = "tcp",
    timeouts: Timeouts = Timeouts(),
    dhchap_secret: Secret | None = None,
    dhchap_ctrl_secret: Secret | None = None,
) -> list[Arg]:
    """`nvme connect` (nvme-cli 2.3). A DH-HMAC-CHAP secret given here IS on nvme's argv while it runs
    (the executor shows it as ********, /proc does not): the agent never uses this path for secrets."""
    argv: list[Arg] = [
        NVME, "connect", "-t", transport, "-a", traddr, "-s", trsvcid, "-n", subsystem_nqn,
        "--hostnqn", host_nqn,
    ]  # fmt: skip
    if host_id:
        argv += ["--hostid", host_id]
    argv += [
        "--ctrl-loss-tmo",
        str(timeouts.ctrl_loss_tmo),
        "--reconnect-delay",
        str(timeouts.reconnect_delay),
    ]
    if timeouts.fast_io_fail_tmo >= 0:
        argv += ["--fast_io_fail_tmo", str(timeouts.fast_io_fail_tmo)]
    if dhchap_secret is not None:
        argv += ["--dhchap-secret", dhchap_secret]
        if dhchap_ctrl_secret is not None:
            argv += ["--dhchap-ctrl-secret", dhchap_ctrl_secret]
    return argv


def disconnect_argv(controller: str = "", subsystem_nqn: str = "") -> list[Arg]:
    """`nvme disconnect -d nvme3` (one controller) or `-n NQN` (every controller of the subsystem)."""
    if controller:
        return [NVME, "disconnect", "-d", controller]
    if subsystem_nqn:
        return [NVME, "disconnect", "-n", subsystem_nqn]
    raise InvalidArgument("controller", "name a controller or a subsystem NQN")


def parse_address(text: str) -> dict[str, str]:
    """A controller's `address` ("traddr=127.0.0.1,trsvcid=4420,src_addr=127.0.0.1") -> its fields."""
    return dict(part.strip().split("=", 1) for part in text.strip().split(",") if "=" in part)


@dataclass(frozen=True)
class PathInfo:
    """One controller (path) of a subsystem as `nvme list-subsys -o json` shows it."""

    name: str  # "nvme0"
    transport: str
    address: str
    state: str
    ana_state: str = ""


@dataclass(frozen=True)
class SubsystemInfo:
    name: str  # "nvme-subsys0"
    nqn: str
    host_nqn: str
    paths: tuple[PathInfo, ...]


def parse_list_subsys(text: str) -> list[SubsystemInfo]:
    """`nvme list-subsys -o json` (nvme-cli 2.x: a list of hosts, each with its Subsystems and their
    Paths; 1.x: one object with "Subsystems") -> subsystems."""
    if not text.strip():
        return []
    data = json.loads(text)
    hosts = data if isinstance(data, list) else [data]
    out: list[SubsystemInfo] = []
    for host in hosts:
        host_nqn = host.get("HostNQN", "")
        for s in host.get("Subsystems", []):
            paths = tuple(
                PathInfo(
                    name=p.get("Name", ""),
                    transport=p.get("Transport", ""),
                    address=p.get("Address", ""),
                    state=p.get("State", ""),
                    ana_state=p.get("ANAState", ""),
                )
                for p in s.get("Paths", [])
            )
            out.append(SubsystemInfo(s.get("Name", ""), s.get("NQN", ""), host_nqn, paths))
    return out


@dataclass(frozen=True)
class DeviceInfo:
    """One namespace of `nvme list -o json`."""

    path: str  # "/dev/nvme0n1"
    nsid: int
    size_bytes: int
    serial: str = ""
    model: str = ""


def parse_list(text: str) -> list[DeviceInfo]:
    """`nvme list -o json` ({"Devices": [...]}) -> namespaces."""
    if not text.strip():
        return []
    data = json.loads(text)
    out = []
    for d in data.get("Devices", []):
        out.append(
            DeviceInfo(
                path=d.get("DevicePath", ""),
                nsid=int(d.get("NameSpace", 0) or 0),
                size_bytes=int(d.get("PhysicalSize", 0) or 0),
                serial=str(d.get("SerialNumber", "")).strip(),
                model=str(d.get("ModelNumber", "")).strip(),
            )
        )
    return out


class NvmeCli:
    """nvme-cli through the injected Runner: what the agent only reads (diagnostics, tests, bench)."""

    def __init__(self, runner: Runner, *, timeout: float = 30.0) -> None:
        self.runner = runner
        self.timeout = timeout

    def list_subsys(self) -> list[SubsystemInfo]:
        return parse_list_subsys(
            self.runner.run([NVME, "list-subsys", "-o", "json"], timeout=self.timeout).stdout
        )

    def list(self) -> list[DeviceInfo]:
        return parse_list(self.runner.run([NVME, "list", "-o", "json"], timeout=self.timeout).stdout)
