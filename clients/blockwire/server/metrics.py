"""Prometheus metrics of a daemon, served over HTTP at [metrics] listen (off by default).

* `blockwire_rpc_total{method, code}` and `blockwire_rpc_duration_seconds{method}`: every call, by the
  status code it ended with (the interceptor sits outermost, so refusals by the concurrency bound and by
  authorization count too);
* `blockwire_step_duration_seconds{step}`: the steps of the work (the daemon's `StepObserver`);
* gauges the daemon registers with `gauge`, read at scrape time (attachments by state, journal records in
  ERROR, paths up and down, catalog size ...);
* the process (`process_*`: CPU, memory, open files) and the platform (`python_info`).

Each daemon has its own registry, never prometheus_client's global one: two daemons (or a test) in one
process do not mix their numbers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from blockwire.runtime.clock import Clock, SystemClock
from blockwire.server import serving
from blockwire.validate import split_portal

log = logging.getLogger(__name__)

# 1 ms .. 2 min: a hot-plug takes ~10 ms, a multipath login ~0.5 s, an image copy minutes.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

GaugeRead = Callable[[], Mapping[tuple[str, ...], float]]

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor  # generic in the stubs only


class _Gauges(Collector):
    def __init__(self) -> None:
        self._gauges: list[tuple[str, str, Sequence[str], GaugeRead]] = []

    def add(self, name: str, documentation: str, labels: Sequence[str], read: GaugeRead) -> None:
        self._gauges.append((name, documentation, labels, read))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, documentation, labels, read in self._gauges:
            family = GaugeMetricFamily(name, documentation, labels=list(labels))
            try:
                values = read()
            except Exception:  # a scrape must not fail on one gauge; the log says which
                log.exception("metrics: gauge %s could not be read", name)
                continue
            for key, value in values.items():
                family.add_metric(list(key), value)
            yield family


class Metrics:
    """One daemon's metrics. Also the daemon's `StepObserver` (`observe`)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.rpcs = Counter(
            "blockwire_rpc",
            "Calls served, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "blockwire_rpc_duration_seconds",
            "Time to serve a call (a stream: until it ends)",
            ["method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.steps = Histogram(
            "blockwire_step_duration_seconds",
            "Time of one step of an attach, detach, export or extend",
            ["step"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._gauges = _Gauges()
        self.registry.register(self._gauges)

    def observe(self, step: str, seconds: float) -> None:
        self.steps.labels(step).observe(seconds)

    def gauge(self, name: str, documentation: str, labels: Sequence[str], read: GaugeRead) -> None:
        """A gauge whose values `read` returns at each scrape: {label values: value}."""
        self._gauges.add(name, documentation, labels, read)

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.rpcs.labels(method, code.name).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def interceptor(self) -> grpc.ServerInterceptor[Any, Any]:
        return _RpcInterceptor(self)

    def serve(self, listen: str) -> Callable[[], None]:
        """Serves /metrics on `listen` ("address:port"); returns what stops it."""
        host, port = split_portal(listen)
        server, thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        log.info("metrics on http://%s/metrics", listen)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


def _code_of(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    code = serving.status_code(context)
    if code is not None:
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


class _RpcInterceptor(_Interceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rpartition("/")[2]
        metrics, clock = self.metrics, self.metrics.clock

        @contextlib.contextmanager
        def measured(context: grpc.ServicerContext) -> Iterator[None]:
            start, failed = clock.monotonic(), True
            try:
                yield
                failed = False
            finally:
                metrics.record(method, _code_of(context, failed), clock.monotonic() - start)

        return serving.around(handler, measured)
