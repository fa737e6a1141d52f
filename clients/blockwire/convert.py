"""The v1 messages <-> `blockwire.model` dataclasses, for the shared wire-level types.

Both services' rpc/ layers and the SDK use these; service-specific messages (Volume, Attachment, ...)
are converted in each service's own rpc/convert.py. Imports protobuf messages only, never grpc.
Validation of content (IQN syntax, portals) is not done here: see `blockwire.validate`.
"""

from __future__ import annotations

from blockwire import model
from blockwire.errors import InvalidArgument
from blockwire.secret import Secret
from blockwire.v1 import types_pb2 as pb

_TRANSPORTS = {
    pb.TRANSPORT_ISCSI: model.Transport.ISCSI,
    pb.TRANSPORT_FC: model.Transport.FC,
    pb.TRANSPORT_NVME_TCP: model.Transport.NVME_TCP,
    pb.TRANSPORT_RBD: model.Transport.RBD,
    pb.TRANSPORT_LOCAL: model.Transport.LOCAL,
}
_TRANSPORTS_PB = {v: k for k, v in _TRANSPORTS.items()}
_MODES = {
    pb.ACCESS_MODE_READ_WRITE: model.AccessMode.READ_WRITE,
    pb.ACCESS_MODE_READ_ONLY: model.AccessMode.READ_ONLY,
}
_MODES_PB = {v: k for k, v in _MODES.items()}


def transport_from_pb(value: int, field: str = "transport") -> model.Transport:
    try:
        return _TRANSPORTS[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(field, f"unknown transport {value}") from None


def transport_to_pb(value: model.Transport) -> pb.Transport.ValueType:
    return _TRANSPORTS_PB[value]


def access_mode_from_pb(value: int, field: str = "access_mode") -> model.AccessMode:
    """UNSPECIFIED means READ_WRITE."""
    if value == pb.ACCESS_MODE_UNSPECIFIED:
        return model.AccessMode.READ_WRITE
    try:
        return _MODES[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(field, f"unknown access mode {value}") from None


def access_mode_to_pb(value: model.AccessMode) -> pb.AccessMode.ValueType:
    return _MODES_PB[value]


def connector_from_pb(m: pb.Connector, field: str = "connector") -> model.Connector:
    return model.Connector(
        host=m.host,
        ips=tuple(m.ips),
        initiator_iqn=m.initiator_iqn,
        wwpns=tuple(m.wwpns),
        wwnns=tuple(m.wwnns),
        nvme_host_nqn=m.nvme_host_nqn,
        nvme_host_id=m.nvme_host_id,
        multipath=m.multipath,
        transports=tuple(transport_from_pb(t, f"{field}.transports") for t in m.transports),
        kernel_iscsi=m.kernel_iscsi,
        platform=m.platform,
    )


def connector_to_pb(c: model.Connector) -> pb.Connector:
    return pb.Connector(
        host=c.host,
        ips=list(c.ips),
        initiator_iqn=c.initiator_iqn,
        wwpns=list(c.wwpns),
        wwnns=list(c.wwnns),
        nvme_host_nqn=c.nvme_host_nqn,
        nvme_host_id=c.nvme_host_id,
        multipath=c.multipath,
        transports=[transport_to_pb(t) for t in c.transports],
        kernel_iscsi=c.kernel_iscsi,
        platform=c.platform,
    )


def _chap_from_pb(m: pb.ChapCredentials) -> model.Chap:
    return model.Chap(username=m.username, password=Secret(m.password))


def _chap_to_pb(c: model.Chap) -> pb.ChapCredentials:
    return pb.ChapCredentials(username=c.username, password=c.password.reveal())


def iotune_from_pb(m: pb.IoTune) -> model.IoTune:
    return model.IoTune(
        total_bytes_sec=m.total_bytes_sec,
        read_bytes_sec=m.read_bytes_sec,
        write_bytes_sec=m.write_bytes_sec,
        total_iops_sec=m.total_iops_sec,
        read_iops_sec=m.read_iops_sec,
        write_iops_sec=m.write_iops_sec,
        total_bytes_sec_max=m.total_bytes_sec_max,
        total_iops_sec_max=m.total_iops_sec_max,
        size_iops_sec=m.size_iops_sec,
        group_name=m.group_name,
    )


def iotune_to_pb(t: model.IoTune) -> pb.IoTune:
    return pb.IoTune(
        total_bytes_sec=t.total_bytes_sec,
        read_bytes_sec=t.read_bytes_sec,
        write_bytes_sec=t.write_bytes_sec,
        total_iops_sec=t.total_iops_sec,
        read_iops_sec=t.read_iops_sec,
        write_iops_sec=t.write_iops_sec,
        total_bytes_sec_max=t.total_bytes_sec_max,
        total_iops_sec_max=t.total_iops_sec_max,
        size_iops_sec=t.size_iops_sec,
        group_name=t.group_name,
    )


def _transport_from_pb(m: pb.ConnectionInfo, field: str) -> model.TransportInfo:
    which = m.WhichOneof("transport")
    if which == "iscsi":
        i = m.iscsi
        return model.IscsiConnection(
            paths=tuple(model.IscsiPath(p.portal, p.target_iqn, p.lun) for p in i.paths),
            chap=_chap_from_pb(i.chap) if i.HasField("chap") else None,
            mutual_chap=_chap_from_pb(i.mutual_chap) if i.HasField("mutual_chap") else None,
            initiator_iqn=i.initiator_iqn,
        )
    if which == "fc":
        return model.FcConnection(
            target_wwpns=tuple(m.fc.target_wwpns),
            lun=m.fc.lun,
            initiator_target_map={k: tuple(v.wwpns) for k, v in m.fc.initiator_target_map.items()},
        )
    if which == "nvmeof":
        n = m.nvmeof
        return model.NvmeofConnection(
            subsystem_nqn=n.subsystem_nqn,
            portals=tuple(model.NvmeofPortal(p.address, p.transport or "tcp") for p in n.portals),
            namespace_uuid=n.namespace_uuid,
            namespace_id=n.namespace_id,
            namespace_nguid=n.namespace_nguid,
            host_nqn=n.host_nqn,
            dhchap_host_secret=Secret(n.dhchap_host_secret) if n.dhchap_host_secret else None,
            dhchap_ctrl_secret=Secret(n.dhchap_ctrl_secret) if n.dhchap_ctrl_secret else None,
        )
    if which == "rbd":
        r = m.rbd
        return model.RbdConnection(
            pool=r.pool,
            image=r.image,
            monitors=tuple(r.monitors),
            user=r.user,
            key=Secret(r.key) if r.key else None,
            image_id=r.image_id,
            cluster_fsid=r.cluster_fsid,
        )
    if which == "local":
        return model.LocalConnection(path=m.local.path)
    raise InvalidArgument(field, "no transport set (one of iscsi, fc, nvmeof, rbd, local)")


def connection_info_from_pb(m: pb.ConnectionInfo, field: str = "connection_info") -> model.ConnectionInfo:
    return model.ConnectionInfo(
        transport=_transport_from_pb(m, field),
        volume_id=m.volume_id,
        attachment_id=m.attachment_id,
        wwn=m.wwn,
        serial=m.serial,
        size_bytes=m.size_bytes,
        access_mode=access_mode_from_pb(m.access_mode, f"{field}.access_mode"),
        discard=m.discard,
        logical_block_size=m.logical_block_size or 512,
        physical_block_size=m.physical_block_size or m.logical_block_size or 512,
        qos=iotune_from_pb(m.qos),
        multiattach=m.multiattach,
        encryption=encryption_from_pb(m.encryption) if m.HasField("encryption") else None,
    )


_ENCRYPTION_FORMATS = {pb.ENCRYPTION_FORMAT_LUKS: "luks"}


def encryption_from_pb(m: pb.Encryption) -> model.Encryption:
    """An unknown or unspecified format is kept as "" (validation refuses it, naming the field)."""
    return model.Encryption(
        cipher=m.cipher,
        key_size_bits=m.key_size_bits,
        key_ref=m.key_ref,
        passphrase=Secret(m.passphrase) if m.passphrase else None,
        header_bytes=m.header_bytes,
        format=_ENCRYPTION_FORMATS.get(m.format, ""),
    )


def _put_encryption(m: pb.ConnectionInfo, e: model.Encryption | None, with_secrets: bool) -> None:
    if e is not None:
        m.encryption.CopyFrom(encryption_to_pb(e, with_secrets=with_secrets))


def encryption_to_pb(e: model.Encryption, *, with_secrets: bool = True) -> pb.Encryption:
    m = pb.Encryption(
        format=pb.ENCRYPTION_FORMAT_LUKS if e.format == "luks" else pb.ENCRYPTION_FORMAT_UNSPECIFIED,
        cipher=e.cipher,
        key_size_bits=e.key_size_bits,
        key_ref=e.key_ref,
        header_bytes=e.header_bytes,
    )
    if e.passphrase is not None and with_secrets:
        m.passphrase = e.passphrase.reveal()
    return m


def connection_info_to_pb(c: model.ConnectionInfo, *, with_secrets: bool = True) -> pb.ConnectionInfo:
    """`with_secrets=False` leaves CHAP passwords and keys out (listings)."""
    m = pb.ConnectionInfo(
        volume_id=c.volume_id,
        attachment_id=c.attachment_id,
        wwn=c.wwn,
        serial=c.serial,
        size_bytes=c.size_bytes,
        access_mode=access_mode_to_pb(c.access_mode),
        discard=c.discard,
        logical_block_size=c.logical_block_size,
        physical_block_size=c.physical_block_size,
        qos=iotune_to_pb(c.qos),
        multiattach=c.multiattach,
    )
    _put_encryption(m, c.encryption, with_secrets)
    t = c.transport
    if isinstance(t, model.IscsiConnection):
        m.iscsi.paths.extend(
            pb.IscsiPath(portal=p.portal, target_iqn=p.target_iqn, lun=p.lun) for p in t.paths
        )
        m.iscsi.initiator_iqn = t.initiator_iqn
        for name, chap in (("chap", t.chap), ("mutual_chap", t.mutual_chap)):
            if chap is not None:
                dst = getattr(m.iscsi, name)
                dst.username = chap.username
                if with_secrets:
                    dst.password = chap.password.reveal()
    elif isinstance(t, model.FcConnection):
        m.fc.target_wwpns.extend(t.target_wwpns)
        m.fc.lun = t.lun
        for k, v in t.initiator_target_map.items():
            m.fc.initiator_target_map[k].wwpns.extend(v)
    elif isinstance(t, model.NvmeofConnection):
        m.nvmeof.subsystem_nqn = t.subsystem_nqn
        m.nvmeof.portals.extend(pb.NvmeofPortal(address=p.address, transport=p.transport) for p in t.portals)
        m.nvmeof.namespace_uuid = t.namespace_uuid
        m.nvmeof.namespace_id = t.namespace_id
        m.nvmeof.namespace_nguid = t.namespace_nguid
        m.nvmeof.host_nqn = t.host_nqn
        for name in ("dhchap_host_secret", "dhchap_ctrl_secret"):
            secret = getattr(t, name)
            if secret is not None and with_secrets:
                setattr(m.nvmeof, name, secret.reveal())
    elif isinstance(t, model.RbdConnection):
        m.rbd.pool, m.rbd.image, m.rbd.user = t.pool, t.image, t.user
        m.rbd.monitors.extend(t.monitors)
        m.rbd.image_id, m.rbd.cluster_fsid = t.image_id, t.cluster_fsid
        if t.key is not None and with_secrets:
            m.rbd.key = t.key.reveal()
    else:
        m.local.path = t.path
    return m
