"""The RBD image an attachment announces, as the Ceph cluster really has it: read through librados/librbd.

The one module of the agent that imports the Ceph bindings (Debian's python3-rados/python3-rbd), lazily:
a host without them still imports hostagent, and only an RBD attach says what is missing. The connectors
see the `CephProbe` Protocol; the unit tier gives them a fake.

Every call is bounded: librados's own timeouts (client_mount_timeout, rados_mon_op_timeout,
rados_osd_op_timeout) are set to the caller's bound, and the call runs on a worker thread that is given up
on (UNAVAILABLE) when it has not answered shortly after that bound, so a cluster that is down or hangs
never holds an attach longer than the bound. The key goes to librados in memory (its `key` option),
never to a file, argv or log.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from blockwire.errors import (
    BlockwireError,
    FailedPrecondition,
    IdentityMismatch,
    PermissionDenied,
    Unavailable,
)
from blockwire.secret import Secret

log = logging.getLogger(__name__)

# A worker that has not answered this long after librados's own timeouts is given up on.
_GRACE = 2.0


@dataclass(frozen=True)
class RbdImage:
    """An image as the cluster has it."""

    pool: str
    name: str
    image_id: str
    size_bytes: int
    cluster_fsid: str


@dataclass(frozen=True)
class CephAccess:
    """How to reach one cluster as one cephx user (from the attachment's connection info)."""

    monitors: tuple[str, ...]
    user: str = ""  # without "client."; "" is librados's default ("admin")
    key: Secret | None = None

    def __repr__(self) -> str:
        return f"CephAccess(monitors={self.monitors!r}, user={self.user!r}, key=********)"


class CephProbe(Protocol):
    """Reads an image's identity and size from the cluster (RadosProbe; the unit tier's fake)."""

    def image(self, access: CephAccess, pool: str, name: str, timeout: float) -> RbdImage:
        """The image `pool/name`. IdentityMismatch when there is no such image or pool (what was announced
        is not there); PermissionDenied when the cluster refuses the user or key; Unavailable when the
        cluster does not answer within `timeout` seconds (never longer than a little more)."""
        ...


MSGR2_PORT = 3300  # the IANA port of Ceph's msgr2; monitors on any other port are taken as msgr v1


def mon_host(monitors: tuple[str, ...]) -> str:
    """librados's mon_host from "address:port" monitors: each named with its messenger protocol ("v1:"
    unless on port 3300), as QEMU/libvirt and the kernel take the same "address:port" for v1."""
    out = []
    for m in monitors:
        port = m.rpartition(":")[2]
        out.append(m if m.startswith(("v1:", "v2:")) else f"{'v2' if port == str(MSGR2_PORT) else 'v1'}:{m}")
    return ",".join(out)


@dataclass
class _Connection:
    """A connected librados handle, shared by the calls of one (monitors, user, key)."""

    cluster: Any
    key: tuple[tuple[str, ...], str, str]
    users: int = 0
    dead: bool = False
    last_used: float = 0.0


class RadosProbe:
    """CephProbe through the python3-rados/python3-rbd bindings.

    A connection (a cephx session) costs 20-80 ms; it is kept for `idle_seconds` after its last use and
    shared by the calls of the same monitors, user and key (a call with another key never uses it). A
    kept connection first asks the monitor for its version (bounded by rados_mon_op_timeout): a
    monitor that went down is UNAVAILABLE as for a new connection, and the connection is dropped, as
    after any error. Nothing of a dropped connection is closed while a call still uses it."""

    def __init__(self, *, idle_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._connections: dict[tuple[tuple[str, ...], str, str], _Connection] = {}

    def image(self, access: CephAccess, pool: str, name: str, timeout: float) -> RbdImage:
        where = f"the Ceph cluster at {','.join(access.monitors)}"
        outcome: list[RbdImage | BlockwireError] = []

        def work() -> None:
            try:
                outcome.append(self._image(access, pool, name, timeout, where))
            except BlockwireError as exc:
                outcome.append(exc)
            except Exception as exc:  # noqa: BLE001 - reported to the caller as what it is
                outcome.append(Unavailable(f"{where}: {type(exc).__name__}: {exc}"))

        worker = threading.Thread(target=work, name=f"ceph-probe {pool}/{name}", daemon=True)
        worker.start()
        worker.join(timeout * 2 + _GRACE)  # mount, then the ioctx/image ops, each bounded by librados
        if not outcome:
            raise Unavailable(
                f"{where} did not answer within {timeout:g}s (monitors down or unreachable); "
                "nothing was attached, retry when the cluster is back"
            )
        result = outcome[0]
        if isinstance(result, BlockwireError):
            raise result
        return result

    def close(self) -> None:
        """Drops every kept connection (those in use close when their call ends)."""
        with self._lock:
            idle = [c for c in self._connections.values() if c.users == 0]
            for c in self._connections.values():
                c.dead = True
            self._connections.clear()
        for c in idle:
            c.cluster.shutdown()

    @staticmethod
    def _modules() -> tuple[Any, Any]:
        try:
            import rados  # noqa: PLC0415 - lazy: hosts without Ceph import hostagent
            import rbd  # noqa: PLC0415
        except ImportError as exc:
            raise FailedPrecondition(
                f"the Ceph bindings are not importable here ({exc}); install python3-rados and python3-rbd "
                "(and make them importable in the agent's Python, see README) to attach RBD volumes"
            ) from None
        return rados, rbd

    def _kept(self, key: tuple[tuple[str, ...], str, str]) -> _Connection | None:
        stale = None
        with self._lock:
            c = self._connections.get(key)
            if c is not None and self.clock() - c.last_used > self.idle_seconds:
                del self._connections[key]
                c.dead = True
                stale, c = (c if c.users == 0 else None), None
            if c is not None:
                c.users += 1
        if stale is not None:
            stale.cluster.shutdown()
        return c

    def _release(self, c: _Connection, ok: bool) -> None:
        with self._lock:
            c.users -= 1
            c.last_used = self.clock()
            if not ok and not c.dead:
                c.dead = True
                if self._connections.get(c.key) is c:
                    del self._connections[c.key]
            close = c.dead and c.users == 0
        if close:
            c.cluster.shutdown()

    def _connect(self, access: CephAccess, timeout: float, where: str) -> _Connection:
        rados, _ = self._modules()
        secret = access.key.reveal() if access.key is not None else ""
        key = (access.monitors, access.user, hashlib.sha256(secret.encode()).hexdigest())
        kept = self._kept(key)
        if kept is not None:
            try:
                ret, _, _ = kept.cluster.mon_command(
                    json.dumps({"prefix": "version"}), b"", timeout=int(timeout + 0.999)
                )
            except rados.Error as exc:
                self._release(kept, ok=False)
                raise _connect_error(exc, access, where) from None
            if ret < 0:  # mon_command reports errors in its return code, e.g. -ETIMEDOUT
                self._release(kept, ok=False)
                raise _connect_error(OSError(-ret, "asking the monitor its version"), access, where)
            return kept
        seconds = str(max(1, int(timeout + 0.999)))
        conf = {
            "mon_host": mon_host(access.monitors),
            "client_mount_timeout": seconds,
            "rados_mon_op_timeout": seconds,
            "rados_osd_op_timeout": seconds,
            "admin_socket": "",
            "log_file": "",
            "log_to_stderr": "false",
            "err_to_stderr": "false",
        }
        if secret:
            conf["key"] = secret
        cluster = rados.Rados(rados_id=access.user or "admin", conffile=None, conf=conf)
        try:
            cluster.connect(timeout=int(seconds))
        except rados.Error as exc:
            cluster.shutdown()
            raise _connect_error(exc, access, where) from None
        c = _Connection(cluster, key, users=1, last_used=self.clock())
        with self._lock:
            if key in self._connections:
                c.dead = True  # another call kept one meanwhile: this one closes after this call
            else:
                self._connections[key] = c
        return c

    def _image(self, access: CephAccess, pool: str, name: str, timeout: float, where: str) -> RbdImage:
        rados, rbd = self._modules()
        c = self._connect(access, timeout, where)
        ok = False
        try:
            found = self._read(c.cluster, rados, rbd, pool, name, where=where)
            ok = True
            return found
        except IdentityMismatch:
            ok = True  # the cluster answered: the connection is fine
            raise
        finally:
            self._release(c, ok)

    @staticmethod
    def _read(cluster: Any, rados: Any, rbd: Any, pool: str, name: str, *, where: str) -> RbdImage:
        fsid = str(cluster.get_fsid())
        try:
            ioctx = cluster.open_ioctx(pool)
        except rados.ObjectNotFound:
            raise IdentityMismatch(
                f"pool {pool!r} does not exist in {where}: the volume announced is not there; "
                "nothing was attached"
            ) from None
        except rados.Error as exc:
            raise _op_error(exc, f"opening pool {pool!r} in {where}") from None
        try:
            try:
                image = rbd.Image(ioctx, name, read_only=True)
            except rbd.ImageNotFound:
                raise IdentityMismatch(
                    f"image {pool}/{name} does not exist in {where}: the volume announced is not there "
                    "(deleted, or renamed); nothing was attached"
                ) from None
            except rbd.Error as exc:
                raise _op_error(exc, f"opening image {pool}/{name} in {where}") from None
            try:
                return RbdImage(pool, name, str(image.id()), int(image.size()), fsid)
            finally:
                image.close()
        finally:
            ioctx.close()


def _errno(exc: BaseException) -> int:
    return int(getattr(exc, "errno", 0) or 0)


def _connect_error(exc: BaseException, access: CephAccess, where: str) -> BlockwireError:
    code = abs(_errno(exc))
    name = type(exc).__name__
    if code in (errno.EACCES, errno.EPERM) or "Permission" in name:
        return PermissionDenied(
            f"{where} refused cephx user {access.user or 'admin'!r}: wrong key, or the user does not exist; "
            "check the key storage announced"
        )
    if code == errno.ETIMEDOUT or "TimedOut" in name:
        return Unavailable(
            f"{where} did not answer in time (monitors down or unreachable); nothing was attached, retry "
            "when the cluster is back"
        )
    return Unavailable(f"connecting to {where}: {name} (errno {code})")


def _op_error(exc: BaseException, what: str) -> BlockwireError:
    code = abs(_errno(exc))
    name = type(exc).__name__
    if code in (errno.EACCES, errno.EPERM) or "Permission" in name:
        return PermissionDenied(f"{what}: the cephx user's caps do not allow it")
    return Unavailable(f"{what}: {name} (errno {code})")
