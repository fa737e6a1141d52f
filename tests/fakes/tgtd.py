"""FakeTgtd: a Runner that answers tgtadm like a tgtd would, keeping targets, LUNs, accounts and ACLs in
memory, and records every argv it was given (secrets revealed, for checks of what reached a command
line). Only the requests TgtExporter makes are understood; anything else exits 22 like tgtadm does."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hostagent.host.executor import DEFAULT_OK, Arg, CommandFailed, OkCodes, Result, redact_argv

REFUSED = 22


@dataclass
class _Target:
    iqn: str
    luns: set[int] = field(default_factory=lambda: {0})
    accounts: set[str] = field(default_factory=set)
    outgoing: set[str] = field(default_factory=set)
    acl: set[str] = field(default_factory=set)


@dataclass
class FakeTgtd:
    targets: dict[int, _Target] = field(default_factory=dict)
    accounts: set[str] = field(default_factory=set)
    portals: set[str] = field(default_factory=set)
    argvs: list[tuple[str, ...]] = field(default_factory=list)
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
            if t is not None:
                return REFUSED, "", "tgtadm: this target already exists\n"
            self.targets[tid] = _Target(o.get("-T", ""))
            return 0, "", ""
        if op == "delete" and mode == "target":
            if self.targets.pop(tid, None) is None:
                return REFUSED, "", "tgtadm: can't find the target\n"
            return 0, "", ""
        if mode == "logicalunit" and t is not None:
            lun = int(o.get("--lun", "1"))
            if op == "new":
                t.luns.add(lun)
            elif op == "delete":
                t.luns.discard(lun)
            return 0, "", ""
        if mode == "account":
            user = o.get("--user", "")
            if op == "new":
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

    def _show(self) -> str:
        lines = []
        for tid, t in sorted(self.targets.items()):
            lines += [f"Target {tid}: {t.iqn}", "    System information:", "        Driver: iscsi"]
            lines += ["    LUN information:", *(f"        LUN: {n}" for n in sorted(t.luns))]
            lines += ["    Account information:", *(f"        {a}" for a in sorted(t.accounts))]
            lines += [f"        {a} (outgoing)" for a in sorted(t.outgoing)]
            lines += ["    ACL information:", *(f"        {a}" for a in sorted(t.acl))]
        return "\n".join(lines) + "\n"
