"""libiscsi's userspace initiator (libiscsi-bin): a login from outside the kernel, for the checks that
a target refuses someone (wrong or missing CHAP, an initiator outside the ACL).

The guest tier uses it for those refusals too. Its kernel (Debian 12, 6.1) can oops in iscsi_tcp when
a kernel login is refused: the in-kernel connection cleanup (iscsi_cleanup_conn_work_fn) races
iscsid's teardown of the refused connection and dereferences a released socket in
iscsi_sw_tcp_release_conn. What is under test there is the target's refusal, which a userspace login
shows just as well.
"""

from __future__ import annotations

import subprocess

from blockwire.v1 import types_pb2 as pb


def url(path: pb.IscsiPath, user: str = "", password: str = "") -> str:
    """libiscsi's URL for one path of a LUN, with CHAP credentials when `user` is given."""
    cred = f"{user}%{password}@" if user else ""
    return f"iscsi://{cred}{path.portal}/{path.target_iqn}/{path.lun}"


def inquiry(initiator: str, target: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`iscsi-inq` as `initiator` against a libiscsi URL: logs in, sends INQUIRY, logs out."""
    return subprocess.run(
        ["iscsi-inq", "-i", initiator, *args, target],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def refused(initiator: str, target: str) -> str:
    """Asserts that the target refuses `initiator`'s login; returns what libiscsi said."""
    proc = inquiry(initiator, target)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the login was accepted: {said}"
    return said


def accepted(initiator: str, target: str) -> None:
    """Asserts that the login and an INQUIRY succeed."""
    proc = inquiry(initiator, target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
