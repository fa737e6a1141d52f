"""The attachment journal (STYLE.md rule 6): one JSON record per attachment, written before each side effect.

Layout: `<state_dir>/attachments/<volume>@<domain>.json`. The directory is 0700 and every file 0600:
records hold connection info with its CHAP secrets, needed to undo an attach after a crash. Writes are
atomic (temporary file, fsync, rename, directory fsync), so a crash leaves either the old record or
the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from blockwire import model
from blockwire.convert import connection_info_from_pb, connection_info_to_pb
from blockwire.v1 import types_pb2
from hostagent.model import Attachment, AttachmentState

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _key(volume_id: str, domain: str) -> str:
    return f"{_SAFE.sub('_', volume_id)}@{_SAFE.sub('_', domain)}"


def to_json(a: Attachment) -> dict[str, Any]:
    info = json_format.MessageToDict(connection_info_to_pb(a.connection_info, with_secrets=True))
    return {
        "version": 1,
        "volume_id": a.volume_id,
        "domain": a.domain,
        "state": a.state.value,
        "connection_info": info,
        "attachment_id": a.attachment_id,
        "access_mode": a.access_mode.value,
        "connector_kind": a.connector_kind,
        "owns_export": a.owns_export,
        "persistent": a.persistent,
        "serial": a.serial,
        "target_dev": a.target_dev,
        "host_device": a.host_device,
        "secret_usage": a.secret_usage,
        "error_message": a.error_message,
        "create_time": a.create_time.isoformat() if a.create_time else "",
        "update_time": a.update_time.isoformat() if a.update_time else "",
    }


def from_json(d: dict[str, Any]) -> Attachment:
    pb = json_format.ParseDict(d["connection_info"], types_pb2.ConnectionInfo())
    info = connection_info_from_pb(pb) if pb.WhichOneof("transport") else _placeholder(d)
    return Attachment(
        volume_id=d["volume_id"],
        domain=d["domain"],
        state=AttachmentState(d["state"]),
        connection_info=info,
        attachment_id=d.get("attachment_id", ""),
        access_mode=model.AccessMode(d.get("access_mode", "rw")),
        connector_kind=d.get("connector_kind", ""),
        owns_export=bool(d.get("owns_export", False)),
        persistent=bool(d.get("persistent", False)),
        serial=d.get("serial", ""),
        target_dev=d.get("target_dev", ""),
        host_device=d.get("host_device", ""),
        secret_usage=d.get("secret_usage", ""),
        error_message=d.get("error_message", ""),
        create_time=datetime.fromisoformat(d["create_time"]) if d.get("create_time") else None,
        update_time=datetime.fromisoformat(d["update_time"]) if d.get("update_time") else None,
    )


def _placeholder(d: dict[str, Any]) -> model.ConnectionInfo:
    """A record written before storage answered has no transport yet."""
    return model.ConnectionInfo(transport=model.LocalConnection(""), volume_id=d["volume_id"])


_TMP_PREFIX = ".tmp-"


class Journal:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "attachments"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        # A crash between writing a temporary record and renaming it leaves the temporary file; the record
        # it was to replace (or its absence) is still the truth. One agent owns a state dir.
        for stale in self.dir.glob(f"{_TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)

    def _path(self, volume_id: str, domain: str) -> Path:
        return self.dir / f"{_key(volume_id, domain)}.json"

    def put(self, a: Attachment) -> None:
        """Writes the record atomically and durably, replacing any previous one."""
        data = json.dumps(to_json(a), indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=_TMP_PREFIX, suffix=".json")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self._path(a.volume_id, a.domain))
        except OSError:
            os.unlink(tmp)
            raise
        self._sync_dir()

    def update(self, a: Attachment, **changes: Any) -> Attachment:
        new = replace(a, **changes)
        self.put(new)
        return new

    def delete(self, volume_id: str, domain: str) -> None:
        try:
            os.unlink(self._path(volume_id, domain))
        except FileNotFoundError:
            return
        self._sync_dir()

    def get(self, volume_id: str, domain: str) -> Attachment | None:
        try:
            return from_json(json.loads(self._path(volume_id, domain).read_bytes()))
        except FileNotFoundError:
            return None

    def all(self) -> list[Attachment]:
        found = []
        for p in sorted(self.dir.glob("*.json")):
            if p.name.startswith(_TMP_PREFIX):
                continue  # a record being written by put(); its rename is atomic
            try:
                found.append(from_json(json.loads(p.read_bytes())))
            except FileNotFoundError:
                continue  # deleted since the listing
            except (OSError, ValueError, KeyError) as exc:
                log.error("journal record %s is unreadable (%s); leaving it for an operator", p.name, exc)
        return found

    def of_volume(self, volume_id: str) -> list[Attachment]:
        return [a for a in self.all() if a.volume_id == volume_id]

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
