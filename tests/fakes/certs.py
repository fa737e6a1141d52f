"""Test certificates made with the openssl CLI: a CA, a server certificate for localhost/127.0.0.1, and
client certificates whose SAN URI names a blockwire role (blockwire://agent/<host>, blockwire://admin/<name>).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class Certs:
    """A CA in `root`; `server()` and `client(uri)` issue leaf certificates signed by it."""

    def __init__(self, root: Path, name: str = "ca") -> None:
        if shutil.which("openssl") is None:
            pytest.skip("openssl CLI not installed")
        self.root = root
        self.ca = Pair(root / f"{name}.pem", root / f"{name}.key")
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(self.ca.key), "-out", str(self.ca.cert), "-days", "2",
            "-subj", f"/CN=blockwire test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def _issue(self, name: str, subject: str, san: str, usage: str) -> Pair:
        pair = Pair(self.root / f"{name}.pem", self.root / f"{name}.key")
        csr = self.root / f"{name}.csr"
        ext = self.root / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(pair.key), "-out", str(csr), "-subj", subject,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca.cert), "-CAkey", str(self.ca.key),
            "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(ext),
        )  # fmt: skip
        pair.key.chmod(0o600)
        return pair

    def server(self, name: str = "server") -> Pair:
        return self._issue(name, "/CN=localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth")

    def client(self, name: str, uri: str | None) -> Pair:
        san = f"URI:{uri}" if uri else "DNS:not-a-role.example"
        return self._issue(name, f"/CN={name}", san, "clientAuth")
