"""Who may call what on StorageService (see README "Security").

Identities come from `blockwire.server.serving.identify`: the unix socket and plaintext TCP (only when
`allow_insecure_tcp`) are admins; over TLS the client certificate's SAN URI names the role.

* **admin** (``blockwire://admin/<name>``): everything.
* **agent** (``blockwire://agent/<host>``): only what a compute host's agent needs for its own host:
  CreateAttachment and CreateMigrationAttachment (the destination of a live migration) with
  ``connector.host == <host>``; CompleteAttachment, DeleteAttachment, GetAttachment, CompleteMigration
  and RollbackMigration of attachments whose connector host is ``<host>`` (an id that does not exist passes
  through and gets the RPC's own answer: NOT_FOUND, or OK for a delete); GetVolume.
* **storage-node** (``blockwire://storage-node/<name>``): another storage node of the cluster forwarding
  a call it accepted (and authorized) to the node that serves the volume's backend
  (`storagesvc.rpc.forward`): the forwarded methods only (`FORWARDED`).
* anything else: PERMISSION_DENIED. No credential at all: UNAUTHENTICATED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blockwire.errors import PermissionDenied
from blockwire.server.serving import ADMIN, AGENT, STORAGE_NODE, AuthInterceptor, Identity
from blockwire.v1 import storage_pb2 as spb

SERVICE_PREFIX = "/blockwire.v1.StorageService/"
AGENT_READ = frozenset({"GetVolume"})
AGENT_OWN_ATTACHMENT = frozenset(
    {"CompleteAttachment", "DeleteAttachment", "GetAttachment", "CompleteMigration", "RollbackMigration"}
)

FORWARDED = frozenset(
    {
        "CreateVolume",
        "DeleteVolume",
        "ExtendVolume",
        "CreateSnapshot",
        "DeleteSnapshot",
        "CreateAttachment",
        "CompleteAttachment",
        "DeleteAttachment",
        "CreateMigrationAttachment",
        "CompleteMigration",
        "RollbackMigration",
    }
)
"""What one storage node forwards to another: calls that need the node serving the volume's backend."""

HostOf = Callable[[str], str | None]
"""The connector host of an attachment id, or None when there is no such attachment."""


class StoragePolicy:
    def __init__(self, host_of: HostOf) -> None:
        self.host_of = host_of

    def __call__(self, who: Identity, method: str, request: Any) -> None:
        if who.role == ADMIN:
            return
        if who.role == STORAGE_NODE:
            if method not in FORWARDED:
                raise PermissionDenied(
                    f"{method} is not forwarded between storage nodes; node {who.name} may not call it"
                )
            return
        if who.role != AGENT:
            raise PermissionDenied(f"{method}: the credential has no role")
        if method in AGENT_READ:
            return
        if method in ("CreateAttachment", "CreateMigrationAttachment"):
            assert isinstance(request, (spb.CreateAttachmentRequest, spb.CreateMigrationAttachmentRequest))
            if request.connector.host != who.name:
                raise PermissionDenied(
                    f"the agent of host {who.name} may attach volumes to its own host only, "
                    f"not to {request.connector.host[:80]!r}"
                )
            return
        if method in AGENT_OWN_ATTACHMENT:
            attachment_id: str = request.attachment_id
            host = self.host_of(attachment_id) if attachment_id else None
            if host is not None and host != who.name:
                raise PermissionDenied(
                    f"attachment {attachment_id[:80]} belongs to another host; the agent of {who.name} "
                    "may only handle its own"
                )
            return
        raise PermissionDenied(f"{method} needs an admin credential; the agent of {who.name} has none")


def interceptor(host_of: HostOf) -> AuthInterceptor:
    return AuthInterceptor(SERVICE_PREFIX, StoragePolicy(host_of))
