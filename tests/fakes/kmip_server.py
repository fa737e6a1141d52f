"""PyKMIP's software KMIP server for tests: started under the test's temp dir on a free port with
generated certificates (tests/fakes/certs.py: a CA, a server certificate for 127.0.0.1, a client
certificate for the storage service), mutual TLS 1.2; stopped by pid. Keys persist in its SQLite file,
so a stop and a start again on the same port is a key manager outage, not a loss."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.certs import Certs, Pair
from tests.rig import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pykmip_server() -> str | None:
    """The pykmip-server script next to this interpreter, if PyKMIP is installed."""
    found = Path(sys.executable).parent / "pykmip-server"
    return str(found) if found.exists() else shutil.which("pykmip-server")


@dataclass
class KmipServer:
    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        certs = Certs(self.root, "kmip-ca")
        self.ca = certs.ca.cert
        self.server_pair = certs.server("kmip-server")
        self.client: Pair = certs.client("kmip-client", None)
        (self.root / "policies").mkdir(exist_ok=True)
        self.config = self.root / "server.conf"
        self.config.write_text(
            f"""[server]
hostname=127.0.0.1
port={self.port}
certificate_path={self.server_pair.cert}
key_path={self.server_pair.key}
ca_path={self.ca}
auth_suite=TLS1.2
policy_path={self.root / "policies"}
enable_tls_client_auth=False
logging_level=INFO
database_path={self.root / "kmip.db"}
"""
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def keys_toml(self) -> str:
        """The storage service's [keys] table for this server."""
        return (
            f'\n[keys]\nkind = "kmip"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'cert_file = "{self.client.cert}"\nkey_file = "{self.client.key}"\nca_file = "{self.ca}"\n'
            "timeout = 5.0\n"
        )

    def start(self) -> None:
        script = pykmip_server()
        assert script is not None, "PyKMIP is not installed"
        log = open(self.root / "server.out", "ab")  # noqa: SIM115 - the child keeps it
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [script, "-f", str(self.config), "-l", str(self.root / "server.log")],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )  # fmt: skip

        def listening() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, (self.root / "server.out").read_text()[-2000:]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return True
            return False

        wait_until(f"KMIP server on {self.address}", listening, timeout=30)

    def stop(self) -> None:
        """Stops the server and what it forked (PyKMIP runs sessions in child processes, which keep
        the listening socket): its own process group, made at start, by the server's pid."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads a group of its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # forked session processes that outlived it
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None

    @contextlib.contextmanager
    def running(self) -> Iterator[KmipServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
