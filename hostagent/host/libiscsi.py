"""libiscsi in this process: a LUN's identity (VPD 0x83), serial (VPD 0x80) and size (READ CAPACITY 16)
read over iSCSI without a process per read.

The QEMU-native connector checks every LUN before QEMU is given it (`hostagent.tools.libiscsi.LunReader`).
Running libiscsi's tools for it costs a process per read (7-11 ms an attach here, twice when the serial
had to be read too, because iscsi-inq prints binary designators as text); this reader logs in with the
same library the tools and QEMU use, through ctypes, and parses the raw pages itself
(`hostagent.tools.libiscsi.parse_*_raw`): an NAA designator is read in hex, so the serial is needed only
when no designator carries the announced WWN.

Why ctypes: PyPI's only binding of libiscsi, cython-iscsi (1.0, April 2020), is unmaintained, ships an
sdist only (a C build against libiscsi-dev on every host) and has no CHAP login; the handful of calls
used here are libiscsi's stable C API (libiscsi.so.7, Debian 12's 1.19), which ctypes reaches directly.

How a read goes: one libiscsi context per call (contexts are not shared between threads; ctypes
releases the GIL during each C call, so reads on different threads run in parallel), the initiator's
IQN and the CHAP credentials set on it (the password goes from `Secret.reveal()` straight into the
library: never in argv, the environment or a log), `iscsi_full_connect_async` (TCP connect, login,
TEST UNIT READY on the LUN), the SCSI command with a buffer of ours for the data-in, a logout; all of it
driven by our own event loop (poll + iscsi_service) bounded by one deadline on the injected clock, so an
unreachable portal or a target that stops answering costs at most `timeout` seconds. Automatic reconnects
are off. Errors are mapped as for the tools (`hostagent.tools.libiscsi.classify`, on libiscsi's own error
text): a refused CHAP login PermissionDenied, an unknown target or LUN NotFound, anything else
Unavailable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from blockwire.errors import NotFound, Unavailable
from blockwire.model import Chap
from blockwire.runtime.clock import Clock, Deadline
from hostagent.tools.libiscsi import (
    BadPage,
    Libiscsi,
    Lun,
    classify,
    page_length,
    parse_readcapacity16_raw,
    parse_vpd80_raw,
    parse_vpd83_raw,
    raw_identities,
)

log = logging.getLogger(__name__)

SONAME = "libiscsi.so.7"
DEFAULT_INITIATOR = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq"  # what the tools use without -i
ISCSI_SESSION_NORMAL = 2
SCSI_STATUS_GOOD = 0
VPD_ALLOC = 252  # bytes asked for first; a longer page is asked for again with its own length
VPD_ALLOC_MAX = 4096
READCAPACITY16_LEN = 32
_LOGOUT_BOUND = 1.0  # seconds a logout may take (within the call's deadline): it is a courtesy

# void (*iscsi_command_cb)(struct iscsi_context *, int status, void *command_data, void *private_data)
CommandCb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

T = TypeVar("T")
_P = ctypes.c_void_p
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "iscsi_create_context": (_P, [ctypes.c_char_p]),
    "iscsi_destroy_context": (ctypes.c_int, [_P]),
    "iscsi_set_targetname": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "iscsi_set_session_type": (ctypes.c_int, [_P, ctypes.c_int]),
    "iscsi_set_initiator_username_pwd": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "iscsi_set_noautoreconnect": (None, [_P, ctypes.c_int]),
    "iscsi_full_connect_async": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_int, CommandCb, _P]),
    "iscsi_logout_async": (ctypes.c_int, [_P, CommandCb, _P]),
    "iscsi_get_fd": (ctypes.c_int, [_P]),
    "iscsi_which_events": (ctypes.c_int, [_P]),
    "iscsi_service": (ctypes.c_int, [_P, ctypes.c_int]),
    "iscsi_get_error": (ctypes.c_char_p, [_P]),
    "iscsi_scsi_command_async": (ctypes.c_int, [_P, ctypes.c_int, _P, CommandCb, _P, _P]),
    "scsi_cdb_inquiry": (_P, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "scsi_cdb_readcapacity16": (_P, []),
    "scsi_task_add_data_in_buffer": (ctypes.c_int, [_P, ctypes.c_int, _P]),
    "scsi_free_scsi_task": (None, [_P]),
}


def load(name: str = SONAME) -> tuple[ctypes.CDLL | None, str]:
    """The library with the prototypes used here, or None and why not (not installed, too old)."""
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        found = ctypes.util.find_library("iscsi") if name == SONAME else None  # another soname version
        if found is None or found == name:
            return None, f"{name} cannot be loaded ({exc})"
        try:
            lib = ctypes.CDLL(found)
        except OSError as exc2:
            return None, f"{found} cannot be loaded ({exc2})"
    for fn, (restype, argtypes) in _PROTOTYPES.items():
        try:
            f = getattr(lib, fn)
        except AttributeError:
            return None, f"{name} has no {fn} (libiscsi 1.19 or later is needed)"
        f.restype, f.argtypes = restype, argtypes
    return lib, ""


@dataclass
class _Call:
    """One callback's outcome; `done` once libiscsi called it."""

    done: bool = False
    status: int = 0
    error: str = ""
    callbacks: list[Any] = field(default_factory=list)  # the CFUNCTYPE objects, alive until the context ends


class InprocLibiscsi:
    """The `LunReader` that asks libiscsi in this process (see the module's docstring)."""

    def __init__(self, lib: ctypes.CDLL, clock: Clock, *, timeout: float = 15.0) -> None:
        self.lib = lib
        self.clock = clock
        self.timeout = timeout

    # -- the LunReader interface

    def identities(self, lun: Lun, chap: Chap | None, initiator: str) -> list[str]:
        """The LUN's hex identities from VPD page 0x83 (binary NAA/EUI-64 designators in hex)."""
        data = self._vpd(lun, chap, initiator, 0x83)
        return raw_identities(self._parsed(lun, chap, lambda: parse_vpd83_raw(data)))

    def serial(self, lun: Lun, chap: Chap | None, initiator: str) -> str:
        """The LUN's unit serial number from VPD page 0x80."""
        data = self._vpd(lun, chap, initiator, 0x80)
        return self._parsed(lun, chap, lambda: parse_vpd80_raw(data))

    def size(self, lun: Lun, chap: Chap | None, initiator: str) -> int:
        """The LUN's size in bytes from READ CAPACITY (16)."""
        with self._session(lun, chap, initiator) as run:
            data = run(self.lib.scsi_cdb_readcapacity16, READCAPACITY16_LEN)
        return self._parsed(lun, chap, lambda: parse_readcapacity16_raw(data))

    # -- the work

    def _vpd(self, lun: Lun, chap: Chap | None, initiator: str, page: int) -> bytes:
        with self._session(lun, chap, initiator) as run:
            data = run(lambda: self.lib.scsi_cdb_inquiry(1, page, VPD_ALLOC), VPD_ALLOC)
            want = page_length(data)
            if want > len(data) and data[1:2] == bytes([page]):  # a longer page: ask for all of it
                size = min(want, VPD_ALLOC_MAX)
                data = run(lambda: self.lib.scsi_cdb_inquiry(1, page, size), size)
        return data

    @staticmethod
    def _parsed(lun: Lun, chap: Chap | None, parse: Callable[[], T]) -> T:
        try:
            return parse()
        except BadPage as exc:
            where = Libiscsi.url(lun, chap)
            if "peripheral qualifier 3" in str(exc):
                raise NotFound(
                    f"{where}: the target or LUN is not exported to this initiator ({exc})"
                ) from None
            raise Unavailable(f"{where}: {exc}") from None

    @contextmanager
    def _session(
        self, lun: Lun, chap: Chap | None, initiator: str
    ) -> Iterator[Callable[[Callable[[], int | None], int], bytes]]:
        """Logs in to the LUN (a new context), yields `run(make_task, length) -> data-in`, logs out."""
        lib = self.lib
        where = Libiscsi.url(lun, chap)  # the username at most; never the password
        deadline = Deadline(self.clock, self.timeout)
        keep: list[Any] = []  # callbacks, buffers and tasks: alive until the context is destroyed
        tasks: list[int] = []
        ctx = lib.iscsi_create_context((initiator or DEFAULT_INITIATOR).encode())
        if not ctx:
            raise Unavailable(f"{where}: libiscsi could not create a context")
        try:
            lib.iscsi_set_noautoreconnect(ctx, 1)
            lib.iscsi_set_targetname(ctx, lun.target_iqn.encode())
            lib.iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL)
            if chap is not None:
                lib.iscsi_set_initiator_username_pwd(
                    ctx, chap.username.encode(), chap.password.reveal().encode()
                )
            portal = f"[{lun.host}]:{lun.port}" if ":" in lun.host else f"{lun.host}:{lun.port}"
            login = self._call(ctx, keep)
            if lib.iscsi_full_connect_async(ctx, portal.encode(), lun.lun, login.callbacks[0], None) != 0:
                raise self._error(ctx, where, "connect")
            self._wait(ctx, login, deadline, where, "login")
            if login.status != SCSI_STATUS_GOOD:
                raise classify(login.error, where)

            def run(make_task: Callable[[], int | None], length: int) -> bytes:
                task = make_task()
                if not task:
                    raise Unavailable(f"{where}: libiscsi could not build the SCSI command")
                tasks.append(task)
                buf = ctypes.create_string_buffer(length)
                keep.append(buf)
                lib.scsi_task_add_data_in_buffer(task, length, buf)
                cmd = self._call(ctx, keep)
                if lib.iscsi_scsi_command_async(ctx, lun.lun, task, cmd.callbacks[0], None, None) != 0:
                    raise self._error(ctx, where, "command")
                self._wait(ctx, cmd, deadline, where, "SCSI command")
                if cmd.status != SCSI_STATUS_GOOD:
                    raise classify(cmd.error, where, f"SCSI status {cmd.status}: {cmd.error}")
                return buf.raw

            yield run
            self._logout(ctx, keep, deadline, where)
        finally:
            lib.iscsi_destroy_context(ctx)  # closes the socket; may call pending callbacks (still alive)
            for task in tasks:
                lib.scsi_free_scsi_task(task)
            keep.clear()

    def _call(self, ctx: int, keep: list[Any]) -> _Call:
        call = _Call()

        def done(_ctx: int, status: int, _data: int, _private: int) -> None:
            if call.done:
                return  # full_connect calls again when the connection ends
            call.done, call.status = True, status
            if status != SCSI_STATUS_GOOD:
                call.error = (self.lib.iscsi_get_error(ctx) or b"").decode(errors="replace")

        cb = CommandCb(done)
        call.callbacks.append(cb)
        keep.append(cb)
        return call

    def _error(self, ctx: int, where: str, what: str) -> Exception:
        text = (self.lib.iscsi_get_error(ctx) or b"").decode(errors="replace")
        return classify(text, where, f"{what} failed: {text}")

    def _wait(self, ctx: int, call: _Call, deadline: Deadline, where: str, what: str) -> None:
        """Services the context until `call` is done, within the deadline."""
        lib = self.lib
        while not call.done:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise Unavailable(f"{where}: no answer within {self.timeout:g} s ({what})")
            events = lib.iscsi_which_events(ctx)
            fd = lib.iscsi_get_fd(ctx)
            if events == 0 or fd < 0:
                raise Unavailable(f"{where}: the connection ended ({what}): {self._text(ctx)}")
            poller = select.poll()
            poller.register(fd, events)
            ready = poller.poll(max(1, int(min(remaining, 1.0) * 1000)))
            revents = ready[0][1] if ready else 0  # 0: lets libiscsi check its own timeouts
            if lib.iscsi_service(ctx, revents) < 0 and not call.done:
                raise classify(self._text(ctx), where, f"{what}: {self._text(ctx)}")

    def _text(self, ctx: int) -> str:
        return (self.lib.iscsi_get_error(ctx) or b"").decode(errors="replace")

    def _logout(self, ctx: int, keep: list[Any], deadline: Deadline, where: str) -> None:
        """A polite logout, bounded; the data is read already, so a failure here changes nothing."""
        bye = self._call(ctx, keep)
        if self.lib.iscsi_logout_async(ctx, bye.callbacks[0], None) != 0:
            return
        bound = Deadline(self.clock, min(_LOGOUT_BOUND, deadline.remaining()))
        try:
            self._wait(ctx, bye, bound, where, "logout")
        except Unavailable as exc:
            log.debug("logout not confirmed: %s", exc.message)


def lun_reader(
    runner_reader: Libiscsi, clock: Clock, *, timeout: float, soname: str = SONAME
) -> Libiscsi | InprocLibiscsi:
    """The in-process reader when libiscsi loads, the tools otherwise (said once, at start)."""
    lib, why = load(soname)
    if lib is None:
        log.info("LUN identity through libiscsi's tools (iscsi-inq): %s", why)
        return runner_reader
    log.info("LUN identity through libiscsi in process (%s)", soname)
    return InprocLibiscsi(lib, clock, timeout=timeout)
