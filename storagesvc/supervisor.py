"""ExportSupervisor: watches that the target side keeps the exports the catalog says should exist.

tgtd forgets every target when it restarts; hosts whose sessions then reconnect get "target not found"
and open-iscsi stops retrying. Like multipathd's path checker, this is supervision in the background,
not a wait in the attach path: every `interval` seconds `StorageService.repair_exports` compares the
exporters' live targets with the catalog (one `tgtadm --op show --mode target` for tgt) and rebuilds
what was lost under the volumes' locks, with the code `reconcile` uses at start. An interval of 0
disables it. `stop()` ends the thread within a bound.
"""

from __future__ import annotations

import logging

from blockwire.runtime.periodic import Periodic, Waiter, event_wait
from storagesvc.service import StorageService

log = logging.getLogger(__name__)


class ExportSupervisor:
    def __init__(self, service: StorageService, interval: float, *, waiter: Waiter = event_wait) -> None:
        self.service = service
        self.periodic = Periodic("export-supervisor", interval, self.check, waiter=waiter)
        self.repaired_total = 0  # exports rebuilt since start (a metric)

    def check(self) -> list[str]:
        """One round: the ids of the volumes whose export was rebuilt."""
        repaired = self.service.repair_exports()
        self.repaired_total += len(repaired)
        if repaired:
            log.warning("export supervisor: rebuilt the exports of %s", ", ".join(repaired))
        return repaired

    def start(self) -> None:
        if self.periodic.interval:
            log.info("export supervisor: checking the exports every %.1fs", self.periodic.interval)
        self.periodic.start()

    def stop(self, timeout: float = 10.0) -> bool:
        return self.periodic.stop(timeout)
