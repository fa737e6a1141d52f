"""The `blockwire` CLI, driven in-process against the REAL storage and agent services over real gRPC
(tests.fakes.services: StorageService on a file backend, HostAgent on fakes at its seams).

Faults a real service cannot be driven into (UNAVAILABLE, ABORTED, a status code to map, a hang, an
agent without events) come from a Faults interceptor in front of the real servicer."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockwire import cli, errors, output
from blockwire.client import HostAgentClient, StorageClient
from blockwire.v1 import types_pb2
from blockwire.validate import DEFAULT_PAGE
from tests.fakes.clock import FakeClock
from tests.fakes.executor import Reply
from tests.fakes.faults import Faults
from tests.fakes.grpc_server import AGENT_SERVICE, Running, serve
from tests.fakes.images import image_file
from tests.fakes.services import HOST_IQN, Services, services
from tests.fakes.storage_rig import StorageRig

GIB = 1024**3
STEPS = ("export", "connect", "hotplug")  # the PROGRESS steps of a real attach, in order


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Env:
    services: Services
    storage: Faults  # in front of the real StorageServicer
    agent: Faults  # in front of the real HostAgentServicer
    storage_server: Running
    agent_server: Running
    capsys: pytest.CaptureFixture[str]
    clock: FakeClock
    sdk: StorageClient  # to look at what the CLI left in storage
    agent_sdk: HostAgentClient

    def run(self, *args: str) -> Result:
        self.capsys.readouterr()
        argv = ["--storage", self.storage_server.address, "--agent", self.agent_server.address, *args]
        code = cli.main(argv, clock=self.clock)
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def volume(self, name: str = "data1", size: str = "10G") -> str:
        r = self.run("--json", "volume", "create", name, size)
        assert r.code == 0, r.err
        return str(r.json()["id"])

    def exists(self, volume_id: str) -> bool:
        try:
            self.sdk.get_volume(volume_id)
        except errors.NotFound:
            return False
        return True

    def chap_password(self, volume_id: str) -> str:
        """The CHAP password storage gave the volume's export (never to be shown)."""
        for target in self.services.storage.exporter.targets.values():
            if target.spec.volume_id == volume_id and target.spec.chap is not None:
                return target.spec.chap.password.reveal()
        raise AssertionError(f"volume {volume_id} is not exported with CHAP")

    def release_when_watched(self, method: str) -> None:
        """Holds `method` until a WatchEvents stream has subscribed: the CLI opens its progress stream
        and calls at once, and only a subscribed stream is sure to get every event."""
        self.agent.hold.add(method)
        self.agent.release.clear()

        def release() -> None:
            self.services.events.wait_subscribed(1, timeout=5.0)
            self.agent.release.set()

        threading.Thread(target=release, daemon=True).start()


@pytest.fixture
def env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Env]:
    with services(tmp_path) as s:
        sdk, agent_sdk = StorageClient(s.storage_server.address), HostAgentClient(s.agent_server.address)
        with sdk, agent_sdk:
            yield Env(
                s, s.storage_faults, s.agent_faults, s.storage_server, s.agent_server, capsys, FakeClock(),
                sdk, agent_sdk,
            )  # fmt: skip


# volume create


def test_volume_create_shows_the_volume(env: Env) -> None:
    r = env.run("volume", "create", "data1", "10G", "--label", "app=db")
    assert r.code == 0, r.err
    assert "name:" in r.out
    assert "data1" in r.out
    assert "10GiB (10737418240 bytes)" in r.out
    assert "available" in r.out
    assert "app=db" in r.out
    assert r.err == ""


def test_volume_create_json_is_the_proto_json_with_field_names(env: Env) -> None:
    r = env.run("volume", "create", "data1", "512M", "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert data["name"] == "data1"
    assert data["size_bytes"] == str(512 * 1024**2)
    assert data["state"] == "VOLUME_STATE_AVAILABLE"
    assert data["multiattach"] is False  # zero values are present: a stable shape
    assert data["attachment_ids"] == []
    assert set(data) >= {"id", "name", "size_bytes", "state", "backend", "labels", "wwn", "create_time"}


def test_volume_create_is_idempotent_and_a_conflict_exits_4(env: Env) -> None:
    first = env.volume("data1", "10G")
    assert env.volume("data1", "10G") == first
    r = env.run("volume", "create", "data1", "20G")
    assert r.code == cli.EXIT_CONFLICT
    assert "with other parameters" in r.err
    r = env.run("volume", "create", "data1", "10G", "--label", "app=db")  # labels are parameters too
    assert r.code == cli.EXIT_CONFLICT


@pytest.mark.parametrize("size", ["10X", "ten", "1.5", "1,5G"])
def test_volume_create_with_a_bad_size_exits_2(env: Env, size: str) -> None:
    r = env.run("volume", "create", "data1", size)
    assert r.code == cli.EXIT_USAGE
    assert "size" in r.err
    assert env.storage.count("CreateVolume") == 0


def test_volume_create_without_size_or_source_is_a_usage_error(env: Env) -> None:
    r = env.run("volume", "create", "data1")
    assert r.code == cli.EXIT_USAGE
    assert "SIZE" in r.err


def test_volume_create_refused_by_the_service_exits_2(env: Env) -> None:
    r = env.run("volume", "create", "data1", "1000")  # not a multiple of 1 MiB
    assert r.code == cli.EXIT_USAGE
    assert "size_bytes" in r.err


def test_volume_create_from_image_waits_and_shows_progress(env: Env, tmp_path: Path) -> None:
    source = image_file(tmp_path, "debian.qcow2", "qcow2", 2 * GIB)
    r = env.run(
        "--progress",
        "volume",
        "create",
        "root",
        "2G",
        "--from-image",
        str(source),
        "--image-format",
        "qcow2",
    )
    assert r.code == 0, r.err
    assert "available" in r.out
    assert f"image {source} (qcow2)" in r.out
    lines = r.err.splitlines()
    assert any(line.startswith("root: creating") and "%" in line for line in lines), r.err
    assert lines[-1] == "root: available"


def test_volume_create_no_progress_unless_asked_on_a_pipe(env: Env, tmp_path: Path) -> None:
    source = image_file(tmp_path, "debian.raw", "raw", 2 * GIB)
    r = env.run("volume", "create", "root", "2G", "--from-image", str(source))
    assert r.code == 0
    assert r.err == ""
    assert env.storage.count("WatchVolume") == 1


def test_volume_create_no_wait_returns_while_creating(env: Env, tmp_path: Path) -> None:
    source = image_file(tmp_path, "x.raw", "raw", 2 * GIB)
    r = env.run("--json", "volume", "create", "root", "2G", "--from-image", str(source), "--no-wait")
    assert r.code == 0
    assert r.json()["state"] == "VOLUME_STATE_CREATING"
    assert env.storage.count("WatchVolume") == 0


def test_volume_create_from_a_missing_snapshot_exits_3(env: Env) -> None:
    r = env.run("volume", "create", "copy", "--from-snapshot", "snap-9999")
    assert r.code == cli.EXIT_NOT_FOUND
    assert "snap-9999" in r.err


# volume list, show, delete, extend


def test_volume_list_table_follows_every_page(env: Env) -> None:
    names = [f"v{i:03d}" for i in range(DEFAULT_PAGE + 1)]  # one more than the service's page holds
    for name in names:
        env.sdk.create_volume(name, GIB)
    r = env.run("volume", "list")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "SIZE", "STATE", "BACKEND", "ATTACHMENTS"]
    assert sorted(line.split()[1] for line in lines[1:]) == names
    assert lines[1].split()[2:] == ["1GiB", "available", "file", "0"]
    assert env.storage.count("ListVolumes") == 2


def test_volume_list_json_and_label_selector(env: Env) -> None:
    env.run("volume", "create", "a", "1G", "--label", "tier=gold")
    env.run("volume", "create", "b", "1G", "--label", "tier=bronze")
    r = env.run("volume", "list", "--json", "--label", "tier=gold")
    assert r.code == 0
    data = r.json()
    assert isinstance(data, list)
    assert [v["name"] for v in data] == ["a"]


def test_volume_list_empty(env: Env) -> None:
    assert env.run("volume", "list").out.strip() == "no volumes"
    assert env.run("volume", "list", "--json").json() == []


def test_volume_label_must_be_key_value(env: Env) -> None:
    r = env.run("volume", "list", "--label", "novalue")
    assert r.code == cli.EXIT_USAGE
    assert "KEY=VALUE" in r.err


def test_volume_show(env: Env) -> None:
    vid = env.volume()
    r = env.run("volume", "show", vid)
    assert r.code == 0
    assert f"id:           {vid}" in r.out
    assert env.run("volume", "show", vid, "--json").json()["id"] == vid


def test_volume_show_missing_exits_3_with_a_hint(env: Env) -> None:
    r = env.run("volume", "show", "vol-nope")
    assert r.code == cli.EXIT_NOT_FOUND
    assert "blockwire: error: volume vol-nope does not exist" in r.err
    assert "hint:" in r.err
    assert "volume list" in r.err


def test_volume_delete_and_again(env: Env) -> None:
    vid = env.volume()
    r = env.run("volume", "delete", vid)
    assert (r.code, r.out.strip()) == (0, f"deleted volume {vid}")
    assert not env.exists(vid)
    r = env.run("volume", "delete", vid, "--json")  # gone already: still fine
    assert r.code == 0
    assert r.json() == {"deleted": [vid]}


def test_volume_delete_of_an_attached_volume_exits_4(env: Env) -> None:
    vid = env.volume()
    assert env.run("attach", "vm1", vid).code == 0
    r = env.run("volume", "delete", vid)
    assert r.code == cli.EXIT_CONFLICT
    assert "is attached (domain 'vm1' on host" in r.err
    assert "detach it first" in r.err
    assert env.exists(vid)


def test_volume_extend(env: Env) -> None:
    vid = env.volume(size="10G")
    r = env.run("volume", "extend", vid, "20G")
    assert r.code == 0, r.err
    assert "20GiB" in r.out
    assert env.sdk.get_volume(vid).size_bytes == 20 * GIB
    assert env.agent.count("ExtendVolume") == 0


def test_volume_extend_smaller_exits_4(env: Env) -> None:
    vid = env.volume(size="10G")
    r = env.run("volume", "extend", vid, "5G")
    assert r.code == cli.EXIT_CONFLICT
    assert "only grow" in r.err


def test_volume_extend_with_host_tells_the_agent(env: Env) -> None:
    vid = env.volume(size="10G")
    env.run("attach", "vm1", vid)
    r = env.run("volume", "extend", vid, "12G", "--host", "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert data["host_size_bytes"] == str(12 * GIB)
    assert data["volume"]["size_bytes"] == str(12 * GIB)


def test_volume_extend_with_host_of_a_detached_volume_exits_3(env: Env) -> None:
    vid = env.volume(size="10G")
    r = env.run("volume", "extend", vid, "12G", "--host")
    assert r.code == cli.EXIT_NOT_FOUND
    assert "not attached" in r.err


# snapshots


def test_snapshot_lifecycle(env: Env) -> None:
    vid = env.volume()
    r = env.run("snapshot", "create", vid, "before-upgrade", "--label", "k=v")
    assert r.code == 0, r.err
    assert "before-upgrade" in r.out
    assert "k=v" in r.out
    again = env.run("--json", "snapshot", "create", vid, "before-upgrade", "--label", "k=v")
    sid = again.json()["id"]  # idempotent
    assert len(env.sdk.list_snapshots()) == 1
    assert env.run("snapshot", "create", vid, "before-upgrade").code == cli.EXIT_CONFLICT  # other labels
    r = env.run("snapshot", "list")
    assert r.out.splitlines()[0].split() == ["ID", "NAME", "VOLUME", "SIZE", "STATE"]
    assert r.out.splitlines()[1].split() == [sid, "before-upgrade", vid, "10GiB", "available"]
    assert [s["id"] for s in env.run("snapshot", "list", "--volume", vid, "--json").json()] == [sid]
    assert env.run("snapshot", "list", "--volume", "other").out.strip() == "no snapshots"
    assert env.run("snapshot", "show", sid, "--json").json()["volume_id"] == vid
    assert "before-upgrade" in env.run("snapshot", "show", sid).out
    r = env.run("snapshot", "delete", sid)
    assert (r.code, r.out.strip()) == (0, f"deleted snapshot {sid}")
    assert env.run("snapshot", "delete", sid, "--json").json() == {"deleted": [sid]}


def test_snapshot_errors(env: Env) -> None:
    assert env.run("snapshot", "show", "snap-x").code == cli.EXIT_NOT_FOUND
    assert env.run("snapshot", "create", "vol-x", "s").code == cli.EXIT_NOT_FOUND


# attach, detach, attachments, connector


def test_attach_and_detach(env: Env) -> None:
    vid = env.volume()
    r = env.run("attach", "vm1", vid, "--bus", "scsi", "--target-dev", "sdc", "--persistent")
    assert r.code == 0, r.err
    assert "attached" in r.out
    assert "sdc" in r.out
    assert "vm1" in r.out
    assert "iscsi 127.0.0.1:3260" in r.out
    assert env.chap_password(vid) not in r.out
    assert env.run("attach", "vm1", vid, "--bus", "scsi", "--target-dev", "sdc", "--persistent").code == 0
    r = env.run("attach", "vm1", vid)  # a repeat is the same attachment only with the same options
    assert r.code == cli.EXIT_CONFLICT
    assert "with other options" in r.err
    assert len(env.agent_sdk.list_attachments()) == 1
    r = env.run("detach", "vm1", vid)
    assert (r.code, r.out.strip()) == (0, f"detached volume {vid} from vm1")
    assert env.agent_sdk.list_attachments() == []
    assert env.run("detach", "vm1", vid).code == 0  # gone already: fine


def test_attach_json_redacts_secrets(env: Env) -> None:
    vid = env.volume()
    r = env.run("attach", "vm1", vid, "--json", "--read-only")
    assert r.code == 0
    data = r.json()
    assert data["state"] == "ATTACHMENT_STATE_ATTACHED"
    assert data["access_mode"] == "ACCESS_MODE_READ_ONLY"
    # the agent never hands out the CHAP password (output's redaction of one: test_cli_parts)
    assert data["connection_info"]["iscsi"]["chap"] == {"username": f"in-{vid[:24]}", "password": ""}
    assert env.chap_password(vid) not in r.out


def test_attach_shows_progress_steps(env: Env) -> None:
    """The CLI waits until its event stream is open before it calls: no step is missed."""
    vid = env.volume()
    r = env.run("--progress", "attach", "vm1", vid)
    assert r.code == 0, r.err
    shown = r.err.splitlines()
    assert shown[0] == "attach started"
    assert shown[1:4] == [f"  {s}: done" for s in STEPS]
    assert shown[4] == "attached"
    r = env.run("--progress", "detach", "vm1", vid)
    assert r.err.splitlines() == ["detach started", "detached"]


def test_attach_progress_is_best_effort(env: Env) -> None:
    env.agent.refuse["WatchEvents"] = [(grpc.StatusCode.UNIMPLEMENTED, "no events")]
    vid = env.volume()
    r = env.run("--progress", "attach", "vm1", vid)
    assert r.code == 0, r.err


def test_attach_to_a_missing_domain_exits_3(env: Env) -> None:
    vid = env.volume()
    r = env.run("attach", "vm9", vid)
    assert r.code == cli.EXIT_NOT_FOUND
    assert "domain 'vm9' does not exist on this host" in r.err


def test_attach_permission_denied_exits_6(env: Env) -> None:
    vid = env.volume()
    login_refused = Reply(returncode=10, stderr="iscsi-inq: Login Failed. Authentication failure (513)")
    env.services.runner.on(r"iscsi-inq", login_refused)  # the target refuses the CHAP credentials
    r = env.run("attach", "vm1", vid)
    assert r.code == cli.EXIT_PERMISSION
    assert "refused the CHAP credentials" in r.err
    assert "hint:" in r.err
    assert env.sdk.list_attachments(volume_id=vid) == []  # the failed attach was undone


def test_attachments_from_both_sides(env: Env) -> None:
    v1, v2 = env.volume("a"), env.volume("b")
    env.run("attach", "vm1", v1)
    env.run("attach", "vm2", v2)
    r = env.run("attachments")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split()[:4] == ["FROM", "ID", "VOLUME", "DOMAIN"]
    assert sorted(line.split()[0] for line in lines[1:]) == ["agent", "agent", "storage", "storage"]
    data = env.run("attachments", "--json").json()
    assert set(data) == {"agent", "storage"}
    assert "connection_info" in data["agent"][0]
    only = env.run("attachments", "--from", "agent", "--domain", "vm2", "--json").json()
    assert set(only) == {"agent"}
    assert [a["volume_id"] for a in only["agent"]] == [v2]
    storage = env.run("attachments", "--from", "storage", "--volume", v1, "--json").json()
    assert [a["volume_id"] for a in storage["storage"]] == [v1]


def test_attachments_empty(env: Env) -> None:
    assert env.run("attachments").out.strip() == "no attachments"


def test_connector(env: Env) -> None:
    r = env.run("connector")
    assert r.code == 0
    assert HOST_IQN in r.out
    assert "no (QEMU's initiator)" in r.out
    data = env.run("connector", "--json").json()
    assert data["host"] == "compute1"
    assert data["transports"] == ["TRANSPORT_ISCSI"]


def test_capacity(env: Env) -> None:
    env.volume(size="10G")
    r = env.run("capacity")
    row = r.out.splitlines()[1].split()
    assert (row[0], row[3]) == ("file", "10GiB")  # sizes of the real filesystem; 10G provisioned
    assert env.run("capacity", "--json").json()[0]["backend"] == "file"
    assert env.run("capacity", "lvm").code == cli.EXIT_NOT_FOUND


def test_nodes_of_a_single_node_service(env: Env) -> None:
    r = env.run("nodes")
    assert r.code == 0, r.err
    row = r.out.splitlines()[1].split()
    assert (row[0], row[2], row[3 + 2], row[4 + 2]) == ("(single)", "up", "file", "file")
    data = env.run("nodes", "--json").json()
    assert data[0]["up"] is True
    assert data[0]["backends"][0]["name"] == "file"


# health


def test_health_of_both_daemons(env: Env) -> None:
    r = env.run("health")
    assert r.code == 0, r.err
    rows = [line.split()[:3] for line in r.out.splitlines()[1:]]
    assert rows == [
        ["storage", env.storage_server.address, "SERVING"],
        ["agent", env.agent_server.address, "SERVING"],
    ]


def test_health_not_serving_exits_5(env: Env) -> None:
    env.agent_server.set_serving(AGENT_SERVICE, serving=False)
    r = env.run("health", "--json")
    assert r.code == cli.EXIT_UNAVAILABLE
    assert [d["status"] for d in r.json()] == ["SERVING", "NOT_SERVING"]
    assert "blockwire-agent" in r.err
    assert env.run("health", "--only", "storage").code == 0


def test_health_unreachable_daemon(env: Env) -> None:
    env.capsys.readouterr()
    code = cli.main(
        ["--storage", "127.0.0.1:1", "--timeout", "1", "health", "--only", "storage"], clock=env.clock
    )
    captured = env.capsys.readouterr()
    assert code == cli.EXIT_UNAVAILABLE
    assert "UNREACHABLE" in captured.out


# errors, retries, deadlines


def test_unavailable_twice_then_ok_is_retried(env: Env) -> None:
    env.storage.refuse["ListVolumes"] = [(grpc.StatusCode.UNAVAILABLE, "backend restarting")] * 2
    r = env.run("volume", "list")
    assert r.code == 0, r.err
    assert env.storage.count("ListVolumes") == 3
    assert len(env.clock.sleeps) == 2
    assert env.clock.sleeps[1] > env.clock.sleeps[0] * 0.9 or env.clock.sleeps[1] >= 0.2


def test_aborted_is_retried(env: Env) -> None:
    env.storage.refuse["DeleteVolume"] = [(grpc.StatusCode.ABORTED, "volume busy")]
    assert env.run("volume", "delete", "vol-1").code == 0
    assert env.storage.count("DeleteVolume") == 2


def test_retries_are_bounded_and_unavailable_exits_5(env: Env) -> None:
    env.storage.refuse["GetVolume"] = [(grpc.StatusCode.UNAVAILABLE, "target daemon down")] * 10
    r = env.run("volume", "show", "vol-1")
    assert r.code == cli.EXIT_UNAVAILABLE
    assert env.storage.count("GetVolume") == 5
    assert "target daemon down" in r.err
    assert "blockwire-storage" in r.err
    assert "--storage" in r.err


def test_not_found_is_not_retried(env: Env) -> None:
    env.run("volume", "show", "vol-x")
    assert env.storage.count("GetVolume") == 1
    assert env.clock.sleeps == []


def test_deadline_exits_7(env: Env) -> None:
    env.storage.hold.add("GetVolume")
    try:
        r = env.run("--timeout", "0.3", "volume", "show", "vol-1")
    finally:
        env.storage.release.set()
    assert r.code == cli.EXIT_DEADLINE
    assert "--timeout" in r.err


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, cli.EXIT_NO_SPACE),
        (grpc.StatusCode.UNAUTHENTICATED, cli.EXIT_PERMISSION),
        (grpc.StatusCode.FAILED_PRECONDITION, cli.EXIT_CONFLICT),
        (grpc.StatusCode.INTERNAL, cli.EXIT_ERROR),
        (grpc.StatusCode.UNIMPLEMENTED, cli.EXIT_ERROR),
        (grpc.StatusCode.DATA_LOSS, cli.EXIT_ERROR),
    ],
)
def test_status_codes_map_to_exit_codes(env: Env, code: grpc.StatusCode, exit_code: int) -> None:
    env.storage.refuse["CreateVolume"] = [(code, "what went wrong")]
    r = env.run("volume", "create", "data1", "1G")
    assert r.code == exit_code
    assert "blockwire: error: what went wrong" in r.err


def test_unreachable_agent_names_the_agent(env: Env) -> None:
    env.capsys.readouterr()
    code = cli.main(["--agent", "127.0.0.1:1", "--timeout", "1", "connector"], clock=env.clock)
    err = env.capsys.readouterr().err
    assert code == cli.EXIT_UNAVAILABLE
    assert "blockwire-agent" in err
    assert "--agent" in err
    assert "BLOCKWIRE_AGENT" in err


# the command line itself


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == cli.EXIT_USAGE
    assert cli.main(["volume", "frobnicate"]) == cli.EXIT_USAGE
    assert cli.main(["attach", "vm1"]) == cli.EXIT_USAGE
    assert cli.main(["--timeout", "-1", "volume", "list"]) == cli.EXIT_USAGE
    assert cli.main(["attach", "vm1", "v", "--bus", "ide"]) == cli.EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text
    for code in ("0", "1", "2", "3", "4", "5", "6", "7", "8"):
        assert f"\n  {code}  " in text
    for command in (
        "volume",
        "snapshot",
        "attach",
        "detach",
        "attachments",
        "connector",
        "health",
        "completion",
    ):
        assert command in text


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [
        ["volume", "create"],
        ["volume", "list"],
        ["volume", "show"],
        ["volume", "delete"],
        ["volume", "extend"],
        ["snapshot", "create"],
        ["snapshot", "list"],
        ["snapshot", "show"],
        ["snapshot", "delete"],
        ["attach"],
        ["detach"],
        ["attachments"],
        ["connector"],
        ["capacity"],
        ["nodes"],
        ["health"],
        ["completion"],
    ]
    for command in commands:
        capsys.readouterr()
        assert cli.main([*command, "--help"]) == 0
        assert "usage: blockwire " + " ".join(command) in capsys.readouterr().out


def test_addresses_default_to_the_environment(monkeypatch: pytest.MonkeyPatch, env: Env) -> None:
    monkeypatch.setenv("BLOCKWIRE_STORAGE", env.storage_server.address)
    env.capsys.readouterr()
    assert cli.main(["volume", "list", "--json"]) == 0
    assert json.loads(env.capsys.readouterr().out) == []


def test_default_addresses_are_the_daemons_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOCKWIRE_STORAGE", raising=False)
    monkeypatch.delenv("BLOCKWIRE_AGENT", raising=False)
    args = cli.build_parser().parse_args(["health"])
    assert args.storage == "unix:///run/blockwire/storage.sock"
    assert args.agent == "unix:///run/blockwire/agent.sock"


def test_global_options_work_before_and_after_the_command(env: Env) -> None:
    env.volume()
    before = env.run("--json", "volume", "list").json()
    after = env.run("volume", "list", "--json").json()
    assert before == after


def test_unix_socket_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = StorageRig.make(tmp_path)
    sock = tmp_path / "storage.sock"
    try:
        with serve(rig.servicer, address=f"unix://{sock}"):
            assert cli.main(["--storage", str(sock), "volume", "create", "x", "1G", "--json"]) == 0
    finally:
        rig.close()
    assert json.loads(capsys.readouterr().out)["name"] == "x"


def test_missing_tls_file_is_reported(env: Env, tmp_path: Any) -> None:
    r = env.run("--tls-ca", str(tmp_path / "missing.pem"), "volume", "list")
    assert r.code == cli.EXIT_ERROR
    assert "missing.pem" in r.err


def test_tls_cert_without_key_is_a_usage_error(env: Env, tmp_path: Any) -> None:
    r = env.run("--tls-cert", str(tmp_path / "c.pem"), "volume", "list")
    assert r.code == cli.EXIT_USAGE
    assert "key" in r.err


def test_volume_state_names_in_tables() -> None:
    assert output.volume_state(types_pb2.VOLUME_STATE_IN_USE) == "in_use"
    assert output.volume_state(99) == "99"


def test_attach_with_cinder_connection_info_from_a_file(env: Env, tmp_path: Path) -> None:
    """Cinder's LVM/tgt shape, filled in with an export storage really made for this host."""
    vid = env.volume()
    att = env.sdk.create_attachment(vid, env.agent_sdk.get_connector(), domain="vm1")
    t = att.connection_info.iscsi
    doc = json.loads((Path(__file__).parents[1] / "data" / "cinder" / "lvm_tgt_iscsi.json").read_text())
    doc["data"].update(
        target_iqn=t.paths[0].target_iqn,
        target_portal=t.paths[0].portal,
        target_lun=t.paths[0].lun,
        volume_id=vid,
        auth_username=t.chap.username,
        auth_password=t.chap.password,
    )
    path = tmp_path / "ci.json"
    path.write_text(json.dumps(doc))
    r = env.run("attach", "vm1", "--connection-info", str(path))
    assert r.code == cli.EXIT_CONFLICT  # Cinder announces no identity: the caller must opt out
    assert "announces no identity" in r.err
    r = env.run("attach", "vm1", "--connection-info", str(path), "--allow-unverified-identity")
    assert r.code == 0, r.err
    assert "127.0.0.1:3260" in r.out
    assert doc["data"]["auth_password"] not in r.out + r.err
    (att,) = env.agent_sdk.list_attachments()
    assert att.volume_id == doc["data"]["volume_id"]
    doc["data"]["target_lunz"] = 1
    path.write_text(json.dumps(doc))
    r = env.run("attach", "vm2", "--connection-info", str(path), "--allow-unverified-identity")
    assert r.code == cli.EXIT_USAGE
    assert "unknown key target_lunz" in r.err
    assert env.run("attach", "vm1").code == cli.EXIT_USAGE  # neither a volume id nor connection info
    assert env.run("detach", "vm1", doc["data"]["volume_id"]).code == 0


def test_volume_create_encrypted_reaches_the_service(env: Env) -> None:
    # this service has no key manager: the flag arrives, and the refusal says what to configure
    r = env.run("volume", "create", "enc1", "1G", "--encrypted", "--key-size", "256")
    assert r.code != 0
    assert "[keys]" in r.err
