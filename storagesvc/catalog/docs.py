"""The catalog's records as JSON documents, the same for every SQL dialect.

Each table keeps the columns it is queried by plus the whole record as JSON (`doc`), so adding a field to
a record needs no migration. Secrets the service must give back (CHAP, cephx keys, DH-HMAC-CHAP) are in
the documents: the catalog is protected like a key file (SQLite: mode 0600; PostgreSQL: its role).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from blockwire.model import (
    AccessMode,
    Chap,
    ConnectionInfo,
    Connector,
    Encryption,
    IoTune,
    IscsiConnection,
    IscsiPath,
    NvmeofConnection,
    NvmeofPortal,
    RbdConnection,
    Transport,
)
from blockwire.secret import Secret
from storagesvc.model import (
    Attachment,
    AttachmentState,
    ExportRecord,
    ImageFormat,
    ImageSource,
    NodeBackend,
    Progress,
    QosSpecs,
    Snapshot,
    SnapshotState,
    StorageNode,
    Volume,
    VolumeSource,
    VolumeState,
    VolumeType,
)


def _chap_doc(c: Chap | None) -> dict[str, str] | None:
    return None if c is None else {"username": c.username, "password": c.password.reveal()}


def _chap(d: dict[str, str] | None) -> Chap | None:
    return None if d is None else Chap(d["username"], Secret(d["password"]))


def _encryption_doc(e: Encryption | None) -> dict[str, Any] | None:
    """Never the passphrase: the catalog holds the key manager's reference (a wrapped key or an id)."""
    if e is None:
        return None
    return {
        "format": e.format,
        "cipher": e.cipher,
        "key_size_bits": e.key_size_bits,
        "key_ref": e.key_ref,
        "header_bytes": e.header_bytes,
    }


def _encryption(d: dict[str, Any] | None) -> Encryption | None:
    if d is None:
        return None
    return Encryption(
        cipher=d["cipher"],
        key_size_bits=d["key_size_bits"],
        key_ref=d["key_ref"],
        header_bytes=d["header_bytes"],
        format=d["format"],
    )


def volume_doc(v: Volume) -> dict[str, Any]:
    e = v.export
    return {
        "id": v.id,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "state": v.state.value,
        "backend": v.backend,
        "wwn": v.wwn,
        "serial": v.serial,
        "create_time": v.create_time.isoformat(),
        "update_time": v.update_time.isoformat(),
        "multiattach": v.multiattach,
        "labels": dict(v.labels),
        "source": {
            "snapshot_id": v.source.snapshot_id,
            "volume_id": v.source.volume_id,
            "image": None
            if v.source.image is None
            else {"path": v.source.image.path, "format": v.source.image.format.value},
        },
        "progress": [v.progress.done_bytes, v.progress.total_bytes],
        "error_message": v.error_message,
        "export": None
        if e is None
        else {
            "target_iqn": e.target_iqn,
            "lun": e.lun,
            "chap": _chap_doc(e.chap),
            "mutual_chap": _chap_doc(e.mutual_chap),
            "access_mode": e.access_mode.value,
        },
        "encryption": _encryption_doc(v.encryption),
        "volume_type": v.volume_type,
    }


def volume_from_doc(d: dict[str, Any]) -> Volume:
    s = d["source"]
    e = d["export"]
    return Volume(
        id=d["id"],
        name=d["name"],
        size_bytes=d["size_bytes"],
        state=VolumeState(d["state"]),
        backend=d["backend"],
        wwn=d["wwn"],
        serial=d["serial"],
        create_time=datetime.fromisoformat(d["create_time"]),
        update_time=datetime.fromisoformat(d["update_time"]),
        multiattach=d["multiattach"],
        labels=d["labels"],
        source=VolumeSource(
            snapshot_id=s["snapshot_id"],
            volume_id=s["volume_id"],
            image=None
            if s["image"] is None
            else ImageSource(s["image"]["path"], ImageFormat(s["image"]["format"])),
        ),
        progress=Progress(*d["progress"]),
        error_message=d["error_message"],
        export=None
        if e is None
        else ExportRecord(
            target_iqn=e["target_iqn"],
            lun=e["lun"],
            chap=_chap(e["chap"]),
            mutual_chap=_chap(e["mutual_chap"]),
            access_mode=AccessMode(e["access_mode"]),
        ),
        encryption=_encryption(d.get("encryption")),
        volume_type=d.get("volume_type", ""),
    )


def snapshot_doc(s: Snapshot) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "volume_id": s.volume_id,
        "size_bytes": s.size_bytes,
        "state": s.state.value,
        "backend": s.backend,
        "create_time": s.create_time.isoformat(),
        "labels": dict(s.labels),
        "error_message": s.error_message,
        "encryption": _encryption_doc(s.encryption),
    }


def snapshot_from_doc(d: dict[str, Any]) -> Snapshot:
    return Snapshot(
        id=d["id"],
        name=d["name"],
        volume_id=d["volume_id"],
        size_bytes=d["size_bytes"],
        state=SnapshotState(d["state"]),
        backend=d["backend"],
        create_time=datetime.fromisoformat(d["create_time"]),
        labels=d["labels"],
        error_message=d["error_message"],
        encryption=_encryption(d.get("encryption")),
    )


def _connector_doc(c: Connector) -> dict[str, Any]:
    return {
        "host": c.host,
        "ips": list(c.ips),
        "initiator_iqn": c.initiator_iqn,
        "wwpns": list(c.wwpns),
        "wwnns": list(c.wwnns),
        "nvme_host_nqn": c.nvme_host_nqn,
        "nvme_host_id": c.nvme_host_id,
        "multipath": c.multipath,
        "transports": [t.value for t in c.transports],
        "kernel_iscsi": c.kernel_iscsi,
        "platform": c.platform,
    }


def _connector(d: dict[str, Any]) -> Connector:
    return Connector(
        host=d["host"],
        ips=tuple(d["ips"]),
        initiator_iqn=d["initiator_iqn"],
        wwpns=tuple(d["wwpns"]),
        wwnns=tuple(d["wwnns"]),
        nvme_host_nqn=d["nvme_host_nqn"],
        nvme_host_id=d["nvme_host_id"],
        multipath=d["multipath"],
        transports=tuple(Transport(t) for t in d["transports"]),
        kernel_iscsi=d["kernel_iscsi"],
        platform=d["platform"],
    )


def _connection_doc(c: ConnectionInfo | None) -> dict[str, Any] | None:
    if c is None:
        return None
    t = c.transport
    transport: dict[str, Any]
    if isinstance(t, IscsiConnection):
        transport = {
            "iscsi": {
                "paths": [[p.portal, p.target_iqn, p.lun] for p in t.paths],
                "chap": _chap_doc(t.chap),
                "mutual_chap": _chap_doc(t.mutual_chap),
                "initiator_iqn": t.initiator_iqn,
            }
        }
    elif isinstance(t, RbdConnection):
        transport = {
            "rbd": {
                "pool": t.pool,
                "image": t.image,
                "monitors": list(t.monitors),
                "user": t.user,
                "key": t.key.reveal() if t.key is not None else None,  # as sensitive as the CHAP secrets
                "image_id": t.image_id,
                "cluster_fsid": t.cluster_fsid,
            }
        }
    elif isinstance(t, NvmeofConnection):
        transport = {"nvmeof": _nvmeof_doc(t)}
    else:
        raise TypeError(f"the catalog records iSCSI, RBD and NVMe-oF connection info, not {type(t).__name__}")
    return {
        **transport,
        "volume_id": c.volume_id,
        "attachment_id": c.attachment_id,
        "wwn": c.wwn,
        "serial": c.serial,
        "size_bytes": c.size_bytes,
        "access_mode": c.access_mode.value,
        "discard": c.discard,
        "logical_block_size": c.logical_block_size,
        "physical_block_size": c.physical_block_size,
        "encryption": _encryption_doc(c.encryption),
        "qos": {k: v for k, v in dataclasses.asdict(c.qos).items() if v} if not c.qos.is_empty() else None,
    }


def _nvmeof_doc(t: NvmeofConnection) -> dict[str, Any]:
    def secret(s: Secret | None) -> str | None:
        return None if s is None else s.reveal()

    return {
        "subsystem_nqn": t.subsystem_nqn,
        "portals": [[p.address, p.transport] for p in t.portals],
        "namespace_id": t.namespace_id,
        "namespace_uuid": t.namespace_uuid,
        "namespace_nguid": t.namespace_nguid,
        "host_nqn": t.host_nqn,
        "dhchap_host_secret": secret(t.dhchap_host_secret),
        "dhchap_ctrl_secret": secret(t.dhchap_ctrl_secret),
    }


def _nvmeof(n: dict[str, Any]) -> NvmeofConnection:
    def secret(s: str | None) -> Secret | None:
        return None if s is None else Secret(s)

    return NvmeofConnection(
        subsystem_nqn=n["subsystem_nqn"],
        portals=tuple(NvmeofPortal(p[0], p[1]) for p in n["portals"]),
        namespace_id=n["namespace_id"],
        namespace_uuid=n["namespace_uuid"],
        namespace_nguid=n["namespace_nguid"],
        host_nqn=n["host_nqn"],
        dhchap_host_secret=secret(n["dhchap_host_secret"]),
        dhchap_ctrl_secret=secret(n["dhchap_ctrl_secret"]),
    )


def _connection(d: dict[str, Any] | None) -> ConnectionInfo | None:
    if d is None:
        return None
    transport: IscsiConnection | RbdConnection | NvmeofConnection
    if "rbd" in d:
        r = d["rbd"]
        transport = RbdConnection(
            pool=r["pool"],
            image=r["image"],
            monitors=tuple(r["monitors"]),
            user=r["user"],
            key=Secret(r["key"]) if r["key"] is not None else None,
            image_id=r["image_id"],
            cluster_fsid=r["cluster_fsid"],
        )
    elif "nvmeof" in d:
        transport = _nvmeof(d["nvmeof"])
    else:
        i = d["iscsi"]
        transport = IscsiConnection(
            paths=tuple(IscsiPath(p[0], p[1], p[2]) for p in i["paths"]),
            chap=_chap(i["chap"]),
            mutual_chap=_chap(i["mutual_chap"]),
            initiator_iqn=i["initiator_iqn"],
        )
    return ConnectionInfo(
        transport=transport,
        volume_id=d["volume_id"],
        attachment_id=d["attachment_id"],
        wwn=d["wwn"],
        serial=d["serial"],
        size_bytes=d["size_bytes"],
        access_mode=AccessMode(d["access_mode"]),
        discard=d["discard"],
        logical_block_size=d["logical_block_size"],
        physical_block_size=d["physical_block_size"],
        encryption=_encryption(d.get("encryption")),
        qos=IoTune(**d["qos"]) if d.get("qos") else IoTune(),
    )


def attachment_doc(a: Attachment) -> dict[str, Any]:
    return {
        "id": a.id,
        "volume_id": a.volume_id,
        "connector": _connector_doc(a.connector),
        "access_mode": a.access_mode.value,
        "state": a.state.value,
        "create_time": a.create_time.isoformat(),
        "update_time": a.update_time.isoformat(),
        "connection_info": _connection_doc(a.connection_info),
        "domain": a.domain,
        "target_dev": a.target_dev,
        "host_device": a.host_device,
        "error_message": a.error_message,
        "migration_source_id": a.migration_source_id,
    }


def attachment_from_doc(d: dict[str, Any]) -> Attachment:
    return Attachment(
        id=d["id"],
        volume_id=d["volume_id"],
        connector=_connector(d["connector"]),
        access_mode=AccessMode(d["access_mode"]),
        state=AttachmentState(d["state"]),
        create_time=datetime.fromisoformat(d["create_time"]),
        update_time=datetime.fromisoformat(d["update_time"]),
        connection_info=_connection(d["connection_info"]),
        domain=d["domain"],
        target_dev=d["target_dev"],
        host_device=d["host_device"],
        error_message=d["error_message"],
        migration_source_id=d.get("migration_source_id", ""),
    )


def node_doc(n: StorageNode) -> dict[str, Any]:
    """A node's own row (its backends have theirs)."""
    return {
        "name": n.name,
        "address": n.address,
        "heartbeat": n.heartbeat.isoformat(),
        "start_time": n.start_time.isoformat(),
        "down_after": n.down_after,
    }


def node_from_doc(d: dict[str, Any], backends: tuple[NodeBackend, ...] = ()) -> StorageNode:
    return StorageNode(
        name=d["name"],
        address=d["address"],
        heartbeat=datetime.fromisoformat(d["heartbeat"]),
        start_time=datetime.fromisoformat(d["start_time"]),
        down_after=float(d["down_after"]),
        backends=backends,
    )


def node_backend_doc(b: NodeBackend) -> dict[str, Any]:
    return {
        "name": b.name,
        "node": b.node,
        "kind": b.kind,
        "shared": b.shared,
        "healthy": b.healthy,
        "total_bytes": b.total_bytes,
        "free_bytes": b.free_bytes,
        "provisioned_bytes": b.provisioned_bytes,
        "volume_count": b.volume_count,
        "capabilities": dict(b.capabilities),
        "max_over_subscription_ratio": b.max_over_subscription_ratio,
        "availability_zone": b.availability_zone,
    }


def node_backend_from_doc(d: dict[str, Any]) -> NodeBackend:
    return NodeBackend(
        name=d["name"],
        node=d["node"],
        kind=d["kind"],
        shared=bool(d["shared"]),
        healthy=bool(d["healthy"]),
        total_bytes=int(d["total_bytes"]),
        free_bytes=int(d["free_bytes"]),
        provisioned_bytes=int(d["provisioned_bytes"]),
        volume_count=int(d["volume_count"]),
        capabilities=dict(d.get("capabilities", {})),
        max_over_subscription_ratio=float(d.get("max_over_subscription_ratio", 1.0)),
        availability_zone=str(d.get("availability_zone", "")),
    )


def volume_type_doc(t: VolumeType) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "description": t.description,
        "extra_specs": dict(t.extra_specs),
        "qos_specs_id": t.qos_specs_id,
        "create_time": t.create_time.isoformat(),
        "update_time": t.update_time.isoformat(),
    }


def volume_type_from_doc(d: dict[str, Any]) -> VolumeType:
    return VolumeType(
        id=d["id"],
        name=d["name"],
        description=d["description"],
        extra_specs=d["extra_specs"],
        qos_specs_id=d["qos_specs_id"],
        create_time=datetime.fromisoformat(d["create_time"]),
        update_time=datetime.fromisoformat(d["update_time"]),
    )


def qos_specs_doc(q: QosSpecs) -> dict[str, Any]:
    return {
        "id": q.id,
        "name": q.name,
        "consumer": q.consumer,
        "specs": dict(q.specs),
        "create_time": q.create_time.isoformat(),
        "update_time": q.update_time.isoformat(),
    }


def qos_specs_from_doc(d: dict[str, Any]) -> QosSpecs:
    return QosSpecs(
        id=d["id"],
        name=d["name"],
        consumer=d["consumer"],
        specs=d["specs"],
        create_time=datetime.fromisoformat(d["create_time"]),
        update_time=datetime.fromisoformat(d["update_time"]),
    )
