"""Faults: a gRPC server interceptor in front of a REAL servicer, for what a real service cannot be
driven into from a test: a refusal with a given status code (UNAVAILABLE while a daemon restarts,
ABORTED, a code the CLI must map) and a call that hangs. It also counts the calls each method got.

It answers nothing itself: a call it neither refuses nor holds is the real servicer's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc


class Faults(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.refuse: dict[str, list[tuple[grpc.StatusCode, str]]] = {}  # method -> refusals, in turn
        self.hold: set[str] = set()  # methods that wait for `release` before the real servicer runs
        self.release = threading.Event()
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def count(self, method: str) -> int:
        with self._lock:
            return self.calls.count(method)

    def _before(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            queue = self.refuse.get(method)
            failure = queue.pop(0) if queue else None
        if failure is not None:
            context.abort(*failure)
        if method in self.hold:
            self.release.wait(timeout=10.0)  # bounded: the client's deadline ends the call first

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method.rsplit("/", 1)[-1]
        handler = continuation(handler_call_details)
        if handler is None or method in ("Check", "Watch"):  # grpc.health.v1 is never faulted
            return handler
        with self._lock:
            self.calls.append(method)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            def unary_call(request: Any, context: grpc.ServicerContext) -> Any:
                self._before(method, context)
                return unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_call, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            def stream_call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._before(method, context)
                yield from stream(request, context)

            return grpc.unary_stream_rpc_method_handler(
                stream_call, handler.request_deserializer, handler.response_serializer
            )
        return handler
