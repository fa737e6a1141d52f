"""Where a daemon's spans go ([tracing] exporter), and the server side of trace propagation: every call is a
SERVER span whose parent is the caller's span (W3C traceparent in the gRPC metadata), current while the
handler runs, so the daemon's own steps and outgoing calls (the agent's to storage) join the caller's trace.

Exporters: "" (none: the default), "otlp" (OTLP over gRPC to $OTEL_EXPORTER_OTLP_ENDPOINT, needs the
opentelemetry-exporter-otlp-proto-grpc package), "jsonl:/path" (one JSON object per finished span appended
to a file: for tests and for a quick look without a collector).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from blockwire import tracing
from blockwire.observability import TracingConfig
from blockwire.server import serving

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor  # generic in the stubs only


class JsonLinesExporter(SpanExporter):
    """Appends each finished span to a file as one JSON object (ids in hex, as traceparent spells them)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for s in spans:
            ctx = s.get_span_context()
            parent = s.parent
            lines.append(
                json.dumps(
                    {
                        "name": s.name,
                        "service": str(s.resource.attributes.get("service.name", "")),
                        "kind": s.kind.name,
                        "trace_id": f"{ctx.trace_id:032x}" if ctx else "",
                        "span_id": f"{ctx.span_id:016x}" if ctx else "",
                        "parent_span_id": f"{parent.span_id:016x}" if parent else "",
                        "status": s.status.status_code.name,
                        "start_ns": s.start_time,
                        "end_ns": s.end_time,
                        "attributes": {k: str(v) for k, v in (s.attributes or {}).items()},
                    }
                )
            )
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write("".join(f"{line}\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def configure(config: TracingConfig, service: str) -> Callable[[], None] | None:
    """Installs the daemon's tracer provider (process-wide, as OpenTelemetry has it) when an exporter is
    configured; returns what flushes and stops it, or None (no exporter: spans go nowhere)."""
    if not config.exporter:
        return None
    if config.exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]  # noqa: PLC0415
                OTLPSpanExporter,
            )
        except ImportError:
            raise ValueError(
                "[tracing] exporter = otlp needs the opentelemetry-exporter-otlp-proto-grpc package"
            ) from None
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

        processor: Any = BatchSpanProcessor(OTLPSpanExporter())
    else:
        processor = SimpleSpanProcessor(JsonLinesExporter(config.exporter.removeprefix("jsonl:")))
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider.shutdown


class TracingInterceptor(_Interceptor):
    """Each call a SERVER span named after its method, child of the caller's span."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        name = handler_call_details.method.lstrip("/")
        parent = tracing.extract(handler_call_details.invocation_metadata)

        @contextlib.contextmanager
        def traced(context: grpc.ServicerContext) -> Iterator[None]:
            with tracing.span(name, SpanKind.SERVER, parent, {"rpc.system": "grpc"}) as s:
                try:
                    yield
                finally:
                    code = serving.status_code(context)
                    s.set_attribute("rpc.grpc.status_code", (code or grpc.StatusCode.OK).name)
                    if code is not None and code is not grpc.StatusCode.OK:
                        tracing.fail(s, code.name)

        return serving.around(handler, traced)
