"""The rbd backend against FakeRbd (its RbdSession seam), and RBD attachments in the StorageService."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from blockwire.model import AccessMode, Connector, RbdConnection, Transport
from blockwire.secret import Secret
from storagesvc.backends.base import DirectBackend, ImageInfo, Space
from storagesvc.backends.rbd import (
    RbdBackend,
    RbdSettings,
    host_caps,
    mon_host,
    monitor_addresses,
    monitors_from_conf,
    read_key,
)
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.config import ConfigError, parse
from storagesvc.encryption import VolumeCrypt
from storagesvc.keys.embedded import EmbeddedKeys
from storagesvc.model import CreateVolumeSpec, ImageSource, VolumeSource, VolumeState
from storagesvc.placement import own_capabilities
from storagesvc.service import Pool, StorageService
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.jobs import InlineJobs
from tests.fakes.rbd import FSID, FakeRbd

MIB = 1 << 20
KEY = "AQCNIg1rxs9zDBAA3fnGKYdo5OPUhq9jg+u+fA=="
SETTINGS = RbdSettings(pool="rbd", monitors=("127.0.0.1:6789",), user="storage", key=Secret(KEY))


@pytest.fixture
def fake() -> FakeRbd:
    return FakeRbd()


@pytest.fixture
def backend(fake: FakeRbd) -> RbdBackend:
    return RbdBackend("ceph", SETTINGS, fake, FakeRunner())


def progress_log() -> tuple[list[tuple[int, int]], object]:
    seen: list[tuple[int, int]] = []
    return seen, lambda done, total: seen.append((done, total))


# -- volumes


def test_create_delete_exists_and_a_repeated_delete(backend: RbdBackend, fake: FakeRbd) -> None:
    backend.create("v1", 4 * MIB)
    assert backend.exists("v1")
    assert fake.images["volume-v1"].size == 4 * MIB
    backend.extend("v1", 8 * MIB)
    assert fake.images["volume-v1"].size == 8 * MIB
    backend.delete("v1")
    backend.delete("v1")
    assert not backend.exists("v1")
    with pytest.raises(NotFound):
        backend.extend("v1", 16 * MIB)


def test_snapshot_then_a_volume_from_it_is_a_clone_of_the_protected_snapshot(
    backend: RbdBackend, fake: FakeRbd
) -> None:
    backend.create("v1", 4 * MIB)
    backend.snapshot("v1", "s1")
    assert fake.images["volume-v1"].snaps == {"snapshot-s1": False}  # protected only when cloned
    backend.create_from_snapshot("s1", "v2", 8 * MIB)
    assert fake.images["volume-v1"].snaps == {"snapshot-s1": True}
    assert fake.images["volume-v2"].parent is not None
    assert fake.images["volume-v2"].size == 8 * MIB
    # deleting the snapshot flattens its clone first, then removes it (and its pool metadata)
    backend.delete_snapshot("s1")
    assert fake.images["volume-v2"].parent is None
    assert fake.images["volume-v1"].snaps == {}
    assert fake.meta == {}
    backend.delete_snapshot("s1")  # gone: OK
    with pytest.raises(NotFound):
        backend.create_from_snapshot("s1", "v3", 4 * MIB)


def test_a_failed_snapshot_leaves_no_metadata(backend: RbdBackend, fake: FakeRbd) -> None:
    backend.create("v1", 4 * MIB)
    fake.fail["snap_create"] = "no-space"
    with pytest.raises(ResourceExhausted):
        backend.snapshot("v1", "s1")
    assert fake.meta == {}
    assert fake.images["volume-v1"].snaps == {}


def test_clone_of_a_volume_uses_a_hidden_snapshot_removed_with_the_clone(
    backend: RbdBackend, fake: FakeRbd
) -> None:
    backend.create("src", 4 * MIB)
    backend.clone("src", "c1", 4 * MIB)
    assert fake.images["volume-c1"].parent is not None
    assert fake.images["volume-src"].snaps == {"clone-c1": True}
    backend.delete("c1")
    assert fake.images["volume-src"].snaps == {}


def test_deleting_a_cloned_volume_flattens_its_clones_first(backend: RbdBackend, fake: FakeRbd) -> None:
    backend.create("src", 4 * MIB)
    backend.clone("src", "c1", 4 * MIB)
    backend.clone("src", "c2", 4 * MIB)
    backend.delete("src")
    assert "volume-src" not in fake.images
    assert fake.images["volume-c1"].parent is None
    assert fake.images["volume-c2"].parent is None
    assert fake.calls.count("flatten") == 2


def test_a_failed_clone_leaves_nothing_behind(backend: RbdBackend, fake: FakeRbd) -> None:
    backend.create("src", 4 * MIB)
    fake.fail["resize"] = "no-space"
    with pytest.raises(ResourceExhausted):
        backend.clone("src", "c1", 8 * MIB)  # the clone is made, its resize fails
    assert set(fake.images) == {"volume-src"}
    assert fake.images["volume-src"].snaps == {}


# -- golden images


def test_create_from_image_imports_once_then_only_clones(
    backend: RbdBackend, fake: FakeRbd, tmp_path: Path
) -> None:
    src = tmp_path / "golden.raw"
    with src.open("wb") as f:
        f.truncate(12 * MIB)
        f.seek(5 * MIB)
        f.write(b"golden")
    info = ImageInfo("raw", 12 * MIB)
    seen, progress = progress_log()
    backend.create_from_image(ImageSource(str(src)), info, "a", 12 * MIB, progress)  # type: ignore[arg-type]
    bases = [n for n in fake.images if n.startswith("image-")]
    assert len(bases) == 1
    base = fake.images[bases[0]]
    assert base.snaps == {"base": True}
    assert list(base.data) == [4 * MIB]  # only the chunk that is not zeros was written
    assert base.data[4 * MIB][MIB : MIB + 6] == b"golden"
    assert seen[-1] == (12 * MIB, 12 * MIB)
    assert fake.images["volume-a"].parent is not None

    creates = fake.calls.count("create")
    backend.create_from_image(ImageSource(str(src)), info, "b", 16 * MIB, progress)  # type: ignore[arg-type]
    assert fake.calls.count("create") == creates  # no second import
    assert fake.images["volume-b"].size == 16 * MIB
    assert fake.children_of(bases[0], "base") == ["volume-a", "volume-b"]


def test_a_changed_image_file_is_a_new_base(backend: RbdBackend, tmp_path: Path) -> None:
    src = tmp_path / "img.raw"
    src.write_bytes(b"x" * MIB)
    info = ImageInfo("raw", MIB)
    first = backend.image_key(ImageSource(str(src)), info)
    src.write_bytes(b"y" * 2 * MIB)
    assert backend.image_key(ImageSource(str(src)), ImageInfo("raw", 2 * MIB)) != first


def test_a_failed_import_leaves_no_image(backend: RbdBackend, fake: FakeRbd, tmp_path: Path) -> None:
    src = tmp_path / "golden.raw"
    src.write_bytes(b"\1" * MIB)
    fake.fail["write"] = "no-space"
    with pytest.raises(ResourceExhausted):
        backend.create_from_image(ImageSource(str(src)), ImageInfo("raw", MIB), "a", MIB, lambda d, t: None)
    assert fake.images == {}


# -- errors


def test_cluster_errors_map_to_the_error_tree(backend: RbdBackend, fake: FakeRbd) -> None:
    fake.down = True
    with pytest.raises(Unavailable) as down:
        backend.create("v1", MIB)
    assert "127.0.0.1:6789" in down.value.message
    fake.down, fake.denied = False, True
    with pytest.raises(PermissionDenied) as denied:
        backend.create("v1", MIB)
    assert "client.storage" in denied.value.message
    assert KEY not in denied.value.message
    fake.denied = False
    fake.fail["create"] = "no-space"
    with pytest.raises(ResourceExhausted):
        backend.create("v1", MIB)
    fake.fail.clear()
    backend.create("v1", MIB)
    backend.snapshot("v1", "s1")
    fake.fail["snap_remove"] = "busy"
    with pytest.raises(FailedPrecondition):
        backend.delete_snapshot("s1")


def test_space_from_the_pool_or_the_configured_capacity(fake: FakeRbd) -> None:
    fake.space = Space(total_bytes=100 * MIB, free_bytes=60 * MIB)
    b = RbdBackend("ceph", SETTINGS, fake, FakeRunner())
    assert b.space() == fake.space
    assert b.max_volume_bytes(provisioned_bytes=50 * MIB) == 50 * MIB
    fake.space = None  # no ceph-mgr: the cluster does not say
    capped = RbdBackend(
        "ceph", RbdSettings(**{**SETTINGS.__dict__, "capacity_bytes": 64 * MIB}), fake, FakeRunner()
    )
    assert capped.space() == Space(64 * MIB, 64 * MIB)
    assert capped.max_volume_bytes(provisioned_bytes=16 * MIB) == 48 * MIB


# -- what hosts get


def test_connection_announces_the_image_id_fsid_and_the_backend_user(
    backend: RbdBackend, fake: FakeRbd
) -> None:
    assert isinstance(backend, DirectBackend)
    backend.create("v1", MIB)
    c = backend.connection("v1", "host-a")
    assert c == RbdConnection(
        pool="rbd",
        image="volume-v1",
        monitors=("127.0.0.1:6789",),
        user="storage",
        key=Secret(KEY),
        image_id=fake.images["volume-v1"].id,
        cluster_fsid=FSID,
    )
    # re-created under the same name: another id
    backend.delete("v1")
    backend.create("v1", MIB)
    assert backend.connection("v1", "host-a").image_id != c.image_id


def test_per_host_users_get_caps_limited_to_the_pool(fake: FakeRbd) -> None:
    settings = RbdSettings(**{**SETTINGS.__dict__, "host_users": "per-host", "data_pool": "ec"})
    b = RbdBackend("ceph", settings, fake, FakeRunner())
    b.create("v1", MIB)
    c = b.connection("v1", "host-a")
    assert c.user == "blockwire.host-a"
    assert fake.users["blockwire.host-a"][1] == host_caps("rbd", "ec")
    assert host_caps("rbd", "ec") == (
        "mon",
        "profile rbd",
        "osd",
        "profile rbd pool=rbd, profile rbd pool=ec",
    )
    assert c.key is not None
    assert c.key.reveal() == fake.users["blockwire.host-a"][0]


# -- parsing


def test_keys_monitors_and_mon_host(tmp_path: Path) -> None:
    keyring = tmp_path / "k"
    keyring.write_text(f"[client.other]\n\tkey = AAAA\n[client.storage]\n\tkey = {KEY}\n\tcaps mon = x\n")
    assert read_key(str(keyring), "storage").reveal() == KEY
    bare = tmp_path / "bare"
    bare.write_text(KEY + "\n")
    assert read_key(str(bare), "anyone").reveal() == KEY
    with pytest.raises(ValueError, match=r"client\.nobody"):
        read_key(str(keyring), "nobody")
    assert monitor_addresses("[v2:127.0.0.1:3301,v1:127.0.0.1:6790],10.0.0.2:6789, mon3") == (
        "127.0.0.1:6790",
        "10.0.0.2:6789",
        "mon3:6789",
    )
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nfsid = x\nmon host = [v2:127.0.0.1:3301,v1:127.0.0.1:6790]\n")
    assert monitors_from_conf(str(conf)) == ("127.0.0.1:6790",)
    assert mon_host(("127.0.0.1:6790", "10.0.0.2:3300")) == "v1:127.0.0.1:6790,v2:10.0.0.2:3300"


def test_config_of_an_rbd_backend() -> None:
    good = {"name": "ceph", "kind": "rbd", "pool": "rbd", "monitors": ["127.0.0.1:6789"], "keyring": "/k"}
    cfg = parse({"backends": [good]})
    assert cfg.backends[0].monitors == ("127.0.0.1:6789",)
    for bad, needle in (
        ({"pool": ""}, "needs pool"),
        ({"monitors": []}, "conf"),
        ({"keyring": ""}, "keyring or key_file"),
        ({"exporter": "tgt"}, "no exporter"),
        ({"host_users": "some"}, "host_users"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"monitors": ["nohost"]}, "monitors"),
        ({"pool": "bad/pool"}, "pool"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse({"backends": [{**good, **bad}]})


# -- attachments in the service


class Rig:
    def __init__(self, root: Path) -> None:
        self.fake = FakeRbd()
        self.backend = RbdBackend("ceph", SETTINGS, self.fake, FakeRunner())
        self.catalog = SqliteCatalog(root / "c.db")
        self.service = StorageService(
            self.catalog,
            {"ceph": Pool(self.backend)},
            FakeClock(),
            InlineJobs(),
            iqn_prefix="iqn.2026-01.io.blockwire.unit",
            lock_timeout=0.5,
        )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.catalog.close()


HOST_A = Connector(host="host-a", transports=(Transport.RBD,))
HOST_B = Connector(host="host-b")


def test_an_rbd_attachment_has_a_connection_and_no_export(rig: Rig) -> None:
    svc = rig.service
    v = svc.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB))
    a = svc.create_attachment(v.id, HOST_A, AccessMode.READ_WRITE, "dom")
    assert a.connection_info is not None
    t = a.connection_info.transport
    assert isinstance(t, RbdConnection)
    assert t.image_id == rig.fake.images[f"volume-{v.id}"].id
    assert a.connection_info.attachment_id == a.id
    got = svc.get_volume(v.id)
    assert got.export is None
    assert got.state is VolumeState.ATTACHING
    # a repeat returns it (also after a read back from the catalog); another consumer is refused
    assert svc.create_attachment(v.id, HOST_A, AccessMode.READ_WRITE, "dom") == svc.exports.get(a.id)
    with pytest.raises(FailedPrecondition):
        svc.create_attachment(v.id, HOST_B, AccessMode.READ_WRITE, "dom2")
    # a host that lists only iSCSI, or asks for iSCSI, cannot reach it
    with pytest.raises(InvalidArgument):
        svc.create_attachment(v.id, Connector(host="c", transports=(Transport.ISCSI,)), AccessMode.READ_WRITE)
    with pytest.raises(InvalidArgument):
        svc.create_attachment(v.id, HOST_B, AccessMode.READ_WRITE, transport=Transport.ISCSI)
    svc.complete_attachment(a.id)
    assert svc.get_volume(v.id).state is VolumeState.IN_USE
    # extend while attached resizes the image
    svc.extend_volume(v.id, 8 * MIB)
    assert rig.fake.images[f"volume-{v.id}"].size == 8 * MIB
    svc.delete_attachment(a.id)
    svc.delete_attachment(a.id)
    assert svc.get_volume(v.id).state is VolumeState.AVAILABLE


def test_a_live_migration_of_an_rbd_volume_is_refused_and_changes_nothing(rig: Rig) -> None:
    """FAILED_PRECONDITION (not an argument error about the destination's iSCSI name): hosts open RBD
    images themselves, there is no export to share; the source attachment stays as it was."""
    svc = rig.service
    v = svc.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB))
    a = svc.create_attachment(v.id, HOST_A, AccessMode.READ_WRITE, "dom")
    svc.complete_attachment(a.id)
    with pytest.raises(FailedPrecondition, match="live migration of its volumes is not supported yet"):
        svc.create_migration_attachment(a.id, HOST_B)
    assert svc.get_volume(v.id).attachment_ids == (a.id,)
    assert svc.get_volume(v.id).state is VolumeState.IN_USE


def test_multiattach_rbd_volumes_take_two_hosts(rig: Rig) -> None:
    svc = rig.service
    v = svc.create_volume(CreateVolumeSpec(name="shared", size_bytes=MIB, multiattach=True))
    a = svc.create_attachment(v.id, HOST_A, AccessMode.READ_WRITE)
    b = svc.create_attachment(v.id, HOST_B, AccessMode.READ_WRITE)
    assert a.id != b.id
    with pytest.raises(FailedPrecondition):
        svc.create_attachment(v.id, Connector(host="c"), AccessMode.READ_ONLY)
    svc.delete_attachment(a.id)
    assert svc.get_volume(v.id).state is VolumeState.ATTACHING
    svc.delete_attachment(b.id)
    assert svc.get_volume(v.id).state is VolumeState.AVAILABLE


def test_the_cluster_down_during_an_attach_leaves_nothing(rig: Rig) -> None:
    svc = rig.service
    v = svc.create_volume(CreateVolumeSpec(name="v", size_bytes=MIB))
    rig.fake.down = True
    with pytest.raises(Unavailable):
        svc.create_attachment(v.id, HOST_A, AccessMode.READ_WRITE)
    rig.fake.down = False
    assert rig.catalog.attachments_of(v.id) == []
    assert svc.get_volume(v.id).state is VolumeState.AVAILABLE


def test_reconcile_keeps_live_rbd_attachments_and_drops_half_made_ones(rig: Rig) -> None:
    svc = rig.service
    v = svc.create_volume(CreateVolumeSpec(name="v", size_bytes=MIB))
    a = svc.create_attachment(v.id, HOST_A, AccessMode.READ_WRITE)
    svc.complete_attachment(a.id)
    w = svc.create_volume(CreateVolumeSpec(name="w", size_bytes=MIB, source=VolumeSource()))
    svc.reconcile()
    assert svc.exports.get(a.id).connection_info == a.connection_info
    assert svc.get_volume(v.id).state is VolumeState.IN_USE
    assert svc.get_volume(w.id).state is VolumeState.AVAILABLE


# -- encrypted volumes


def test_an_encrypted_rbd_volume_gets_a_luks_header_through_librbd_and_its_key_in_the_attachment(
    tmp_path: Path,
) -> None:
    """The header is made by the formatting tool (here a fake cryptsetup that writes a marker into the
    temporary file it is given, the key on its stdin) and written at offset 0 of the image; the image
    is the header larger; the attachment's answer carries the key, the catalog and reads do not."""

    def luks_format(argv: tuple[str, ...]) -> Reply:
        with open(argv[-1], "r+b") as f:
            f.write(b"LUKS\xba\xbe-header")
        return Reply()

    runner = FakeRunner().on(r"^cryptsetup luksFormat", luks_format)
    keys = EmbeddedKeys(tmp_path / "master.key")
    fake = FakeRbd()
    catalog = SqliteCatalog(tmp_path / "c.db")
    svc = StorageService(
        catalog,
        {"ceph": Pool(RbdBackend("ceph", SETTINGS, fake, FakeRunner()))},
        FakeClock(),
        InlineJobs(),
        iqn_prefix="iqn.2026-01.io.blockwire.unit",
        lock_timeout=0.5,
        crypt=VolumeCrypt(keys, runner, cryptsetup=True),
    )
    assert own_capabilities(Pool(RbdBackend("ceph", SETTINGS, fake, FakeRunner())))["encryption"] == "true"
    try:
        v = svc.create_volume(CreateVolumeSpec(name="enc", size_bytes=4 * MIB, encrypted=True))
        assert v.encryption is not None
        header = v.encryption.header_bytes
        image = fake.images[f"volume-{v.id}"]
        assert image.size == 4 * MIB + header
        assert len(image.data[0]) == header
        assert image.data[0].startswith(b"LUKS\xba\xbe-header")
        key = keys.get_key(v.encryption.key_ref)
        (fmt,) = runner.revealed
        assert key.reveal() not in " ".join(fmt)  # the key went on stdin, not argv

        a = svc.create_attachment(v.id, HOST_A, AccessMode.READ_WRITE, "dom")
        assert a.connection_info is not None
        assert a.connection_info.size_bytes == 4 * MIB + header
        assert a.connection_info.encryption is not None
        assert a.connection_info.encryption.passphrase == key
        # a repeat carries the key again; what is stored or read back does not
        again = svc.create_attachment(v.id, HOST_A, AccessMode.READ_WRITE, "dom")
        assert again.connection_info is not None
        assert again.connection_info.encryption is not None
        assert again.connection_info.encryption.passphrase == key
        stored = svc.exports.get(a.id).connection_info
        assert stored is not None
        assert stored.encryption is not None
        assert stored.encryption.passphrase is None
        assert stored.encryption.key_ref == v.encryption.key_ref

        # a clone is a copy-on-write child: it shares the header and the key
        c = svc.create_volume(CreateVolumeSpec(name="c", size_bytes=0, source=VolumeSource(volume_id=v.id)))
        assert c.encryption == v.encryption
        assert fake.images[f"volume-{c.id}"].size == 4 * MIB + header
        svc.extend_volume(v.id, 8 * MIB)
        assert image.size == 8 * MIB + header
    finally:
        catalog.close()
