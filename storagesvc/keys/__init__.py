"""Key managers: where encrypted volumes' keys live (README "Encryption").

One interface (`base.KeyManager`), two implementations: `embedded` (the default: keys wrapped with a
master key in a 0600 file outside the catalog) and `kmip` (a KMIP server, PyKMIP's client). `open_keys`
builds the configured one.
"""

from __future__ import annotations

from storagesvc.keys.base import KeyManager, KeysConfig
from storagesvc.keys.embedded import EmbeddedKeys


def open_keys(cfg: KeysConfig, default_dir: str) -> KeyManager:
    """The configured key manager; nothing is contacted yet."""
    if cfg.kind == "kmip":
        from storagesvc.keys.kmip import KmipKeys  # noqa: PLC0415 - PyKMIP is an optional extra

        return KmipKeys(cfg)
    return EmbeddedKeys(cfg.master_key_file or f"{default_dir}/master.key")
