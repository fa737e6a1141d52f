"""What the scheduler sees of this process's backends: one `BackendState` per pool.

Capabilities each kind has on its own (an operator's `[[backends]] capabilities` table adds to them or
overrides them): `kind`, `transport` (iscsi, nvme-tcp, rbd), `thin_provisioning` (file volumes are
sparse files, lvm-thin and rbd are thin), `multiattach` (every backend: a shared export is
reference-counted), `encryption` (LUKS1 volumes: every backend served through an exporter; rbd not yet).
"""

from __future__ import annotations

from blockwire.errors import BlockwireError
from storagesvc.backends.base import DirectBackend
from storagesvc.context import Context, Pool
from storagesvc.scheduler import BackendState
from storagesvc.targets.base import transport_of


def own_capabilities(pool: Pool) -> dict[str, str]:
    backend = pool.backend
    if isinstance(backend, DirectBackend):
        transport = backend.transport.value
    elif pool.exporter is not None:
        transport = transport_of(pool.exporter).value
    else:
        transport = ""
    return {
        "kind": backend.kind,
        "transport": transport,
        "thin_provisioning": "true",
        "multiattach": "true",
        "encryption": "true",  # every kind: rbd images get the LUKS header through librbd
    }


def capabilities(ctx: Context, name: str) -> dict[str, str]:
    caps = own_capabilities(ctx.pools[name])
    caps.update(ctx.scheduler.capabilities.get(name, {}))
    return caps


def backend_state(ctx: Context, name: str) -> BackendState:
    """The state of one local backend now; a backend whose storage does not answer is down."""
    pool = ctx.pools[name]
    vols, _, provisioned = ctx.catalog.backend_counts(name)
    try:
        space = pool.backend.space()
        total, free, up = space.total_bytes, space.free_bytes, True
    except BlockwireError:
        total, free, up = 0, 0, False
    return BackendState(
        node="",
        backend=name,
        total_bytes=total,
        free_bytes=free,
        provisioned_bytes=provisioned,
        volume_count=vols,
        capabilities=capabilities(ctx, name),
        availability_zone=ctx.scheduler.zones.get(name, ""),
        up=up,
        max_over_subscription_ratio=ctx.scheduler.ratios.get(
            name, float(getattr(pool.backend, "ratio", 1.0))
        ),
    )


def local_backends(ctx: Context) -> list[BackendState]:
    return [backend_state(ctx, name) for name in ctx.pools]
