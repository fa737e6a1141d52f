"""A volume's SCSI identity: the WWN and serial every export of it announces, on every portal.

Both are derived from the volume id (32 lower-case hex digits, random), so they are stable across
exports, exporters and restarts, and the host can check what it reached (STYLE.md rule 7).

* serial (VPD page 0x80): the first 20 hex digits of the volume id. 20 characters is what every disk
  bus accepts as a disk serial (virtio-blk's limit), so the guest sees the same string.
* wwn (VPD page 0x83, NAA IEEE Registered Extended, type 6, 16 bytes), as 32 lower-case hex digits:
  ``6`` + the 24-bit IEEE company id (`naa_oui`, 6 hex digits) + the serial (20 hex digits) + ``00000``.
  A Linux initiator prefers this designator over every other one tgt or LIO send (scsi_vpd_lun_id:
  NAA-6 has the highest priority after a LUN-associated SCSI name string, which neither sends), so
  ``/sys/block/sdX/device/wwid`` reads ``naa.<wwn>`` and udev's ID_SERIAL is ``3<wwn>``.

How each exporter is made to announce exactly this:

* tgt: the NAA-6 designator is built from the logical unit's ``scsi_id`` parameter, one hex digit per
  character, right-aligned in 128 bits, top nibble forced to 6 (usr/spc.c update_vpd_83). Setting
  ``scsi_id=<wwn>`` (32 hex digits) makes the designator equal the wwn; ``scsi_sn=<serial>`` sets
  VPD 0x80. tgt also sends a T10 vendor id designator (the same 32 characters, ASCII) and an NAA-3
  (locally assigned) designator made of the tid and LUN, both of lower priority for Linux.
* LIO: the NAA-6 designator is ``6`` + the device's company_id (default 0x001405) + the hex digits of
  the unit serial, non-hex characters skipped, at most 25, zero-filled (target_core_spc.c
  spc_gen_naa_6h_vendor_specific). Setting ``wwn/vpd_unit_serial=<serial>`` (rtslib:
  ``StorageObject.wwn``) gives ``6`` + company_id + serial + ``00000``: the same value as tgt's, as
  long as the company id equals `naa_oui` (the LIO exporter writes ``wwn/company_id`` when the kernel
  has it, and refuses to export otherwise).

The default `naa_oui` is 001405, the company id LIO itself uses; an operator with an own IEEE OUI
configures it.

NVMe namespaces (the `nvmet` exporter) have no WWN or VPD pages; a host identifies a namespace by its
NGUID and UUID (Identify Namespace and its Namespace Identification Descriptor list; Linux shows them
in ``/sys/block/nvmeXnY/nguid`` and ``.../uuid``, and ``wwid`` reads ``uuid.<uuid>`` when a UUID is
set). Both are derived from the volume id (32 hex digits), like the WWN:

* uuid: the volume id itself, written as a UUID (8-4-4-4-12): the volume ids are random version-4
  UUIDs, so this is a valid RFC 4122 UUID, unique, and whoever reads it sees the volume id.
* nguid (16 bytes, as 32 lower-case hex digits in the order Identify Namespace returns them): the
  NVMe layout is a 64-bit vendor specific extension identifier followed by an EUI-64 (the 24-bit IEEE
  company id, then a 40-bit extension identifier). blockwire fills it with the first 16 hex digits of
  the volume id, the company id `naa_oui` (as in the WWN), and the next 10 hex digits of the volume id:
  ``vid[0:16] + naa_oui + vid[16:26]``; 104 bits of the volume id keep it unique.
* serial: the subsystem's serial number (Identify Controller SN, 20 characters at most) is the
  volume's serial, so ``nvme list`` shows the same serial as a SCSI export does.

A subsystem carries one volume (one subsystem per volume, see `subsystem_nqn`), so its namespace id
is always 1.
"""

from __future__ import annotations

import uuid

SERIAL_DIGITS = 20
WWN_DIGITS = 32
NGUID_DIGITS = 32
NVME_NAMESPACE_ID = 1


def serial_for(volume_id: str) -> str:
    return volume_id[:SERIAL_DIGITS]


def wwn_for(volume_id: str, naa_oui: str) -> str:
    serial = serial_for(volume_id)
    wwn = f"6{naa_oui}{serial}".ljust(WWN_DIGITS, "0")
    assert len(wwn) == WWN_DIGITS, wwn
    return wwn


def target_iqn(prefix: str, volume_id: str) -> str:
    """The target name of a volume's export: one target per volume."""
    return f"{prefix}:{volume_id}"


def namespace_uuid(volume_id: str) -> str:
    """The NVMe namespace UUID of a volume: its id as a UUID (8-4-4-4-12, lower case)."""
    return str(uuid.UUID(hex=_hex_id(volume_id)))


def namespace_nguid(volume_id: str, naa_oui: str) -> str:
    """The NVMe namespace NGUID of a volume, 32 lower-case hex digits: vid[0:16] + oui + vid[16:26]."""
    vid = _hex_id(volume_id)
    nguid = f"{vid[:16]}{naa_oui}{vid[16:26]}"
    assert len(nguid) == NGUID_DIGITS, nguid
    return nguid


def subsystem_nqn(prefix: str, volume_id: str) -> str:
    """The NVMe subsystem name of a volume's export: one subsystem per volume."""
    return f"{prefix}:{volume_id}"


def _hex_id(volume_id: str) -> str:
    vid = volume_id.lower()
    if len(vid) != 32 or any(c not in "0123456789abcdef" for c in vid):
        raise ValueError(f"volume id {volume_id!r} is not 32 hex digits; no NVMe identity can be derived")
    return vid
