"""The `rbd` backend: volumes as Ceph RBD images, which hosts open directly (no target to export).

Names in the pool (the backend owns every name with these prefixes):

* a volume: image ``volume-<volume id>``;
* a snapshot: RBD snapshot ``snapshot-<snapshot id>`` of its volume's image, found again through the
  pool metadata key ``blockwire.snapshot.<snapshot id>`` (value: the volume id), written before the
  snapshot is taken. Snapshots live inside their image, so a volume with snapshots cannot be deleted
  (``snapshots_depend_on_volume``); a snapshot is protected when the first clone is made of it;
* a clone of a volume: a hidden, protected snapshot ``clone-<new volume id>`` of the source, and a
  copy-on-write clone of it; deleting the clone removes the hidden snapshot, deleting the source first
  flattens the clone (a full copy of the blocks it still shares) and then removes the snapshot. A
  snapshot with clones is deleted the same way: its clones are flattened first;
* a golden image: ``image-<key>`` with the protected snapshot ``base``, imported once per image file
  (key: sha256 of its real path, mtime, size and format) and cloned for every volume created from it.
  The import goes into a temporary name and is renamed when complete, so a base image under its
  final name is always whole. Base images stay as a cache: remove them with `rbd snap unprotect` /
  `rbd snap purge` / `rbd rm` once no clone uses them.

Every create completes or removes what it made. The backend keeps one librados connection (made on
first use, retired and made again after the monitors did not answer or refused the key); every call
starts with a monitor round trip (~1 ms) bounded by `connect_timeout`, so a down monitor is UNAVAILABLE
(naming the monitors) within that bound, never a hang, even where librados could have served the call
from its cached maps; `op_timeout` bounds each OSD operation.
Errors: a key the cluster refuses (or caps that do not allow a call) is PERMISSION_DENIED; out of space
(ENOSPC, a pool quota) is RESOURCE_EXHAUSTED.

The cluster is reached through the librados/librbd Python bindings (Debian's python3-rados and
python3-rbd), behind the small `RbdSession` seam: this is the only module that imports them, and unit
tests run the backend against a fake session.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

try:  # Debian's python3-rados / python3-rbd (scripts/setup links them into the venv)
    import rados
    import rbd
except ImportError:  # pragma: no cover - the daemon then refuses an rbd backend (Librbd)
    rados = rbd = None

from blockwire.errors import (
    BlockwireError,
    FailedPrecondition,
    Internal,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from blockwire.model import RbdConnection, Transport
from blockwire.observability import StepObserver, timed
from blockwire.runtime.clock import Clock
from blockwire.runtime.executor import Runner
from blockwire.secret import Secret
from storagesvc.backends.base import ImageInfo, ProgressFn, Space
from storagesvc.backends.file import inspect_image
from storagesvc.model import MIB, ImageSource

log = logging.getLogger(__name__)

VOLUME_PREFIX = "volume-"
SNAPSHOT_PREFIX = "snapshot-"
CLONE_PREFIX = "clone-"
IMAGE_PREFIX = "image-"
BASE_SNAP = "base"
SNAPSHOT_META = "blockwire.snapshot."
CHUNK = 4 * MIB
UNKNOWN_CAPACITY_MAX = (
    1 << 50
)  # what max_volume_bytes allows when neither the cluster nor the config bounds it

HOST_USERS = ("backend", "per-host")


# -- the seam: what the backend needs of a cluster, in its own terms


class ClusterError(Exception):
    """A cluster call failed. `kind`: not-found, exists, busy, permission, unreachable, no-space,
    has-snapshots, invalid, other."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Parent:
    image: str
    snap: str


class RbdSession(Protocol):
    """One connection to the cluster, on the backend's pool. Image names are in that pool."""

    def fsid(self) -> str: ...

    def pool_space(self) -> Space | None:
        """The pool's (stored + available, available) bytes; None when the cluster does not say
        (no ceph-mgr runs)."""
        ...

    def exists(self, image: str) -> bool: ...

    def image_id(self, image: str) -> str: ...

    def size(self, image: str) -> int: ...

    def create(self, image: str, size: int) -> None: ...

    def remove(self, image: str) -> None: ...

    def rename(self, src: str, dst: str) -> None: ...

    def resize(self, image: str, size: int) -> None: ...

    def snaps(self, image: str) -> list[str]: ...

    def snap_create(self, image: str, snap: str) -> None: ...

    def snap_protect(self, image: str, snap: str) -> None:
        """Idempotent."""
        ...

    def snap_remove(self, image: str, snap: str) -> None:
        """Unprotects first when protected."""
        ...

    def children(self, image: str, snap: str) -> list[str]: ...

    def parent(self, image: str) -> Parent | None: ...

    def clone(self, parent: str, snap: str, child: str) -> None: ...

    def flatten(self, image: str) -> None: ...

    def write(self, image: str, chunks: Iterable[tuple[int, bytes]]) -> None:
        """Writes each (offset, data) of `chunks` into the image, opened once."""
        ...

    def meta_get(self, key: str) -> str | None:
        """Pool metadata."""
        ...

    def meta_set(self, key: str, value: str) -> None: ...

    def meta_remove(self, key: str) -> None: ...

    def host_key(self, user: str, caps: tuple[str, ...]) -> str:
        """`auth get-or-create client.USER CAPS`: the user's key (needs mon caps for it)."""
        ...


class RbdCluster(Protocol):
    def session(self) -> contextlib.AbstractContextManager[RbdSession]: ...


class TimedRbdCluster:
    """An `RbdCluster` whose sessions report their duration as the step `rbd` (the daemon's
    `StepObserver`): the backend's time on the cluster, i.e. the shared connection (made on first use),
    the monitor check, the pool and whatever the session's body asks (an attachment's image id and the
    fsid; a create, a snapshot ...)."""

    def __init__(self, cluster: RbdCluster, steps: StepObserver, clock: Clock) -> None:
        self.cluster, self.steps, self.clock = cluster, steps, clock

    @contextlib.contextmanager
    def session(self) -> Iterator[RbdSession]:
        with timed(self.steps, self.clock, "rbd"), self.cluster.session() as s:
            yield s


# -- settings


@dataclass(frozen=True)
class RbdSettings:
    pool: str
    monitors: tuple[str, ...]  # "host:port" (msgr v1), announced to hosts
    user: str = "admin"  # without "client."
    key: Secret | None = None  # from key_file or keyring
    conf: str = ""  # a ceph.conf read before the settings below
    data_pool: str = ""
    connect_timeout: float = 10.0
    op_timeout: float = 30.0
    host_users: str = "backend"  # "backend": hosts get this user; "per-host": client.<prefix>.<host>
    host_user_prefix: str = "blockwire"
    host_user: str = ""  # with host_users="backend": the user handed to hosts (default: `user`)
    host_key: Secret | None = None
    capacity_bytes: int = 0  # 0: from the cluster's pool statistics (needs a ceph-mgr)
    oversubscription_ratio: float = 1.0
    scratch_dir: str = ""  # where a qcow2 image is converted to raw before its import ("": the temp dir)


def read_key(path: str, user: str) -> Secret:
    """The cephx key of `client.USER` from a keyring file (``[client.USER]`` / ``key = ...``) or from a
    file holding just the key."""
    text = Path(path).read_text()
    if "[" not in text:
        key = text.strip()
        if key:
            return Secret(key)
        raise ValueError(f"{path} holds no key")
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        k, sep, v = line.partition("=")
        if sep and k.strip() == "key" and section == f"client.{user}":
            return Secret(v.strip())
    raise ValueError(f"{path} has no key for client.{user}")


_ADDR = re.compile(r"(?:(v1|v2):)?([0-9A-Za-z.\-]+|\[[0-9a-fA-F:]+\]):(\d+)")


def monitor_addresses(mon_host: str) -> tuple[str, ...]:
    """ "host:port" of each monitor in a `mon_host` value ("[v2:IP:P2,v1:IP:P1],IP2:P" or "IP,IP2"):
    the msgr v1 address where a monitor has both, the default port 6789 where none is given."""
    out: list[str] = []
    for vec in re.findall(r"\[[^\]]*\]|[^,\s\[\]]+", mon_host):
        addrs = [m for m in (_ADDR.fullmatch(a.strip()) for a in vec.strip("[]").split(",")) if m]
        if not addrs:
            host = vec.strip()
            if host and ":" not in host:
                out.append(f"{host}:6789")
            continue
        v1 = [m for m in addrs if m.group(1) in (None, "v1")]
        chosen = (v1 or addrs)[0]
        out.append(f"{chosen.group(2)}:{chosen.group(3)}")
    return tuple(out)


def mon_host(monitors: tuple[str, ...]) -> str:
    """`mon_host` for librados from "host:port" monitors: each one's messenger named (msgr v2 on 3300,
    v1 on any other port). A bare address on a non-default port is taken for v2, and a v1 monitor
    then never answers (a wrong key would look like a down cluster)."""
    return ",".join(f"v2:{m}" if m.endswith(":3300") else f"v1:{m}" for m in monitors)


def monitors_from_conf(path: str) -> tuple[str, ...]:
    """The monitors a ceph.conf names (`mon_host` / `mon host` in [global])."""
    section = "global"
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        k, sep, v = line.partition("=")
        if sep and section == "global" and k.strip().replace(" ", "_") == "mon_host":
            return monitor_addresses(v.strip())
    return ()


# -- the real cluster: librados / librbd


class Librbd:
    """`RbdCluster` through the librados/librbd Python bindings: one connection shared by the sessions
    (librados is thread-safe), a pool context per session."""

    def __init__(self, settings: RbdSettings) -> None:
        self.settings = settings
        if rados is None or rbd is None:
            raise Unavailable(
                "the rbd backend needs the librados/librbd Python bindings (Debian: python3-rados "
                "python3-rbd, linked into the venv by scripts/setup)"
            )
        self._rados: Any = rados
        self._rbd: Any = rbd
        self._lock = threading.Lock()
        self._current: _Connection | None = None

    def _conf(self) -> dict[str, str]:
        s = self.settings
        conf = {
            "client_mount_timeout": f"{s.connect_timeout:g}",
            "rados_mon_op_timeout": f"{s.connect_timeout:g}",
            "rados_osd_op_timeout": f"{s.op_timeout:g}",
            "log_to_stderr": "false",
            "err_to_stderr": "false",
            "log_file": "",
            "admin_socket": "",
            "keyring": "",
        }
        if s.monitors:
            conf["mon_host"] = mon_host(s.monitors)
        if s.key is not None:
            conf["key"] = s.key.reveal()
        return conf

    def _connect(self) -> Any:
        s = self.settings
        kwargs: dict[str, Any] = {"name": f"client.{s.user}", "conf": self._conf()}
        if s.conf:
            kwargs["conffile"] = s.conf
        with _translated():
            cluster = self._rados.Rados(**kwargs)
            try:
                cluster.connect(timeout=int(max(1, s.connect_timeout)))
            except BaseException:
                cluster.shutdown()
                raise
        return cluster

    def _acquire(self) -> _Connection:
        with self._lock:
            if self._current is None:
                self._current = _Connection(self._connect())
            self._current.users += 1
            return self._current

    def _release(self, conn: _Connection, *, retire: bool) -> None:
        with self._lock:
            conn.users -= 1
            if retire and self._current is conn:
                self._current = None
                conn.retired = True
            last = conn.retired and conn.users == 0
        if last:
            conn.cluster.shutdown()

    def _monitors_answer(self, cluster: Any) -> None:
        """One monitor round trip (`mon stat`, ~1 ms): librados would serve image calls from its cached
        maps with every monitor down; the service says UNAVAILABLE instead (no quorum: no snapshot, no
        map change, and hosts could not connect)."""
        t = self.settings.connect_timeout
        ret, _, err = cluster.mon_command(
            json.dumps({"prefix": "mon stat", "format": "json"}), b"", timeout=t
        )
        if ret in (-errno.ETIMEDOUT, -errno.ENOTCONN, -errno.EINTR):
            raise ClusterError("unreachable", f"the monitors did not answer ({err or errno.errorcode[-ret]})")
        if ret in (-errno.EACCES, -errno.EPERM):
            raise ClusterError("permission", f"mon stat: {err}")

    @contextlib.contextmanager
    def session(self) -> Iterator[RbdSession]:
        """A session on the shared connection (made on first use; a call whose monitors do not answer
        or refuse the key retires it, and the next call connects again). Opening the pool asks the
        monitors, so a down monitor fails every call within connect_timeout."""
        conn = self._acquire()
        retire = False
        try:
            with _translated():
                self._monitors_answer(conn.cluster)
                ioctx = conn.cluster.open_ioctx(self.settings.pool)
            try:
                yield _LibrbdSession(conn.cluster, ioctx, self._rbd, self.settings)
            finally:
                ioctx.close()
        except ClusterError as exc:
            retire = exc.kind in ("unreachable", "permission")
            raise
        finally:
            self._release(conn, retire=retire)


@dataclass
class _Connection:
    cluster: Any
    users: int = 0
    retired: bool = False


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """librados/librbd exceptions as ClusterError (by class, else by errno)."""
    try:
        yield
    except ClusterError:
        raise
    except (rbd.ImageNotFound, rados.ObjectNotFound) as exc:
        raise ClusterError("not-found", str(exc)) from exc
    except (rbd.ImageExists, rados.ObjectExists) as exc:
        raise ClusterError("exists", str(exc)) from exc
    except rbd.ImageHasSnapshots as exc:
        raise ClusterError("has-snapshots", str(exc)) from exc
    except (rbd.ImageBusy, rados.ObjectBusy) as exc:
        raise ClusterError("busy", str(exc)) from exc
    except (rbd.PermissionError, rados.PermissionError, rados.PermissionDeniedError) as exc:
        raise ClusterError("permission", str(exc)) from exc
    except (rbd.NoSpace, rados.NoSpace) as exc:
        raise ClusterError("no-space", str(exc)) from exc
    except (rbd.Timeout, rados.TimedOut, rbd.ConnectionShutdown, rados.ConnectionShutdown) as exc:
        raise ClusterError("unreachable", str(exc)) from exc
    except (rbd.Error, rados.Error) as exc:
        code = getattr(exc, "errno", None)
        kinds = {
            errno.EACCES: "permission",
            errno.EPERM: "permission",
            errno.ENOSPC: "no-space",
            errno.EDQUOT: "no-space",
            errno.ETIMEDOUT: "unreachable",
            errno.ENOTCONN: "unreachable",
            errno.ENOENT: "not-found",
            errno.EEXIST: "exists",
            errno.EBUSY: "busy",
            errno.EINVAL: "invalid",
        }
        raise ClusterError(kinds.get(abs(code) if isinstance(code, int) else 0, "other"), str(exc)) from exc


C = TypeVar("C", bound=type)


def _each_call_translated(cls: C) -> C:
    """Wraps every public method of `cls` in `_translated`: callers inside a session see ClusterError."""
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") or not callable(fn):
            continue

        def wrapped(*args: Any, __fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
            with _translated():
                return __fn(*args, **kwargs)

        functools.update_wrapper(wrapped, fn)
        setattr(cls, name, wrapped)
    return cls


@_each_call_translated
class _LibrbdSession:
    def __init__(self, cluster: Any, ioctx: Any, rbd: Any, settings: RbdSettings) -> None:
        self.cluster = cluster
        self.ioctx = ioctx
        self.rbd = rbd
        self.settings = settings

    def _image(self, name: str) -> Any:
        return self.rbd.Image(self.ioctx, name)

    def fsid(self) -> str:
        return str(self.cluster.get_fsid())

    def pool_space(self) -> Space | None:
        ret, out, _ = self.cluster.mon_command(json.dumps({"prefix": "df", "format": "json"}), b"")
        if ret != 0:
            return None
        for p in json.loads(out).get("pools", []):
            if p.get("name") == self.settings.pool:
                st = p.get("stats", {})
                free = int(st.get("max_avail", 0))
                return Space(total_bytes=int(st.get("bytes_used", 0)) + free, free_bytes=free)
        return None

    def exists(self, image: str) -> bool:
        try:
            with self.rbd.Image(self.ioctx, image, read_only=True):
                return True
        except self.rbd.ImageNotFound:
            return False

    def image_id(self, image: str) -> str:
        with self.rbd.Image(self.ioctx, image, read_only=True) as im:
            return str(im.id())

    def size(self, image: str) -> int:
        with self.rbd.Image(self.ioctx, image, read_only=True) as im:
            return int(im.size())

    def create(self, image: str, size: int) -> None:
        self.rbd.RBD().create(
            self.ioctx, image, size, old_format=False, data_pool=self.settings.data_pool or None
        )

    def remove(self, image: str) -> None:
        self.rbd.RBD().remove(self.ioctx, image)

    def rename(self, src: str, dst: str) -> None:
        self.rbd.RBD().rename(self.ioctx, src, dst)

    def resize(self, image: str, size: int) -> None:
        with self._image(image) as im:
            im.resize(size, allow_shrink=False)

    def snaps(self, image: str) -> list[str]:
        with self.rbd.Image(self.ioctx, image, read_only=True) as im:
            return [str(s["name"]) for s in im.list_snaps()]

    def snap_create(self, image: str, snap: str) -> None:
        with self._image(image) as im:
            im.create_snap(snap)

    def snap_protect(self, image: str, snap: str) -> None:
        with self._image(image) as im:
            if not im.is_protected_snap(snap):
                im.protect_snap(snap)

    def snap_remove(self, image: str, snap: str) -> None:
        with self._image(image) as im:
            if im.is_protected_snap(snap):
                im.unprotect_snap(snap)
            im.remove_snap(snap)

    def children(self, image: str, snap: str) -> list[str]:
        with self.rbd.Image(self.ioctx, image, snapshot=snap, read_only=True) as im:
            return [str(c["image"]) for c in im.list_children2() if not c.get("trash")]

    def parent(self, image: str) -> Parent | None:
        with self.rbd.Image(self.ioctx, image, read_only=True) as im:
            try:
                spec = im.get_parent_image_spec()
            except self.rbd.ImageNotFound:
                return None
            if spec.get("pool_name") != self.settings.pool:
                return None
            return Parent(str(spec["image_name"]), str(spec["snap_name"]))

    def clone(self, parent: str, snap: str, child: str) -> None:
        self.rbd.RBD().clone(
            self.ioctx, parent, snap, self.ioctx, child, data_pool=self.settings.data_pool or None
        )

    def flatten(self, image: str) -> None:
        with self._image(image) as im:
            im.flatten()

    def write(self, image: str, chunks: Iterable[tuple[int, bytes]]) -> None:
        with self._image(image) as im:
            for offset, data in chunks:
                im.write(data, offset)

    def meta_get(self, key: str) -> str | None:
        try:
            return str(self.rbd.RBD().pool_metadata_get(self.ioctx, key))
        except KeyError:
            return None

    def meta_set(self, key: str, value: str) -> None:
        self.rbd.RBD().pool_metadata_set(self.ioctx, key, value)

    def meta_remove(self, key: str) -> None:
        with contextlib.suppress(KeyError):
            self.rbd.RBD().pool_metadata_remove(self.ioctx, key)

    def host_key(self, user: str, caps: tuple[str, ...]) -> str:
        cmd = {
            "prefix": "auth get-or-create",
            "entity": f"client.{user}",
            "caps": list(caps),
            "format": "json",
        }
        ret, out, err = self.cluster.mon_command(json.dumps(cmd), b"")
        if ret != 0:
            kind = "permission" if -ret in (errno.EACCES, errno.EPERM) else "other"
            raise ClusterError(kind, f"auth get-or-create client.{user}: {err}")
        return str(json.loads(out)[0]["key"])


# -- the backend


def _chunks(f: BinaryIO, size: int, progress: ProgressFn) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of each non-zero CHUNK of the first `size` bytes of `f` (a new image reads
    zeros: zero chunks are skipped, the image stays sparse); reports progress as it reads."""
    done = 0
    while done < size:
        chunk = f.read(min(CHUNK, size - done))
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            yield done, chunk
        done += len(chunk)
        progress(done, size)


def _vol(volume_id: str) -> str:
    return VOLUME_PREFIX + volume_id


class RbdBackend:
    kind = "rbd"
    snapshots_depend_on_volume = True
    transport = Transport.RBD

    def __init__(
        self,
        name: str,
        settings: RbdSettings,
        cluster: RbdCluster,
        runner: Runner,
        *,
        copy_timeout: float = 3600.0,
    ) -> None:
        self.name = name
        self.settings = settings
        self.cluster = cluster
        self.runner = runner
        self.copy_timeout = copy_timeout
        self._image_locks: dict[str, threading.Lock] = {}
        self._image_locks_guard = threading.Lock()

    # -- errors

    def _where(self) -> str:
        s = self.settings
        return f"backend {self.name} (Ceph pool {s.pool}, monitors {', '.join(s.monitors)})"

    @contextlib.contextmanager
    def _session(self, what: str) -> Iterator[RbdSession]:
        """A cluster session; ClusterError mapped to the blockwire error tree, saying what failed."""
        try:
            with self.cluster.session() as s:
                yield s
        except ClusterError as exc:
            raise self._error(exc, what) from exc

    def _error(self, exc: ClusterError, what: str) -> BlockwireError:
        s = self.settings
        if exc.kind == "unreachable":
            return Unavailable(
                f"{self._where()}: the cluster did not answer in time while {what} ({exc.message}; "
                f"connect_timeout {s.connect_timeout:g}s for the monitors, op_timeout {s.op_timeout:g}s "
                "for each OSD operation); check that the monitors and OSDs run and are reachable"
            )
        if exc.kind == "permission":
            return PermissionDenied(
                f"{self._where()}: the cluster refused cephx user client.{s.user} while {what} (wrong key, "
                "or caps that do not reach the pool: it needs mon 'profile rbd', osd 'profile rbd "
                f"pool={s.pool}')"
            )
        if exc.kind == "no-space":
            return ResourceExhausted(f"{self._where()}: out of space while {what}")
        if exc.kind == "not-found":
            return NotFound(f"{self._where()}: not found while {what}: {exc.message}")
        if exc.kind in ("busy", "has-snapshots"):
            return FailedPrecondition(f"{self._where()}: {what}: {exc.message}")
        return Internal(f"{self._where()}: {what} failed: {exc.message}")

    # -- space

    def space(self) -> Space:
        with self._session("reading the pool's space") as s:
            sp = s.pool_space()
        if sp is not None:
            return sp
        c = self.settings.capacity_bytes
        return Space(total_bytes=c, free_bytes=c)

    def max_volume_bytes(self, provisioned_bytes: int) -> int:
        ratio = self.settings.oversubscription_ratio
        with self._session("reading the pool's space") as s:
            sp = s.pool_space()
        limits = []
        if self.settings.capacity_bytes:
            limits.append(int(self.settings.capacity_bytes * ratio) - provisioned_bytes)
        if sp is not None and sp.total_bytes:
            limits.append(min(int(sp.free_bytes * ratio), int(sp.total_bytes * ratio) - provisioned_bytes))
        limit = min(limits) if limits else UNKNOWN_CAPACITY_MAX
        return max(0, limit - limit % MIB)

    # -- volumes

    def device_path(self, volume_id: str) -> str:
        return f"rbd:{self.settings.pool}/{_vol(volume_id)}"

    def exists(self, volume_id: str) -> bool:
        with self._session(f"looking up volume {volume_id}") as s:
            return s.exists(_vol(volume_id))

    def image_id(self, volume_id: str) -> str:
        with self._session(f"reading the image id of volume {volume_id}") as s:
            return s.image_id(_vol(volume_id))

    def create(self, volume_id: str, size_bytes: int) -> None:
        with self._session(f"creating volume {volume_id}") as s:
            s.create(_vol(volume_id), size_bytes)

    def write_header(self, volume_id: str, data: bytes) -> None:
        """Writes an encrypted volume's LUKS header at offset 0 of its image, through librbd."""
        with self._session(f"writing the LUKS header of volume {volume_id}") as s:
            s.write(_vol(volume_id), [(0, data)])

    def extend(self, volume_id: str, size_bytes: int) -> None:
        with self._session(f"extending volume {volume_id}") as s:
            if not s.exists(_vol(volume_id)):
                raise NotFound(f"{self._where()} has no image {_vol(volume_id)} for volume {volume_id}")
            if s.size(_vol(volume_id)) < size_bytes:
                s.resize(_vol(volume_id), size_bytes)

    def delete(self, volume_id: str) -> None:
        """Removes the image; its clones (of its hidden clone snapshots, or of snapshots the service
        let go with it) are flattened first; the hidden snapshot this volume was cloned from goes too.
        Gone already: nothing to do."""
        img = _vol(volume_id)
        with self._session(f"deleting volume {volume_id}") as s:
            if not s.exists(img):
                return
            for snap in s.snaps(img):
                self._drop_snap(s, img, snap)
            parent = s.parent(img)
            s.remove(img)
            if parent is not None and parent.snap == CLONE_PREFIX + volume_id:
                with contextlib.suppress(ClusterError):
                    s.snap_remove(parent.image, parent.snap)
        log.info("backend %s: image %s removed", self.name, img)

    def _drop_snap(self, s: RbdSession, img: str, snap: str) -> None:
        """Flattens the snapshot's clones (each becomes whole), then removes it."""
        for child in s.children(img, snap):
            log.info(
                "backend %s: flattening %s, a clone of %s@%s, before removing the snapshot",
                self.name,
                child,
                img,
                snap,
            )
            s.flatten(child)
        s.snap_remove(img, snap)
        if snap.startswith(SNAPSHOT_PREFIX):
            s.meta_remove(SNAPSHOT_META + snap[len(SNAPSHOT_PREFIX) :])

    def _clone_into(
        self,
        s: RbdSession,
        parent: str,
        snap: str,
        volume_id: str,
        *,
        size_bytes: int,
        undo: contextlib.ExitStack,
        protect: bool = True,
        parent_size: int = -1,
    ) -> None:
        """Clones parent@snap into the volume's image (grown to size_bytes); `undo` removes it.
        `parent_size`: the clone's size when known (-1: ask the cluster)."""
        if protect:  # a golden image's base snapshot is protected before it gets its name
            s.snap_protect(parent, snap)
        child = _vol(volume_id)
        s.clone(parent, snap, child)
        undo.callback(self._forget, s, child)
        if (parent_size if parent_size >= 0 else s.size(child)) < size_bytes:
            s.resize(child, size_bytes)

    def _forget(self, s: RbdSession, image: str) -> None:
        with contextlib.suppress(ClusterError):
            s.remove(image)

    # -- snapshots

    def _snapshot_image(self, s: RbdSession, snapshot_id: str) -> str | None:
        volume_id = s.meta_get(SNAPSHOT_META + snapshot_id)
        return _vol(volume_id) if volume_id else None

    def snapshot(self, volume_id: str, snapshot_id: str) -> None:
        img, snap = _vol(volume_id), SNAPSHOT_PREFIX + snapshot_id
        with self._session(f"taking snapshot {snapshot_id} of volume {volume_id}") as s:
            if not s.exists(img):
                raise NotFound(f"{self._where()} has no image {img} for volume {volume_id}")
            with contextlib.ExitStack() as undo:
                s.meta_set(SNAPSHOT_META + snapshot_id, volume_id)  # record first: delete finds it
                undo.callback(s.meta_remove, SNAPSHOT_META + snapshot_id)
                s.snap_create(img, snap)
                undo.pop_all()

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._session(f"deleting snapshot {snapshot_id}") as s:
            img = self._snapshot_image(s, snapshot_id)
            snap = SNAPSHOT_PREFIX + snapshot_id
            if img is None:
                return
            if not s.exists(img) or snap not in s.snaps(img):
                s.meta_remove(SNAPSHOT_META + snapshot_id)
                return
            self._drop_snap(s, img, snap)

    def create_from_snapshot(self, snapshot_id: str, volume_id: str, size_bytes: int) -> None:
        with self._session(f"cloning snapshot {snapshot_id} into volume {volume_id}") as s:
            img = self._snapshot_image(s, snapshot_id)
            snap = SNAPSHOT_PREFIX + snapshot_id
            if img is None or not s.exists(img) or snap not in s.snaps(img):
                raise NotFound(f"{self._where()} has no RBD snapshot for snapshot {snapshot_id}")
            with contextlib.ExitStack() as undo:
                self._clone_into(s, img, snap, volume_id, size_bytes=size_bytes, undo=undo)
                undo.pop_all()

    def clone(self, source_volume_id: str, volume_id: str, size_bytes: int) -> None:
        src, snap = _vol(source_volume_id), CLONE_PREFIX + volume_id
        with self._session(f"cloning volume {source_volume_id} into volume {volume_id}") as s:
            if not s.exists(src):
                raise NotFound(f"{self._where()} has no image {src} for volume {source_volume_id}")
            with contextlib.ExitStack() as undo:
                if snap not in s.snaps(src):
                    s.snap_create(src, snap)
                undo.callback(self._drop_hidden, s, src, snap)
                self._clone_into(s, src, snap, volume_id, size_bytes=size_bytes, undo=undo)
                undo.pop_all()

    def _drop_hidden(self, s: RbdSession, img: str, snap: str) -> None:
        with contextlib.suppress(ClusterError):
            s.snap_remove(img, snap)

    # -- images

    def inspect_image(self, image: ImageSource) -> ImageInfo:
        return inspect_image(self.runner, image)

    @staticmethod
    def image_key(image: ImageSource, info: ImageInfo) -> str:
        """The golden image's key: its real path, mtime, size and format (a changed file is a new key)."""
        path = os.path.realpath(image.path)
        st = os.stat(path)
        raw = f"{path}\0{st.st_mtime_ns}\0{st.st_size}\0{info.format}\0{info.virtual_size}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def _image_lock(self, key: str) -> threading.Lock:
        with self._image_locks_guard:
            return self._image_locks.setdefault(key, threading.Lock())

    def create_from_image(
        self, image: ImageSource, info: ImageInfo, volume_id: str, size_bytes: int, progress: ProgressFn
    ) -> None:
        key = self.image_key(image, info)
        base = IMAGE_PREFIX + key
        what = f"cloning the base image of {image.path} into volume {volume_id}"
        for _ in range(2):
            with self._session(what) as s:
                try:  # the base is there (the common case): clone it at once
                    with contextlib.ExitStack() as undo:
                        self._clone_into(
                            s,
                            base,
                            BASE_SNAP,
                            volume_id,
                            size_bytes=size_bytes,
                            undo=undo,
                            protect=False,
                            parent_size=info.virtual_size,
                        )
                        undo.pop_all()
                    return  # (the service records the volume's progress as complete)
                except ClusterError as exc:
                    if exc.kind != "not-found":
                        raise
            with self._image_lock(key):  # one import per image in this service at a time
                with self._session(f"looking up the base image of {image.path}") as s:
                    ready = self._has_base(s, base)
                if not ready:
                    self._import(image, info, base, progress)
        raise Internal(f"{self._where()}: base image {base} of {image.path} vanished after its import")

    @staticmethod
    def _has_base(s: RbdSession, base: str) -> bool:
        try:
            return BASE_SNAP in s.snaps(base)
        except ClusterError as exc:
            if exc.kind == "not-found":
                return False
            raise

    def _import(self, image: ImageSource, info: ImageInfo, base: str, progress: ProgressFn) -> None:
        """Writes the image into `<base>.tmp-<random>`, snapshots and protects it, renames it to `base`."""
        tmp = f"{base}.tmp-{secrets.token_hex(4)}"
        with contextlib.ExitStack() as stack:
            source = image.path
            if info.format != "raw":
                scratch = stack.enter_context(
                    tempfile.TemporaryDirectory(dir=self.settings.scratch_dir or None)
                )
                source = os.path.join(scratch, "image.raw")
                self.runner.run(
                    ["qemu-img", "convert", "-f", info.format, "-O", "raw", "-S", "4k", image.path, source],
                    timeout=self.copy_timeout,
                )
            s = stack.enter_context(self._session(f"importing {image.path} into {base}"))
            with contextlib.ExitStack() as undo:
                s.create(tmp, info.virtual_size)
                undo.callback(self._forget, s, tmp)
                with open(source, "rb") as f:
                    s.write(tmp, _chunks(f, info.virtual_size, progress))
                s.snap_create(tmp, BASE_SNAP)
                s.snap_protect(tmp, BASE_SNAP)
                try:
                    s.rename(tmp, base)
                except ClusterError as exc:
                    if exc.kind != "exists":
                        raise
                    s.snap_remove(tmp, BASE_SNAP)  # another service imported it first: use theirs
                    return
                undo.pop_all()
        log.info("backend %s: imported %s into base image %s", self.name, image.path, base)

    # -- what hosts get

    def connection(self, volume_id: str, host: str) -> RbdConnection:
        """How a host opens the volume's image: monitors, pool, image, its id and the cluster's fsid,
        and the cephx user and key for that host (see `RbdSettings.host_users`)."""
        st = self.settings
        img = _vol(volume_id)
        with self._session(f"announcing volume {volume_id} to host {host}") as s:
            image_id = s.image_id(img)
            fsid = s.fsid()
            if st.host_users == "per-host":
                user = f"{st.host_user_prefix}.{host}"
                key: Secret | None = Secret(s.host_key(user, host_caps(st.pool, st.data_pool)))
            else:
                user = st.host_user or st.user
                key = st.host_key if st.host_user else st.key
        return RbdConnection(
            pool=st.pool,
            image=img,
            monitors=st.monitors,
            user=user,
            key=key,
            image_id=image_id,
            cluster_fsid=fsid,
        )


def host_caps(pool: str, data_pool: str = "") -> tuple[str, ...]:
    """The caps of a host's cephx user: RBD on the backend's pool (and its data pool) only."""
    osd = f"profile rbd pool={pool}" + (f", profile rbd pool={data_pool}" if data_pool else "")
    return ("mon", "profile rbd", "osd", osd)
