"""The embedded key manager (real AES-GCM, real files), the [keys] config, and the encryption fields on
the wire: what a key manager returns, what the catalog keeps, what the wire carries."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from blockwire import convert, validate
from blockwire.errors import FailedPrecondition, InvalidArgument, Unavailable
from blockwire.model import ConnectionInfo, Encryption, IscsiConnection, IscsiPath
from blockwire.secret import Secret
from storagesvc.config import ConfigError, parse
from storagesvc.keys import open_keys
from storagesvc.keys.base import KeysConfig
from storagesvc.keys.embedded import EmbeddedKeys


def test_embedded_keys_are_random_wrapped_and_unwrap_only_with_their_master_key(tmp_path: Path) -> None:
    keys = EmbeddedKeys(tmp_path / "k" / "master.key")
    ref1, p1 = keys.create_key(512)
    ref2, p2 = keys.create_key(512)
    assert stat.S_IMODE((tmp_path / "k" / "master.key").stat().st_mode) == 0o600
    assert p1.reveal() != p2.reveal()
    assert len(p1.reveal()) == 43  # 256 random bits, base64url
    assert p1.reveal() not in ref1  # the reference is the wrapped key, not the key
    assert ref1.startswith("embedded:v1:")
    assert keys.get_key(ref1).reveal() == p1.reveal()
    assert EmbeddedKeys(tmp_path / "k" / "master.key").get_key(ref2).reveal() == p2.reveal()  # a restart
    other = EmbeddedKeys(tmp_path / "other.key")
    with pytest.raises(FailedPrecondition, match="does not unwrap"):
        other.get_key(ref1)
    with pytest.raises(FailedPrecondition, match=r"corrupt|does not unwrap"):
        keys.get_key(ref1[:-4] + "AAAA")
    keys.delete_key(ref1)  # nothing to destroy: the wrapped key lives in the catalog row


def test_embedded_master_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(b"x" * 32)
    path.chmod(0o644)
    with pytest.raises(Unavailable, match="readable by others"):
        EmbeddedKeys(path).create_key(512)


def test_keys_config(tmp_path: Path) -> None:
    base = {
        "backends": [{"name": "f", "kind": "file", "path": str(tmp_path), "exporter": "t"}],
        "exporters": {"t": {"kind": "tgt", "portals": ["127.0.0.1:3260"]}},
    }
    assert parse(base).keys == KeysConfig()
    assert isinstance(open_keys(KeysConfig(), str(tmp_path)), EmbeddedKeys)
    with pytest.raises(ConfigError, match=r"\[keys\] kind"):
        parse({**base, "keys": {"kind": "vault"}})
    with pytest.raises(ConfigError, match="needs host"):
        parse({**base, "keys": {"kind": "kmip", "host": "127.0.0.1"}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse({**base, "keys": {"kind": "embedded", "master": "x"}})


def _info(e: Encryption) -> ConnectionInfo:
    return ConnectionInfo(
        transport=IscsiConnection(paths=(IscsiPath("127.0.0.1:3260", "iqn.2026-01.io.x:v", 1),)),
        volume_id="v1",
        encryption=e,
    )


def test_encryption_on_the_wire_carries_the_key_only_with_secrets() -> None:
    e = Encryption(key_ref="kmip:7", passphrase=Secret("pass-phrase"), header_bytes=2 << 20)
    m = convert.connection_info_to_pb(_info(e))
    assert m.encryption.passphrase == "pass-phrase"
    assert convert.connection_info_from_pb(m).encryption == e
    listed = convert.connection_info_to_pb(_info(e), with_secrets=False)
    assert not listed.encryption.passphrase
    assert listed.encryption.key_ref == "kmip:7"
    assert _info(e).without_key().encryption == Encryption(key_ref="kmip:7", header_bytes=2 << 20)
    assert "pass-phrase" not in repr(_info(e))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cipher": "aes-cbc-essiv:sha256"}, "cipher"),
        ({"key_size_bits": 128}, "key_size_bits"),
        ({"format": ""}, "format"),
        ({"passphrase": Secret("two\nlines")}, "passphrase"),
    ],
)
def test_encryption_validation_names_the_field(change: dict[str, object], field: str) -> None:
    e = Encryption(key_ref="kmip:7", passphrase=Secret("p"))
    validate.validate_connection_info(_info(e))
    with pytest.raises(InvalidArgument) as err:
        validate.validate_connection_info(_info(Encryption(**{**e.__dict__, **change})))  # type: ignore[arg-type]
    assert err.value.field == f"connection_info.encryption.{field}"
