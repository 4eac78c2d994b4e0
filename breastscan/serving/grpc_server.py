"""The gRPC front end of the service: ``breastscan.v1.BreastScan`` over the request engine.

The service's gRPC API is served by a plain (synchronous) ``grpcio`` server that runs
inside each of the service's worker processes, beside its HTTP API, and sends every
request through the same :class:`breastscan.serving.engine.Engine`. The engine's
coroutines belong to the event loop of that worker (BentoML's), which this module does
not own: each RPC runs on one of the server's threads, hands its coroutine to that loop
with :func:`asyncio.run_coroutine_threadsafe` and waits for the answer, at most
``timeout_s`` seconds (or the client's deadline when it is shorter). The server threads
never touch the loop otherwise, so a slow model blocks only its own RPC's thread.

A request message becomes the one :class:`breastscan.serving.request.Request`
(:func:`breastscan.serving.request.from_proto`), the engine's answer its message
(:func:`breastscan.serving.answer.to_proto`). Every refusal ends the RPC with the gRPC status
of its code in the error table (:data:`breastscan.serving.answer.ERRORS`), the code in the
trailing metadata entry ``error-code``: a client mistake ``INVALID_ARGUMENT``, a shed
request ``UNAVAILABLE`` (``overloaded``: retry), no answer in time ``DEADLINE_EXCEEDED``
(the engine's work is cancelled), anything else ``INTERNAL`` with a generic message, its
traceback logged here, so nothing of the request (pixels, file contents) leaves in an
error. A request larger than ``max_message_bytes`` is refused by gRPC itself
(``RESOURCE_EXHAUSTED``) before it reaches a handler.

The server also offers the standard health service (``grpc.health.v1.Health``; the
overall service ``""`` and ``breastscan.v1.BreastScan``, flipped together by
:meth:`GrpcServerHandle.set_serving`) and server reflection, so that
``grpcurl -plaintext HOST:PORT list`` and ``describe`` work without the ``.proto`` file.

Several worker processes may serve one port: the server binds with ``SO_REUSEPORT`` (on
by default in gRPC, set explicitly here) and the kernel spreads connections over them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from breastscan.serving.answer import ERROR_CODE_KEY, ERRORS, INTERNAL_MESSAGE, ApiError, to_proto
from breastscan.serving.engine import Engine
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb
from breastscan.serving.proto.breastscan.v1 import breastscan_pb2_grpc as pb_grpc
from breastscan.serving.request import from_proto

log = logging.getLogger(__name__)

SERVICE_NAME = "breastscan.v1.BreastScan"
"""Full name of the API's service (health checks and reflection name it)."""

_T = TypeVar("_T")

# Distinct classes before Python 3.11, one class since.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)


class GrpcBindError(RuntimeError):
    """The gRPC server could not listen on the address it was given."""


class _Deadline(Exception):
    """The engine did not answer within the RPC's time limit."""


# --------------------------------------------------------------------------- servicer


class BreastScanServicer(pb_grpc.BreastScanServicer):
    """The ``breastscan.v1.BreastScan`` RPCs over an :class:`Engine` on someone else's loop.

    Args:
        engine: the request engine.
        loop: the running event loop the engine's coroutines belong to (the model
            service's worker loop); RPC threads submit to it and wait.
        timeout_s: longest wait for one answer; a client's shorter deadline wins.
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.engine = engine
        self.loop = loop
        self.timeout_s = float(timeout_s)

    # ------------------------------------------------------------------ RPCs
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.Prediction:
        """One model's answer for one image."""
        return self._serve(context, "Predict", request)

    def Analyze(self, request: pb.AnalyzeRequest,
                context: grpc.ServicerContext) -> pb.AnalyzeResponse:
        """Every model of the image's modality."""
        return self._serve(context, "Analyze", request)

    def ListModels(self, request: pb.ListModelsRequest,
                   context: grpc.ServicerContext) -> pb.ListModelsResponse:
        """The served models (no model call)."""
        return self._serve(context, "ListModels", request)

    def Preview(self, request: pb.PreviewRequest,
                context: grpc.ServicerContext) -> pb.PreviewResponse:
        """The decoded image as an 8-bit PNG."""
        return self._serve(context, "Preview", request)

    # ------------------------------------------------------------------ plumbing
    def _await(self, context: grpc.ServicerContext, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the engine's loop and wait for it within the RPC's time limit.

        The engine's work is cancelled when the limit passes or the RPC ends early (the
        client cancelled, or the server is stopping).

        Raises:
            _Deadline: no answer in time.
            concurrent.futures.CancelledError: the RPC ended before the answer.
            Exception: whatever the coroutine raised.
        """
        wait = self.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, float(remaining))
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        context.add_callback(future.cancel)
        try:
            return future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                raise  # the engine's own timeout, not this wait's
            future.cancel()
            raise _Deadline(f"no answer within {wait:.3g} s") from None

    def _serve(self, context: grpc.ServicerContext, method: str, message: Any) -> Any:
        """The answer message of one RPC, or the RPC ended with the error table's status."""
        try:
            request = from_proto(method, message, request_id=_metadata(context, "x-request-id"))
            answer = self._await(context, self.engine.answer(request))
            if isinstance(answer, list):
                return pb.ListModelsResponse(models=[to_proto(info) for info in answer])
            return to_proto(answer)
        except ApiError as exc:
            (log.warning if exc.kind.http >= 500 else log.info)("gRPC %s refused (%s): %s", method, exc.code,
                                                                 exc.message)
            _abort(context, exc.code, exc.message)
        except _Deadline as exc:
            log.warning("gRPC %s: %s", method, exc)
            _abort(context, "deadline_exceeded", str(exc))
        except _TIMEOUTS:  # the engine's own time limit
            log.warning("gRPC %s: the engine timed out", method, exc_info=True)
            _abort(context, "deadline_exceeded", "the model did not answer in time")
        except concurrent.futures.CancelledError:
            log.info("gRPC %s cancelled before its answer", method)
            _abort(context, "cancelled", "the request was cancelled")
        except Exception:
            log.exception("gRPC %s failed", method)
            _abort(context, "internal", INTERNAL_MESSAGE)


def _metadata(context: grpc.ServicerContext, key: str) -> str:
    """A request metadata value (``""`` when absent)."""
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return str(value)[:64]
    return ""


def _abort(context: grpc.ServicerContext, code: str, message: str) -> NoReturn:
    """End the RPC with the error table's status for ``code``, the code in the ``error-code`` trailer."""
    context.set_trailing_metadata(((ERROR_CODE_KEY, code),))
    context.abort(getattr(grpc.StatusCode, ERRORS[code].grpc), message)
    raise AssertionError("grpc.ServicerContext.abort returned")  # it always raises


class DecodeGuard(grpc.ServerInterceptor):
    """Server interceptor: a request message that is not valid protobuf is ``INVALID_ARGUMENT``.

    grpcio answers a request its deserializer cannot read with ``INTERNAL`` ("Exception
    deserializing request!"), a server error for a client's mistake. This interceptor
    takes the decoding over for every method (streams included): the handler receives raw
    bytes and decodes them itself, refusing undecodable ones with code ``malformed_request``.
    """

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = _guarded_decoder(handler.request_deserializer, details.method)
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        inner, streaming = getattr(handler, kind), handler.request_streaming

        def behavior(received: Any, context: grpc.ServicerContext) -> Any:
            if streaming:
                return inner((decode(raw, context) for raw in received), context)
            return inner(decode(received, context), context)

        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(behavior, request_deserializer=None, response_serializer=handler.response_serializer)


def _guarded_decoder(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes, Any], Any]:
    def decode(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # noqa: BLE001 -- any decoding failure is the client's message
            _abort(context, "malformed_request", f"the request message of {method} is not valid protobuf")
    return decode


# --------------------------------------------------------------------------- server


class GrpcServerHandle:
    """A started gRPC server: its port, its health status, and how to stop it.

    Attributes:
        server: the ``grpc.Server``.
        port: the port it listens on (the chosen one when asked for port 0).
        address: the address it was bound to, ``host:port`` as asked.
        servicer: the :class:`BreastScanServicer`.
        health: the health servicer (statuses of ``""`` and :data:`SERVICE_NAME`).
    """

    def __init__(self, server: grpc.Server, port: int, address: str, servicer: BreastScanServicer,
                 health_servicer: health.HealthServicer,
                 executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self.server = server
        self.port = port
        self.address = address
        self.servicer = servicer
        self.health = health_servicer
        self._executor = executor
        self._serving = False

    @property
    def serving(self) -> bool:
        """Whether the health service says ``SERVING``."""
        return self._serving

    def set_serving(self, serving: bool) -> None:
        """Say ``SERVING`` or ``NOT_SERVING`` for the overall service and :data:`SERVICE_NAME`.

        RPCs are answered either way: the status tells load balancers and probes whether to
        send requests (e.g. ``NOT_SERVING`` while models load or the process drains).
        """
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)
        self._serving = bool(serving)
        log.info("gRPC health on port %d: %s", self.port, "SERVING" if serving else "NOT_SERVING")

    def stop(self, grace: float | None = 5.0) -> None:
        """Say ``NOT_SERVING`` for good, refuse new RPCs and stop once in-flight ones end.

        Blocks until the server has stopped (at most about ``grace`` seconds, after which
        remaining RPCs are cancelled). Do not call it on the engine's event loop thread,
        whose coroutines the in-flight RPCs wait for: from a coroutine there, use
        ``await asyncio.to_thread(handle.stop, grace)``.

        Args:
            grace: seconds in-flight RPCs may still take; ``None`` cancels them at once.
        """
        self.health.enter_graceful_shutdown()
        self._serving = False
        self.server.stop(grace).wait()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("gRPC server on port %d stopped", self.port)


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # a bare IPv6 address
        host = f"[{host}]"
    return f"{host}:{int(port)}"


def start_grpc_server(
    engine: Engine,
    loop: asyncio.AbstractEventLoop,
    *,
    host: str,
    port: int,
    max_workers: int,
    max_message_bytes: int,
    timeout_s: float,
    serving: bool = True,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> GrpcServerHandle:
    """Start the ``breastscan.v1.BreastScan`` gRPC server (with health and reflection).

    Args:
        engine: the request engine every RPC goes through.
        loop: the event loop the engine's coroutines run on; it must be running (or run
            soon) in another thread than the server's.
        host: address to listen on (``0.0.0.0`` or ``[::]`` for all interfaces).
        port: port to listen on; ``0`` picks a free one (see :attr:`GrpcServerHandle.port`).
        max_workers: server threads, i.e. RPCs handled at once; each waits for its answer
            from the loop, so this bounds the requests one process has in flight over gRPC.
        max_message_bytes: largest request message accepted; larger ones are refused by
            gRPC with ``RESOURCE_EXHAUSTED``. Allow for the upload limit plus a few KiB, or
            ``H * W * C * itemsize`` of the largest raw array accepted.
        timeout_s: longest time one RPC waits for the engine (``DEADLINE_EXCEEDED`` after).
        serving: the initial health status.
        interceptors: server interceptors, e.g. API-key authentication
            (:func:`breastscan.serving.auth.grpc_interceptor`).

    Returns:
        The started server's handle.

    Raises:
        GrpcBindError: the address cannot be bound (port in use without ``SO_REUSEPORT``,
            no permission, unknown host).
        ValueError: a non-positive ``max_workers``, ``max_message_bytes`` or ``timeout_s``.
    """
    if max_workers <= 0 or max_message_bytes <= 0:
        raise ValueError(f"max_workers and max_message_bytes must be > 0, got {max_workers}, "
                         f"{max_message_bytes}")
    servicer = BreastScanServicer(engine, loop, timeout_s=timeout_s)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc")
    options = [
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.max_send_message_length", -1),  # answers carry PNGs at the image's own size
        ("grpc.so_reuseport", 1),  # several worker processes may share the port
    ]
    server = grpc.server(executor, options=options, interceptors=[*interceptors, DecodeGuard()])
    pb_grpc.add_BreastScanServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    address = _address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises when the bind fails
        bound, reason = 0, str(exc)
    else:
        reason = "no port was bound"
    if not bound:
        server.stop(None)
        executor.shutdown(wait=False)
        raise GrpcBindError(f"cannot listen for gRPC on {address} ({reason}): is the port used by "
                            "another program, or the host not an address of this machine?")
    server.start()
    handle = GrpcServerHandle(server, int(bound), address, servicer, health_servicer, executor)
    handle.set_serving(serving)
    log.info("gRPC server %s listening on %s (port %d, %d threads, %d-byte messages, %.3g s timeout)",
             SERVICE_NAME, address, bound, max_workers, max_message_bytes, timeout_s)
    return handle
