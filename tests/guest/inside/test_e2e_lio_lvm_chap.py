"""End to end through blockwire's daemons (kernel initiator): the `lvm-thin` backend (a loop-backed VG
with a thin pool made here) exported by the `lio` exporter (configfs, CHAP, per-initiator ACL) on two
portals. The agent logs in with the CHAP credentials storage issued; the rest is the two-path scenario
of test_e2e_tgt_multipath.py (hot-plug, data in the thin LV, a path lost and back, detach, nothing
left, volume deleted), then the LIO target and storage object are gone too.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack, start_stack, two_paths_scenario
from tests.guest.inside.kernel import MiB, run
from tests.host import libiscsi

PORTALS = ("127.0.0.1:3263", "127.0.0.2:3263")  # LIO's own; tgtd holds 3260
LIO = Path("/sys/kernel/config/target")


@pytest.fixture(scope="module")
def thin_vg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A VG on a loop device with a thin pool `pool`; removed afterwards."""
    if not (LIO / "iscsi").is_dir():
        run(["modprobe", "-a", "target_core_mod", "iscsi_target_mod", "target_core_iblock"])
    assert LIO.is_dir(), "LIO (configfs /sys/kernel/config/target) is not available in the guest"
    image = tmp_path_factory.mktemp("thin") / "pv.img"
    with image.open("wb") as f:
        f.truncate(512 * MiB)
    loop = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    vg = f"bwe2e{uuid.uuid4().hex[:8]}"
    try:
        run(["pvcreate", "-q", "-y", loop])
        run(["vgcreate", "-q", vg, loop])
        run(["lvcreate", "-q", "-y", "-L", "256m", "-T", f"{vg}/pool"])
        yield vg
    finally:
        run(["vgremove", "-q", "-y", "-f", vg], ok=(0, 5))
        run(["pvremove", "-q", "-y", loop], ok=(0, 5))
        run(["losetup", "-d", loop], ok=(0, 1))


@pytest.fixture(scope="module")
def lio_stack(thin_vg: str, libvirtd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    portals = ", ".join(f'"{p}"' for p in PORTALS)
    stack = start_stack(
        tmp_path_factory.mktemp("stack-lio"),
        f'[[backends]]\nname = "thin"\nkind = "lvm-thin"\nvg = "{thin_vg}"\npool = "pool"\nexporter = "lio"\n'
        f'oversubscription_ratio = 2.0\n[exporters.lio]\nkind = "lio"\nportals = [{portals}]\n',
    )
    yield stack
    stack.stop()


def test_lio_lvm_thin_chap_two_paths_hotplug_path_loss_and_return_then_nothing_left(
    clean_host: None, lio_stack: Stack, thin_vg: str, domain: str
) -> None:
    iqn, timings = two_paths_scenario(
        lio_stack,
        domain,
        backend="thin",
        backing=lambda vid: Path(f"/dev/{thin_vg}/vol-{vid}"),
        portals=PORTALS,
    )
    assert not (LIO / "iscsi" / iqn).exists()
    assert not list((LIO / "core").glob(f"*/bw-{iqn.rpartition(':')[2]}"))
    lvs = run(["lvs", "--noheadings", "-o", "lv_name", thin_vg]).stdout.split()
    assert lvs == ["pool"], lvs
    print(f"timings (s): {timings}")


def test_the_export_requires_chap(lio_stack: Stack, clean_host: None) -> None:
    """The agent's attach used CHAP because LIO requires it: this host's login without credentials, or
    with a wrong secret, is refused on every portal; with the announced ones it is accepted. (The logins
    are libiscsi's: tests/host/libiscsi.py says why refused logins stay out of this kernel.)"""
    s = lio_stack
    vol = s.storage.create_volume(f"e2e-nochap-{uuid.uuid4().hex[:6]}", 16 * MiB, backend="thin")
    connector = s.agent.get_connector()
    export = s.storage.create_attachment(vol.id, connector)
    try:
        ci = export.connection_info
        chap = ci.iscsi.chap
        assert chap.username
        assert chap.password
        for path in ci.iscsi.paths:
            libiscsi.refused(connector.initiator_iqn, libiscsi.url(path))
            wrong = libiscsi.url(path, chap.username, "wrong-secret-16c")
            assert "Authentication failure" in libiscsi.refused(connector.initiator_iqn, wrong)
            libiscsi.accepted(connector.initiator_iqn, libiscsi.url(path, chap.username, chap.password))
        assert kernel.sessions() == []  # nothing went through the kernel initiator
    finally:
        s.storage.delete_attachment(export.id)
        s.storage.delete_volume(vol.id)
