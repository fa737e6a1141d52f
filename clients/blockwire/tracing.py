"""Tracing through the OpenTelemetry API: spans for calls and steps, and the W3C trace context carried in
gRPC metadata, so that one attach is one trace from the CLI or SDK through the agent to storage.

The library only makes spans (`opentelemetry-api`: without a configured provider they cost next to nothing
and go nowhere); the daemons configure where spans go (`blockwire.server.tracing`, [tracing] exporter), as
they configure logging. An embedder that configures OpenTelemetry itself gets blockwire's spans in its own
traces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

TRACER = "blockwire"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


@contextlib.contextmanager
def span(
    name: str,
    kind: SpanKind = SpanKind.INTERNAL,
    context: Context | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span around the `with` body; an exception marks it failed (and is re-raised)."""
    with tracer().start_as_current_span(name, context=context, kind=kind, attributes=attributes) as s:
        yield s


def inject(metadata: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the current trace context (traceparent, tracestate, baggage) for a gRPC call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*metadata, *carrier.items())


def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The trace context a caller sent in gRPC metadata (an empty one when it sent none)."""
    carrier = {k: v if isinstance(v, str) else v.decode(errors="replace") for k, v in metadata or ()}
    return propagate.extract(carrier)


def fail(s: Span, description: str) -> None:
    s.set_status(Status(StatusCode.ERROR, description))
