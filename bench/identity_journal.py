"""The two agent-side steps of a QEMU-native iSCSI attach, each contender side by side in one run.

    sudo python -m bench.identity_journal [--rounds 40] [--out bench/results]

* identity, against a LUN with CHAP and an initiator ACL on a tgtd of our own (tests/host/daemons.py):
  `tools` = libiscsi's iscsi-inq, VPD 0x83 then VPD 0x80 (the serial: iscsi-inq prints tgt's binary NAA
  designator as text, so the connector falls back to it), two processes; `tools-83` = VPD 0x83 alone;
  `inproc` = hostagent.host.libiscsi.InprocLibiscsi, VPD 0x83 with the binary NAA read in hex (one
  login in this process, no serial needed).
* journal, in a directory under --state-dir (/var/tmp by default: the root file system, as the agent's
  state): an attach's three records (ATTACHING; the export id; ATTACHED). `rewrite` = each record a
  new file (temporary file, fsync, rename, directory fsync: what every put did before); `append` =
  Journal.put (the first record a new file, the later two appended with fdatasync).

Rounds interleaved, the order rotating each round; the first round warms up and is not counted.
Writes bench/results/identity-journal-YYYY-MM-DD.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "clients")]

from bench.facts import host_facts, pct  # noqa: E402
from blockwire.model import Chap, ConnectionInfo, LocalConnection  # noqa: E402
from blockwire.runtime.clock import SystemClock  # noqa: E402
from blockwire.runtime.executor import Executor  # noqa: E402
from blockwire.secret import Secret  # noqa: E402
from hostagent.host.libiscsi import InprocLibiscsi, load  # noqa: E402
from hostagent.journal import Journal, encode_record  # noqa: E402
from hostagent.model import AttachmentState, JournalRecord  # noqa: E402
from hostagent.tools.libiscsi import Libiscsi, Lun  # noqa: E402
from tests.host.daemons import Tgtd, free_port, free_tgt_control_port  # noqa: E402

WWN = "6001405be4c11d0e1a2b3c4d5e6f7000"
INITIATOR = "iqn.2026-01.io.blockwire.bench:identity-host"


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(pct(values, 50), 2),
        "p95": round(pct(values, 95), 2),
        "mean": round(sum(values) / len(values), 2) if values else 0.0,
        "min": round(min(values), 2) if values else 0.0,
    }


def ms(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def rounds(n: int, contenders: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
    names = list(contenders)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(n + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = ms(contenders[name])
            if r:
                times[name].append(t)
    return {k: stats(v) for k, v in times.items()}


def identity(n: int, tmp: Path) -> dict[str, Any]:
    lib, why = load()
    if lib is None:
        raise SystemExit(f"libiscsi does not load: {why}")
    port = free_port(("127.0.0.1",))
    tgtd = Tgtd(portals=(f"127.0.0.1:{port}",), control_port=free_tgt_control_port())
    tgtd.start()
    try:
        backing = tmp / "lun.img"
        with backing.open("wb") as f:
            f.truncate(8 << 20)
        iqn, user, password = "iqn.2026-01.io.blockwire.bench:identity", "bench-id", uuid.uuid4().hex
        tgtd.adm("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
        tgtd.adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(backing))
        tgtd.adm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                 "--params", f"scsi_id={WWN},scsi_sn=BENCHSERIAL")  # fmt: skip
        tgtd.adm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        tgtd.adm("--op", "bind", "--mode", "account", "--tid", "1", "--user", user)
        tgtd.adm("--op", "bind", "--mode", "target", "--tid", "1", "-Q", INITIATOR)
        lun, chap = Lun("127.0.0.1", port, iqn, 1), Chap(user, Secret(password))
        tools = Libiscsi(Executor(), timeout=15)
        inproc = InprocLibiscsi(lib, SystemClock(), timeout=15)
        assert WWN in inproc.identities(lun, chap, INITIATOR)
        return rounds(
            n,
            {
                "tools": lambda: (tools.identities(lun, chap, INITIATOR), tools.serial(lun, chap, INITIATOR)),
                "tools-83": lambda: tools.identities(lun, chap, INITIATOR),
                "inproc": lambda: inproc.identities(lun, chap, INITIATOR),
            },
        )
    finally:
        tgtd.stop()


def journal(n: int, state_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bw-journal-bench-", dir=state_dir) as tmp:
        j = Journal(tmp)
        first = JournalRecord(
            volume_id="vol-bench",
            domain="dom",
            state=AttachmentState.ATTACHING,
            connection_info=ConnectionInfo(transport=LocalConnection("/dev/loop9"), volume_id="vol-bench"),
        )
        records = [
            first,
            replace(first, attachment_id="att-1"),
            replace(first, state=AttachmentState.ATTACHED),
        ]

        def rewrite() -> None:
            path = j._path(first.volume_id, "dom-rewrite")
            for a in records:
                j._create(path, encode_record(a))
            j.delete(first.volume_id, "dom-rewrite")

        def append() -> None:
            for a in records:
                j.put(a)
            j.delete(first.volume_id, first.domain)  # (both contenders end with the same delete)

        return rounds(n, {"rewrite": rewrite, "append": append})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.identity_journal", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--state-dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host_facts(),
    }
    with tempfile.TemporaryDirectory(prefix="bw-identity-bench-") as tmp:
        results["identity"] = identity(args.rounds, Path(tmp))
    results["journal"] = journal(args.rounds, args.state_dir)
    results["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    day = results["date"][:10]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"identity-journal-{day}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    m = results["machine"]
    lines = [
        f"# The attach path's identity read and journal writes, contenders side by side, {day}",
        "",
        f"Machine: {m['cores']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}; load average "
        f"before {m['load_before']}, after {m['load_after']}. Rounds interleaved, order rotating; ms per "
        "attach's worth of work. Compare ratios (other runs share the cores).",
        "",
        "| step | contender | n | p50 ms | p95 ms | mean ms | p50 / first contender |",
        "|---|---|---|---|---|---|---|",
    ]
    for step in ("identity", "journal"):
        base = next(iter(results[step].values()))["p50"]
        for name, s in results[step].items():
            lines.append(
                f"| {step} | {name} | {s['n']} | {s['p50']} | {s['p95']} | {s['mean']} | "
                f"{s['p50'] / base:.2f}x |"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
