"""The layer contracts of scripts/check fail on a wrong import: each case plants one import that breaks
one contract into a copy of the tree and runs lint-imports on it; the copy as it is passes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: scripts/setup installs the dev tools (import-linter)")
    root = tmp_path_factory.mktemp("layers")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("clients/blockwire", "hostagent", "storagesvc"):
        shutil.copytree(ROOT / pkg, root / pkg, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{root / 'clients'}:{root}"}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_tree_as_it_is_keeps_every_contract(tree: Path) -> None:
    done = lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("storagesvc/paging.py", "import hostagent.journal", "neither imports the other"),
        ("hostagent/identity.py", "import storagesvc.identity", "neither imports the other"),
        ("clients/blockwire/sizes.py", "import hostagent.model", "stands on neither daemon"),
        ("clients/blockwire/runtime/clock.py", "import grpc", "core and runtime are grpc-free"),
        ("clients/blockwire/model.py", "import blockwire.client", "core and runtime are grpc-free"),
        ("hostagent/journal.py", "import grpc", "hostagent speaks gRPC only in hostagent.rpc"),
        ("hostagent/api.py", "import blockwire.v1.storage_pb2_grpc", "hostagent speaks gRPC only"),
        ("storagesvc/paging.py", "import blockwire.server.serving", "storagesvc speaks gRPC only"),
        ("storagesvc/exports.py", "import rbd", "storagesvc reaches Ceph only in storagesvc.backends.rbd"),
        (
            "hostagent/connectors/local.py",
            "import hostagent.virt.diskxml",
            "they import neither hostagent.virt",
        ),
        (
            "hostagent/connectors/fc.py",
            "import hostagent.virt.hypervisor",
            "they import neither hostagent.virt",
        ),
        ("hostagent/virt/sources.py", "import hostagent.connectors.base", "without knowing the connectors"),
        (
            "hostagent/connectors/iscsi.py",
            "import hostagent.connectors.iscsi_qemu",
            "each connector stands alone",
        ),
    ],
)
def test_a_wrong_import_breaks_its_contract(tree: Path, module: str, line: str, contract: str) -> None:
    path = tree / module
    original = path.read_text()
    path.write_text(f"{original}\n{line}  # planted by the test\n")
    try:
        done = lint(tree)
    finally:
        path.write_text(original)
    assert done.returncode != 0, done.stdout
    broken = done.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, done.stdout
