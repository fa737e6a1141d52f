"""FakeTgtd: a Runner that answers tgtadm like a tgtd would, keeping targets, LUNs, accounts and ACLs in
memory, and records every argv it was given (secrets revealed, for checks of what reached a command
line). Only the requests TgtExporter makes are understood; anything else exits 22 like tgtadm does.

Logical units behave as in tgt 1.0.85 (usr/target.c, usr/spc.c lu_config): a new one has tgt's default
identity; ``--op update --params`` applies its tokens in order and answers with the last error; ``path=``
is refused while the unit is online, otherwise closes the backing and opens the new one (a failed open
leaves the unit offline with no backing); ``online=0`` is refused under PREVENT MEDIUM REMOVAL. Backing
paths in `fail_opens` fail to open, once per entry."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from blockwire.runtime.executor import DEFAULT_OK, Arg, CommandFailed, OkCodes, Result, redact_argv

REFUSED = 22


@dataclass
class _Lun:
    scsi_id: str
    scsi_sn: str
    path: str = ""
    online: bool = True
    readonly: bool = False
    prevent_removal: bool = False


@dataclass
class _Target:
    iqn: str
    luns: dict[int, _Lun] = field(default_factory=dict)
    accounts: set[str] = field(default_factory=set)
    outgoing: set[str] = field(default_factory=set)
    acl: set[str] = field(default_factory=set)


@dataclass
class FakeTgtd:
    targets: dict[int, _Target] = field(default_factory=dict)
    accounts: set[str] = field(default_factory=set)
    portals: set[str] = field(default_factory=set)
    argvs: list[tuple[str, ...]] = field(default_factory=list)
    fail_opens: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(
        self,
        argv: Sequence[Arg],
        *,
        ok: OkCodes = DEFAULT_OK,
        timeout: float | None = None,
        stdin: Arg | None = None,
        env: Mapping[str, Arg] | None = None,
    ) -> Result:
        real = tuple(a if isinstance(a, str) else a.reveal() for a in argv)
        shown = redact_argv(argv)
        with self._lock:
            self.argvs.append(real)
            rc, out, err = self._answer(real)
        if rc not in ok:
            raise CommandFailed(shown, rc, err)
        return Result(shown, rc, ok[rc], out, err, 0.0)

    @staticmethod
    def _opts(argv: Sequence[str]) -> dict[str, str]:
        opts: dict[str, str] = {}
        i = 0
        while i < len(argv):
            a = argv[i]
            if a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                opts[a] = argv[i + 1]
                i += 2
            else:
                opts[a] = ""
                i += 1
        return opts

    def _answer(self, argv: tuple[str, ...]) -> tuple[int, str, str]:
        o = self._opts(argv[1:])
        op, mode = o.get("--op", ""), o.get("--mode", "")
        tid = int(o["--tid"]) if o.get("--tid", "").isdigit() else -1
        t = self.targets.get(tid)
        if op == "show" and mode == "target":
            return 0, self._show(), ""
        if op == "show" and mode == "portal":
            return 0, "".join(f"Portal: {p},1\n" for p in sorted(self.portals)), ""
        if op == "show" and mode == "sys":
            return 0, "System:\n    State: ready\n", ""
        if op == "new" and mode == "portal":
            self.portals.add(o.get("--param", "").removeprefix("portal="))
            return 0, "", ""
        if op == "new" and mode == "target":
            # tgt refuses a taken tid and a taken name alike (usr/target.c tgt_target_create; seen on
            # tgt 1.0.85: a second target of one IQN under another tid is refused)
            if t is not None or any(x.iqn == o.get("-T", "") for x in self.targets.values()):
                return REFUSED, "", "tgtadm: this target already exists\n"
            self.targets[tid] = _Target(o.get("-T", ""), {0: self._default_lun(tid, 0)})
            return 0, "", ""
        if op == "delete" and mode == "target":
            if self.targets.pop(tid, None) is None:
                return REFUSED, "", "tgtadm: can't find the target\n"
            return 0, "", ""
        if mode == "logicalunit" and t is not None:
            return self._logicalunit(op, tid, t, int(o.get("--lun", "1")), o)
        if mode == "account":
            user = o.get("--user", "")
            if op == "new":
                if user in self.accounts:
                    return REFUSED, "", "tgtadm: this account already exists\n"
                self.accounts.add(user)
            elif op == "delete":
                if user not in self.accounts:
                    return REFUSED, "", "tgtadm: can't find the account\n"
                self.accounts.discard(user)
            elif op == "bind" and t is not None:
                (t.outgoing if "--outgoing" in o else t.accounts).add(user)
            return 0, "", ""
        if mode == "target" and op in ("bind", "unbind") and t is not None:
            name = o.get("--initiator-name", "")
            (t.acl.add if op == "bind" else t.acl.discard)(name)
            return 0, "", ""
        return REFUSED, "", f"tgtadm: unknown request {' '.join(argv[5:9])}\n"

    @staticmethod
    def _default_lun(tid: int, lun: int) -> _Lun:
        return _Lun(scsi_id=f"IET     {tid:04x}{lun:04x}", scsi_sn=f"beaf{tid}{lun}")

    def _open(self, unit: _Lun, path: str) -> bool:
        if path in self.fail_opens:
            self.fail_opens.remove(path)
            return False
        unit.path, unit.online = path, True
        return True

    def _logicalunit(
        self, op: str, tid: int, t: _Target, lun: int, o: dict[str, str]
    ) -> tuple[int, str, str]:
        unit = t.luns.get(lun)
        if op == "new":
            if unit is not None:
                return REFUSED, "", "tgtadm: this logical unit number already exists\n"
            unit = self._default_lun(tid, lun)
            if "-b" in o and not self._open(unit, o["-b"]):
                return REFUSED, "", "tgtadm: invalid request\n"
            t.luns[lun] = unit
            return 0, "", ""
        if unit is None:
            return REFUSED, "", "tgtadm: can't find the logical unit\n"
        if op == "delete":
            del t.luns[lun]
            return 0, "", ""
        if op != "update":
            return REFUSED, "", "tgtadm: invalid request\n"
        error = ""
        for token in o.get("--params", "").split(","):
            key, _, value = token.partition("=")
            if key == "scsi_id":
                unit.scsi_id = value
            elif key == "scsi_sn":
                unit.scsi_sn = value
            elif key == "readonly":
                unit.readonly = value == "1"
            elif key == "online":
                if value == "1":
                    unit.online, error = True, ""
                elif unit.prevent_removal:
                    error = "this device has Prevent Removal set"
                else:
                    unit.online, error = False, ""
            elif key == "path":
                if unit.path and unit.online:
                    error = "invalid request"
                    continue
                unit.path, unit.online = "", False  # the backing store is closed
                error = "" if self._open(unit, value) else "invalid request"
            else:
                error = "invalid request"
        return (REFUSED, "", f"tgtadm: {error}\n") if error else (0, "", "")

    def _show(self) -> str:
        lines = []
        for tid, t in sorted(self.targets.items()):
            lines += [f"Target {tid}: {t.iqn}", "    System information:", "        Driver: iscsi"]
            lines += ["    LUN information:"]
            for n, u in sorted(t.luns.items()):
                lines += [
                    f"        LUN: {n}",
                    f"            Type: {'controller' if n == 0 else 'disk'}",
                    f"            SCSI ID: {u.scsi_id}",
                    f"            SCSI SN: {u.scsi_sn}",
                    "            Size: 0 MB, Block size: 512",
                    f"            Online: {'Yes' if u.online else 'No'}",
                    f"            Prevent removal: {'Yes' if u.prevent_removal else 'No'}",
                    f"            Readonly: {'Yes' if u.readonly else 'No'}",
                    f"            Backing store type: {'rdwr' if n else 'null'}",
                    f"            Backing store path: {u.path or 'None'}",
                    "            Backing store flags: ",
                ]
            lines += ["    Account information:", *(f"        {a}" for a in sorted(t.accounts))]
            lines += [f"        {a} (outgoing)" for a in sorted(t.outgoing)]
            lines += ["    ACL information:", *(f"        {a}" for a in sorted(t.acl))]
        return "\n".join(lines) + "\n"
