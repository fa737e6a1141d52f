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

A volume on an rbd backend has no LUN: its identity is the RBD image's id (librbd's ``image.id()``),
read from the cluster when an attachment is made and announced in ``RbdConnection.image_id`` with the
cluster's fsid. An image removed and created again under the same name gets another id, so a host that
checks the id before its hot-plug never opens an image it was not given (storagesvc/backends/rbd.py).
The wwn and serial above are announced too (the serial is the guest's disk serial).

The default `naa_oui` is 001405, the company id LIO itself uses; an operator with an own IEEE OUI
configures it.
"""

from __future__ import annotations

SERIAL_DIGITS = 20
WWN_DIGITS = 32


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
