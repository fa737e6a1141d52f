"""Cinder's `connection_info` -> the typed `ConnectionInfo`: the way in for a deployment that keeps Cinder.

Cinder's volume drivers answer `initialize_connection` with a dict, `{"driver_volume_type": ..., "data":
{...}}`, which Nova keeps in the block device mapping and hands to os-brick. This module reads the shapes the
drivers produce (LVM with tgt or LIO, RBD, NVMe-oF in the old and the new "portals" form, Fibre Channel) and
returns the `ConnectionInfo` blockwire's connectors take, checked by the same wire rules
(`blockwire.validate`) as connection info from blockwire's own storage service.

Nothing is dropped silently: every key is either converted, or known and deliberately not needed (listed in
`_IGNORED` with the reason), or refused as INVALID_ARGUMENT naming it. What blockwire cannot honour is
FAILED_PRECONDITION (an encrypted volume, an RBD volume whose cephx key Cinder did not pass).

Cinder announces no LUN identity (no WWN, no VPD serial): an attach of converted connection info is
unverified and needs `allow_unverified_identity`, as for any connection info without identity.
"""

from __future__ import annotations

import configparser
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from blockwire import validate
from blockwire.errors import FailedPrecondition, InvalidArgument
from blockwire.model import (
    AccessMode,
    Chap,
    ConnectionInfo,
    FcConnection,
    IoTune,
    IscsiConnection,
    IscsiPath,
    NvmeofConnection,
    NvmeofPortal,
    RbdConnection,
    TransportInfo,
)
from blockwire.secret import Secret

FIELD = "cinder_connection_info"

_TOP = frozenset({"driver_volume_type", "data", "serial", "multipath_id", "connector", "volume_id"})
"""Top-level keys Nova's block device mapping may carry; only driver_volume_type and data are used
(`serial` and `volume_id` repeat data.volume_id; `multipath_id` and `connector` are os-brick's own notes)."""

_COMMON = frozenset({"volume_id", "access_mode", "qos_specs", "discard", "encrypted"})

_IGNORED: Mapping[str, str] = {
    "target_discovered": "blockwire logs in to the given portals directly, without a discovery",
    "discovery_auth_method": "no discovery session is made",
    "discovery_auth_username": "no discovery session is made",
    "discovery_auth_password": "no discovery session is made",
    "cacheable": "the host cache mode is a disk option (DiskOptions.cache)",
    "cluster_name": "the monitors are given; the cluster's name is not needed to reach them",
    "secret_type": "blockwire defines its own private libvirt secret per attachment",
    "secret_uuid": "blockwire defines its own private libvirt secret per attachment",
    "auth_enabled": "the cephx user and key say it",
    "transport_type": "read with target_portal (old NVMe-oF form)",
    "device_path": "a path on the storage host, not this one",
    "multipath_id": "os-brick's note of the map it built",
}

_KNOWN: Mapping[str, frozenset[str]] = {
    "iscsi": _COMMON
    | {
        "target_portal",
        "target_iqn",
        "target_lun",
        "target_portals",
        "target_iqns",
        "target_luns",
        "auth_method",
        "auth_username",
        "auth_password",
        "logical_block_size",
        "physical_block_size",
    },
    "rbd": _COMMON | {"name", "hosts", "ports", "auth_username", "keyring"},
    "nvmeof": _COMMON
    | {"target_nqn", "nqn", "portals", "target_portal", "target_port", "vol_uuid", "volume_nguid", "ns_id"}
    | {"host_nqn"},
    "fibre_channel": _COMMON | {"target_wwn", "target_wwns", "target_lun", "initiator_target_map"},
}

_ACCESS = {"rw": AccessMode.READ_WRITE, "ro": AccessMode.READ_ONLY}
_QOS = frozenset(f.name for f in fields(IoTune))


def connection_info_from_cinder(doc: Mapping[str, Any], field: str = FIELD) -> ConnectionInfo:
    """The typed connection info for a Cinder `connection_info` dict; raises InvalidArgument naming the key
    that is missing, malformed or unknown, and FailedPrecondition for what blockwire cannot honour."""
    if not isinstance(doc, Mapping):
        raise InvalidArgument(field, "a JSON object with driver_volume_type and data")
    _no_unknown(doc.keys(), _TOP, field)
    kind = str(doc.get("driver_volume_type"))
    if kind not in _KNOWN:
        raise InvalidArgument(
            f"{field}.driver_volume_type", f"{validate.quote(str(kind))}: one of {', '.join(sorted(_KNOWN))}"
        )
    data = doc.get("data")
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{field}.data", "required: a JSON object")
    where = f"{field}.data"
    _no_unknown(data.keys(), _KNOWN[kind] | _IGNORED.keys(), where)
    if _bool(data, "encrypted", where):
        raise FailedPrecondition(
            f"volume {data.get('volume_id', '')} is encrypted by Cinder; blockwire does not decrypt Cinder's "
            "encrypted volumes: attach it through Nova's own encryptors"
        )
    transport = _TRANSPORTS[kind](data, where)
    info = ConnectionInfo(
        transport=transport,
        volume_id=_str(data, "volume_id", where) or _str(data, "vol_uuid", where),  # nvmeof: only vol_uuid
        access_mode=_access(data, where),
        discard=_bool(data, "discard", where),
        qos=_qos(data.get("qos_specs"), f"{where}.qos_specs"),
        logical_block_size=_int(data, "logical_block_size", where) or 512,
        physical_block_size=_int(data, "physical_block_size", where)
        or _int(data, "logical_block_size", where)
        or 512,
    )
    return validate.validate_connection_info(info, field)


def _iscsi(data: Mapping[str, Any], where: str) -> IscsiConnection:
    if "target_portals" in data or "target_iqns" in data or "target_luns" in data:
        portals = _str_list(data, "target_portals", where)
        iqns = _str_list(data, "target_iqns", where)
        luns = _int_list(data, "target_luns", where)
        if not (len(portals) == len(iqns) == len(luns)) or not portals:
            raise InvalidArgument(
                f"{where}.target_portals",
                f"target_portals, target_iqns and target_luns must be equally long lists ({len(portals)}, "
                f"{len(iqns)}, {len(luns)})",
            )
        paths = tuple(IscsiPath(p, q, n) for p, q, n in zip(portals, iqns, luns, strict=True))
    else:
        for key in ("target_portal", "target_iqn", "target_lun"):
            if key not in data:
                raise InvalidArgument(
                    f"{where}.{key}", "required (or target_portals, target_iqns, target_luns)"
                )
        paths = (
            IscsiPath(_str(data, "target_portal", where), _str(data, "target_iqn", where), _lun(data, where)),
        )
    method = data.get("auth_method")
    chap = None
    if method not in (None, "", "None"):
        if str(method).upper() != "CHAP":
            raise InvalidArgument(f"{where}.auth_method", f"{validate.quote(str(method))}: only CHAP")
        chap = Chap(_str(data, "auth_username", where, required=True), _secret(data, "auth_password", where))
    elif data.get("auth_username") or data.get("auth_password"):
        raise InvalidArgument(
            f"{where}.auth_method", "auth_username/auth_password given without auth_method CHAP"
        )
    return IscsiConnection(paths=paths, chap=chap)


def _rbd(data: Mapping[str, Any], where: str) -> RbdConnection:
    name = _str(data, "name", where, required=True)
    pool, sep, image = name.partition("/")
    if not sep:
        raise InvalidArgument(f"{where}.name", f"{validate.quote(name)} is not pool/image")
    hosts = _str_list(data, "hosts", where)
    ports = _str_list(data, "ports", where) if "ports" in data else ["6789"] * len(hosts)
    if len(hosts) != len(ports) or not hosts:
        raise InvalidArgument(
            f"{where}.hosts", f"hosts and ports must be equally long lists ({len(hosts)}, {len(ports)})"
        )
    monitors = tuple(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
    user = _str(data, "auth_username", where)
    keyring = data.get("keyring")
    if not keyring:
        raise FailedPrecondition(
            f"the rbd connection info of volume {data.get('volume_id', '')} carries no cephx key (Nova "
            "defines the libvirt secret from its own rbd_secret_uuid); set rbd_keyring_conf in Cinder so "
            "the key is passed, or attach the volume through blockwire's storage service"
        )
    return RbdConnection(
        pool=pool, image=image, monitors=monitors, user=user, key=_keyring_key(keyring, user, where)
    )


def _keyring_key(keyring: Any, user: str, where: str) -> Secret:
    """The key of `client.<user>` in a keyring file's text (what Cinder's rbd_keyring_conf passes)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(str(keyring))
    except configparser.Error:
        raise InvalidArgument(f"{where}.keyring", "not a Ceph keyring (INI sections with a key)") from None
    section = f"client.{user or 'admin'}"
    if not parser.has_option(section, "key"):
        raise InvalidArgument(f"{where}.keyring", f"has no key for {section}")
    return Secret(parser.get(section, "key").strip())


def _nvmeof(data: Mapping[str, Any], where: str) -> NvmeofConnection:
    if "portals" in data:  # the new form: [[address, port, transport], ...]
        raw = data["portals"]
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise InvalidArgument(f"{where}.portals", "a non-empty list of [address, port, transport]")
        portals = []
        for i, p in enumerate(raw):
            if not isinstance(p, Sequence) or isinstance(p, str) or len(p) != 3:
                raise InvalidArgument(f"{where}.portals[{i}]", "[address, port, transport]")
            address, port, transport = (str(x) for x in p)
            portals.append(
                NvmeofPortal(_join(address, port), _nvme_transport(transport, f"{where}.portals[{i}]"))
            )
        nqn = _str(data, "target_nqn", where, required=True)
    else:  # the old form: one portal
        address = _str(data, "target_portal", where, required=True)
        port = str(_int(data, "target_port", where) or 4420)
        portals = [
            NvmeofPortal(_join(address, port), _nvme_transport(str(data.get("transport_type", "tcp")), where))
        ]
        nqn = _str(data, "nqn", where, required=True)
    return NvmeofConnection(
        subsystem_nqn=nqn,
        portals=tuple(portals),
        namespace_uuid=_str(data, "vol_uuid", where),
        namespace_id=_int(data, "ns_id", where),
        namespace_nguid=_str(data, "volume_nguid", where).replace("-", "").lower(),
        host_nqn=_str(data, "host_nqn", where),
    )


def _fc(data: Mapping[str, Any], where: str) -> FcConnection:
    key = "target_wwn" if "target_wwn" in data else "target_wwns"
    raw = data.get(key)
    wwpns = [raw] if isinstance(raw, str) else _str_list(data, key, where)
    itmap = data.get("initiator_target_map") or {}
    if not isinstance(itmap, Mapping):
        raise InvalidArgument(f"{where}.initiator_target_map", "an object of initiator WWPN -> target WWPNs")
    return FcConnection(
        target_wwpns=tuple(_wwpn(w) for w in wwpns),
        lun=_lun(data, where),
        initiator_target_map={_wwpn(k): tuple(_wwpn(t) for t in v) for k, v in itmap.items()},
    )


_TRANSPORTS: Mapping[str, Callable[[Mapping[str, Any], str], TransportInfo]] = {
    "iscsi": _iscsi,
    "rbd": _rbd,
    "nvmeof": _nvmeof,
    "fibre_channel": _fc,
}


# -- the pieces


def _no_unknown(keys: Any, known: Any, where: str) -> None:
    unknown = sorted(str(k) for k in keys if k not in known)
    if unknown:
        raise InvalidArgument(
            where,
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (not converted, not ignored)",
        )


def _str(data: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise InvalidArgument(f"{where}.{key}", "required")
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}.{key}", "a string")
    return value


def _secret(data: Mapping[str, Any], key: str, where: str) -> Secret:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{where}.{key}", "required with auth_method CHAP")
    return Secret(value)


def _int(data: Mapping[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise InvalidArgument(f"{where}.{key}", "a non-negative integer")
    return int(value)


def _lun(data: Mapping[str, Any], where: str) -> int:
    if data.get("target_lun") is None:
        raise InvalidArgument(f"{where}.target_lun", "required")
    return _int(data, "target_lun", where)


def _bool(data: Mapping[str, Any], key: str, where: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}.{key}", "true or false")
    return value


def _str_list(data: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, str | int) and not isinstance(v, bool) for v in value
    ):
        raise InvalidArgument(f"{where}.{key}", "a list of strings")
    return [str(v) for v in value]


def _int_list(data: Mapping[str, Any], key: str, where: str) -> list[int]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidArgument(f"{where}.{key}", "a list of integers")
    return list(value)


def _access(data: Mapping[str, Any], where: str) -> AccessMode:
    mode = data.get("access_mode") or "rw"
    if mode not in _ACCESS:
        raise InvalidArgument(f"{where}.access_mode", f"{validate.quote(str(mode))}: rw or ro")
    return _ACCESS[mode]


def _qos(specs: Any, where: str) -> IoTune:
    if not specs:
        return IoTune()
    if not isinstance(specs, Mapping):
        raise InvalidArgument(where, "an object of libvirt iotune names -> values")
    _no_unknown(specs.keys(), _QOS, where)
    values: dict[str, Any] = {}
    for key in specs:
        if key == "group_name":
            values[key] = _str(specs, key, where)
        else:
            values[key] = _int(specs, key, where)
    return IoTune(**values)


def _join(address: str, port: str) -> str:
    return f"[{address}]:{port}" if ":" in address and not address.startswith("[") else f"{address}:{port}"


def _nvme_transport(value: str, where: str) -> str:
    if value not in validate.NVME_TRANSPORTS:
        raise InvalidArgument(
            f"{where}.transport", f"{validate.quote(value)}: one of {', '.join(validate.NVME_TRANSPORTS)}"
        )
    return value


def _wwpn(value: Any) -> str:
    return str(value).lower().replace(":", "")
