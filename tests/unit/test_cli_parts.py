"""Parts of the CLI that need no server: size parsing, output formatting, completion scripts."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from blockwire import cli, output
from blockwire.errors import InvalidArgument
from blockwire.secret import REDACTED
from blockwire.sizes import format_size, parse_size
from blockwire.v1 import types_pb2


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("4096B", 4096),
        ("1K", 1024),
        ("512M", 512 * 2**20),
        ("512m", 512 * 2**20),
        ("10G", 10 * 2**30),
        ("10GiB", 10 * 2**30),
        ("10GB", 10 * 2**30),
        ("10 Gi", 10 * 2**30),
        ("1.5G", 3 * 2**29),
        ("2T", 2 * 2**40),
        ("1P", 2**50),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "10X", "-1G", "1.5", "0.3K", "ten", "1e9", "10 G B"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_size(text, "size")
    assert info.value.field == "size"


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1KiB"),
        (512 * 2**20, "512MiB"),
        (3 * 2**29, "1.5GiB"),
        (10 * 2**40, "10TiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_table_aligns_columns() -> None:
    text = output.table(("ID", "NAME"), [("a", "first"), ("longer-id", "x")])
    assert text.splitlines() == ["ID         NAME", "a          first", "longer-id  x"]


def test_json_redacts_every_secret() -> None:
    info = types_pb2.ConnectionInfo(volume_id="v")
    info.iscsi.chap.username = "u"
    info.iscsi.chap.password = "chap-secret-1"
    info.iscsi.mutual_chap.username = "m"
    info.iscsi.mutual_chap.password = "chap-secret-2"
    data = output.message_to_dict(types_pb2.Attachment(connection_info=info))
    assert data["connection_info"]["iscsi"]["chap"]["password"] == REDACTED
    assert data["connection_info"]["iscsi"]["mutual_chap"]["password"] == REDACTED
    assert "chap-secret" not in output.dumps(data)
    rbd = types_pb2.ConnectionInfo()
    rbd.rbd.key = "ceph-key"
    assert output.message_to_dict(rbd)["rbd"]["key"] == REDACTED


def test_volume_fields_show_progress_and_error() -> None:
    v = types_pb2.Volume(id="v1", name="n", state=types_pb2.VOLUME_STATE_CREATING, error_message="")
    v.progress.done_bytes, v.progress.total_bytes = 2**30, 4 * 2**30
    assert "progress:     25% (1GiB of 4GiB)" in output.volume_fields(v)
    v.state, v.error_message = types_pb2.VOLUME_STATE_ERROR, "image unreadable"
    assert "error:        image unreadable" in output.volume_fields(v)


def test_completion_scripts_name_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", "bash"]) == 0
    bash = capsys.readouterr().out
    assert bash.rstrip().endswith("complete -F _blockwire blockwire")
    for word in (
        "volume",
        "snapshot",
        "attach",
        "detach",
        "attachments",
        "connector",
        "health",
        "--from-image",
    ):
        assert word in bash
    assert cli.main(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert zsh.startswith("#compdef blockwire")
    assert "bashcompinit" in zsh
    assert cli.main(["completion", "fish"]) == cli.EXIT_USAGE


BASH = shutil.which("bash")


def _complete(script: str, words: list[str]) -> list[str]:
    """What bash offers for `words` (the last one is being typed) using the generated script."""
    assert BASH is not None
    program = (
        f"{script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        '_blockwire; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        [BASH, "--norc", "--noprofile", "-c", program], capture_output=True, text=True, timeout=30, check=True
    )
    return sorted(w for w in done.stdout.split("\n") if w)


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_bash_completion_completes(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["completion", "bash"])
    script = capsys.readouterr().out
    assert _complete(script, ["blockwire", "vol"]) == ["volume"]
    assert _complete(script, ["blockwire", "volume", ""]) == ["create", "delete", "extend", "list", "show"]
    assert _complete(script, ["blockwire", "--json", "snapshot", "l"]) == ["list"]
    assert "--from-image" in _complete(script, ["blockwire", "volume", "create", "--from"])
    assert _complete(script, ["blockwire", "attach", "vm1", "v", "--bus", ""]) == ["sata", "scsi", "virtio"]
    assert _complete(script, ["blockwire", "completion", ""]) == ["bash", "zsh"]
    assert _complete(script, ["blockwire", "health", "--o"]) == ["--only"]
