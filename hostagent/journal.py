"""The attachment journal (STYLE.md rule 6): one JSON record per attachment, written before each side effect.

Layout: `<state_dir>/attachments/<volume>@<domain>.json`, each part percent-encoded (every byte
outside `[A-Za-z0-9._-]` becomes `%XX`), so the name is a reversible, collision-free function of the
pair: "hv 1" and "hv_1" are two records, never one. A name that would pass the file system's limit is
replaced by a digest of the encoded pair (collision-free for any practical purpose). Every record read
is checked against the pair it was asked for. The directory is 0700 and every file 0600: records hold
connection info with its CHAP secrets, needed to undo an attach after a crash.

A record file holds JSON lines, each a whole record; the last complete line is the record (a file with
one line is a plain JSON document, and files written by older agents, one indented JSON document, are
read as they are). `put` returns only when the new record is durable, and a crash at any point inside
it leaves the old record or the new one, never half of one:

* a new file (the first record of a pair, or a rewrite) is made atomically: temporary file, complete
  write, fsync, rename, directory fsync. A crash before the rename leaves the old file or none (the
  temporary file is removed on open); after it, the new one.
* a later record is appended to the existing file (O_APPEND, complete write, fdatasync), with no
  directory fsync: the directory entry does not change, and fdatasync makes the data and the file size
  (the metadata needed to read the data back) durable. A crash during the append leaves at most a torn
  last line, which never parses as a JSON object (its closing brace is its last byte) and is skipped:
  the record is the line before it, the old record, and the side effect the new record was to announce
  had not started (put had not returned). A line whose object is whole but whose newline is missing
  counts as the new record: that is the state after a crash right after put returned, which recovery
  handles anyway (every record is written before the side effect it announces). After a torn tail
  the next append starts on a new line, so the tail never glues to the next record; a failed append
  (a write error, a full disk) is cut back to the old size.
* a file that grew past `_COMPACT_AT`, or was written by an older agent, is rewritten as a new file.

So an attach costs one fsync'd creation (file + directory) and one fdatasync per later record, instead
of two fsyncs per record.

Records written under the older, lossy naming (`[^A-Za-z0-9._-]` replaced by `_`) are renamed to their
new name when the journal opens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from blockwire import model
from blockwire.convert import connection_info_from_pb, connection_info_to_pb
from blockwire.errors import FailedPrecondition
from blockwire.v1 import types_pb2
from hostagent.model import AttachmentState, ConnectorKind, JournalRecord

log = logging.getLogger(__name__)

_UNSAFE = re.compile(rb"[^A-Za-z0-9._-]")
_DIGEST_PREFIX = "sha256-"  # names of records whose encoded pair is too long for a file name
_MAX_NAME = 200  # bytes of a record's file name before ".json"; file systems allow 255


def _encode(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"%{m.group()[0]:02X}".encode(), text.encode()).decode()


def _key(volume_id: str, domain: str) -> str:
    """The record's file name stem: collision-free for any pair (percent-encoding is reversible)."""
    key = f"{_encode(volume_id)}@{_encode(domain)}"
    if len(key) > _MAX_NAME:
        return _DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()
    return key


def to_json(a: JournalRecord) -> dict[str, Any]:
    # CHAP passwords are kept (a restart must log in again); an encryption key never is
    info = json_format.MessageToDict(
        connection_info_to_pb(a.connection_info.without_key(), with_secrets=True)
    )
    # written only when set, so that an ordinary record reads back exactly as older agents wrote it
    migration = {"migration_source_id": a.migration_source_id} if a.migration_source_id else {}
    return {
        "version": 1,
        "volume_id": a.volume_id,
        "domain": a.domain,
        "domain_uuid": a.domain_uuid,
        "state": a.state.value,
        "connection_info": info,
        "attachment_id": a.attachment_id,
        "access_mode": a.access_mode.value,
        "connector_kind": a.connector_kind.value if a.connector_kind is not None else "",
        "owns_export": a.owns_export,
        "persistent": a.persistent,
        "serial": a.serial,
        "target_dev": a.target_dev,
        "host_device": a.host_device,
        "error_message": a.error_message,
        "create_time": a.create_time.isoformat() if a.create_time else "",
        "update_time": a.update_time.isoformat() if a.update_time else "",
        **migration,
    }


def from_json(d: dict[str, Any]) -> JournalRecord:
    pb = json_format.ParseDict(d["connection_info"], types_pb2.ConnectionInfo())
    info = connection_info_from_pb(pb) if pb.WhichOneof("transport") else _placeholder(d)
    return JournalRecord(
        volume_id=d["volume_id"],
        domain=d["domain"],
        domain_uuid=d.get("domain_uuid", ""),
        state=AttachmentState(d["state"]),
        connection_info=info,
        attachment_id=d.get("attachment_id", ""),
        access_mode=model.AccessMode(d.get("access_mode", "rw")),
        connector_kind=ConnectorKind(d["connector_kind"]) if d.get("connector_kind") else None,
        owns_export=bool(d.get("owns_export", False)),
        persistent=bool(d.get("persistent", False)),
        serial=d.get("serial", ""),
        target_dev=d.get("target_dev", ""),
        host_device=d.get("host_device", ""),
        error_message=d.get("error_message", ""),
        create_time=datetime.fromisoformat(d["create_time"]) if d.get("create_time") else None,
        update_time=datetime.fromisoformat(d["update_time"]) if d.get("update_time") else None,
        migration_source_id=d.get("migration_source_id", ""),
    )


def _placeholder(d: dict[str, Any]) -> model.ConnectionInfo:
    """A record written before storage answered has no transport yet."""
    return model.ConnectionInfo(transport=model.LocalConnection(""), volume_id=d["volume_id"])


_TMP_PREFIX = ".tmp-"
_COMPACT_AT = 64 * 1024  # bytes of a record file past which the next put rewrites it with one record


def encode_record(a: JournalRecord) -> bytes:
    """One record as one line (compact JSON, no newline inside: json escapes control characters)."""
    return json.dumps(to_json(a), sort_keys=True, separators=(",", ":")).encode() + b"\n"


def parse_record_file(data: bytes) -> dict[str, Any]:
    """A record file's content -> its record: the last line that is a complete JSON object (a torn last
    line, left by a crash during an append, is skipped); a whole indented document as older agents wrote
    it. ValueError when there is none."""
    if data.startswith(b"{\n"):
        d = json.loads(data)  # an older agent's record: written atomically, as one document
        if isinstance(d, dict):
            return d
        raise ValueError("not a JSON object")
    for line in reversed(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            continue  # torn (a crash during an append): the line before it is the record
        if isinstance(d, dict):
            return d
    raise ValueError("no complete record in the file")


def read_record_file(path: str | Path) -> dict[str, Any]:
    """The record a journal file holds, as JSON (for tools and tests that look at the files)."""
    return parse_record_file(Path(path).read_bytes())


Writer = Callable[[int, memoryview], int]


class Journal:
    def __init__(self, state_dir: str | Path, *, write: Writer = os.write) -> None:
        """`write` is os.write; tests inject one that writes less than asked, as os.write may."""
        self._write = write
        self.dir = Path(state_dir) / "attachments"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        # A crash between writing a temporary record and renaming it leaves the temporary file; the record
        # it was to replace (or its absence) is still the truth. One agent owns a state dir.
        for stale in self.dir.glob(f"{_TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        self._rename_legacy()

    def _rename_legacy(self) -> None:
        """Gives records named by the older, lossy scheme their collision-free name."""
        for p in sorted(self.dir.glob("*.json")):
            try:
                a = from_json(read_record_file(p))
            except (OSError, ValueError, KeyError):
                continue  # all() reports it
            want = self._path(a.volume_id, a.domain)
            if p != want and not want.exists():
                log.info("journal record %s renamed to %s", p.name, want.name)
                os.replace(p, want)
                self._sync_dir()

    def _path(self, volume_id: str, domain: str) -> Path:
        return self.dir / f"{_key(volume_id, domain)}.json"

    def put(self, a: JournalRecord) -> None:
        """Writes the record durably, replacing any previous one: appended to the pair's file when it
        exists, else a new file made atomically (the module's docstring says why a crash at any point
        leaves the old record or the new one)."""
        data = encode_record(a)
        path = self._path(a.volume_id, a.domain)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            self._create(path, data)
            return
        try:
            if not self._append(fd, data):
                self._create(path, data)
        finally:
            os.close(fd)

    def _append(self, fd: int, data: bytes) -> bool:
        """Appends one record line and fdatasyncs it. False when the file is to be rewritten instead (an
        older agent's document, or grown past _COMPACT_AT)."""
        size = os.fstat(fd).st_size
        head = os.pread(fd, 2, 0)
        if size == 0 or size + len(data) > _COMPACT_AT or head == b"{\n":
            return False
        if os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a torn line left by a crash: the record starts on a line of its own
        try:
            self._write_all(fd, data)
            os.fdatasync(fd)
        except BaseException:
            # cut what this append wrote (a torn line would be skipped anyway; the old record stands)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
        return True

    def _create(self, path: Path, data: bytes) -> None:
        """The pair's file made anew, atomically: temporary file, fsync, rename, directory fsync."""
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=_TMP_PREFIX, suffix=".json")
        try:
            try:
                os.fchmod(fd, 0o600)
                self._write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._sync_dir()

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked (a signal, a full disk)
            view = view[self._write(fd, view) :]

    def update(self, a: JournalRecord, **changes: Any) -> JournalRecord:
        new = replace(a, **changes)
        self.put(new)
        return new

    def delete(self, volume_id: str, domain: str) -> None:
        try:
            os.unlink(self._path(volume_id, domain))
        except FileNotFoundError:
            return
        self._sync_dir()

    def get(self, volume_id: str, domain: str) -> JournalRecord | None:
        path = self._path(volume_id, domain)
        try:
            a = from_json(read_record_file(path))
        except FileNotFoundError:
            return None
        if (a.volume_id, a.domain) != (volume_id, domain):
            # Only a hand-made or damaged file can get here: never act on another pair's record.
            raise FailedPrecondition(
                f"journal record {path.name} is for volume {a.volume_id!r} on domain {a.domain!r}, not "
                f"{volume_id!r} on {domain!r}; move it away and run reconcile"
            )
        return a

    def all(self) -> list[JournalRecord]:
        return self._read(lambda name: True)

    def of_volume(self, volume_id: str) -> list[JournalRecord]:
        """The volume's records. Only its own files are read (their names start with the encoded volume id
        and "@", which no encoded id contains), and those named by a digest: an attach or detach costs
        the same with one record on the host or hundreds."""
        prefix = f"{_encode(volume_id)}@"
        mine = self._read(lambda name: name.startswith((prefix, _DIGEST_PREFIX)))
        return [a for a in mine if a.volume_id == volume_id]

    def _read(self, wanted: Callable[[str], bool]) -> list[JournalRecord]:
        found = []
        for p in sorted(self.dir.glob("*.json")):
            if p.name.startswith(_TMP_PREFIX) or not wanted(p.name):
                continue  # (a temporary file: a record being written by put(); its rename is atomic)
            try:
                found.append(from_json(read_record_file(p)))
            except FileNotFoundError:
                continue  # deleted since the listing
            except (OSError, ValueError, KeyError) as exc:
                log.error("journal record %s is unreadable (%s); leaving it for an operator", p.name, exc)
        return found

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
