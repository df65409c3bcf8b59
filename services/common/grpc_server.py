"""ServiceHost: a grpc.aio server with the error interceptor, health, reflection and SIGTERM handling."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.errors import status_code_for

log = logging.getLogger(__name__)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler into status codes (services.common.errors);
    unknown ones become INTERNAL and are logged with their traceback."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return wrap_unary_request_handler(handler, lambda behavior: _wrap_unary(behavior, method),
                                          lambda behavior: _wrap_stream(behavior, method),
                                          _lenient(handler.request_deserializer))


def wrap_unary_request_handler(handler: grpc.RpcMethodHandler, wrap_unary: Callable[[Callable], Callable],
                               wrap_stream: Callable[[Callable], Callable],
                               request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """handler with its behavior wrapped: a unary-unary one by wrap_unary, a unary-stream one by
    wrap_stream, request_deserializer (when given) parsing its requests; client- and bidi-streaming
    handlers come back as they are (no Inlaid service has them)."""
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), request_deserializer=deserializer,
                                                   response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream),
                                                    request_deserializer=deserializer,
                                                    response_serializer=handler.response_serializer)
    return handler


class _Undecodable:
    """Stands in for a request whose bytes did not parse (garbage, or strings that are not
    UTF-8). grpc.aio answers a raising deserializer with UNKNOWN and logs a traceback
    (found by tests/fuzz); the wrapped handler answers INVALID_ARGUMENT instead."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the client's bytes
            return _Undecodable(exc)
    return parse


async def _reject_undecodable(context: grpc.aio.ServicerContext, request) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request message does not parse: {request.error}")


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code = status_code_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
        await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
    await context.abort(code, str(exc))


def _wrap_unary(behavior: Callable, method: str) -> Callable:
    async def wrapped(request, context):
        await _reject_undecodable(context, request)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the interceptor is the one place that maps all
            await _abort(context, exc, method)
    return wrapped


def _wrap_stream(behavior: Callable, method: str) -> Callable:
    async def wrapped(request, context) -> AsyncIterator:
        await _reject_undecodable(context, request)
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, method)
    return wrapped


class ServiceHost:
    """Wires one service's servicers into a server: health starts NOT_SERVING and only
    `set_serving(True)` (after the model is loaded and warm) flips it; SIGTERM/SIGINT flip it
    back, then the server stops with a grace period and `on_stop` callbacks free resources."""

    def __init__(self, service_names: list[str], host: str = "0.0.0.0", port: int = 0,
                 grace_s: float = 5.0, max_message_mb: int = 64,
                 interceptors: list[grpc.aio.ServerInterceptor] | None = None) -> None:
        self.service_names = list(service_names)
        self.grace_s = grace_s
        size = max_message_mb * 1024 * 1024
        self.server = grpc.aio.server(interceptors=[*(interceptors or []), ErrorInterceptor()], options=[
            ("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)])
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        self._address = f"{host}:{port}"
        self.port = 0
        self._stopping = False
        self._stopped = asyncio.Event()
        self._on_stop: list[Callable] = []
        self._on_stopping: list[Callable] = []

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with port 0)."""
        self.port = self.server.add_insecure_port(self._address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {self._address}")
        await self.server.start()
        await self.set_serving(False)
        return self.port

    async def set_serving(self, is_serving: bool) -> None:
        status = _SERVING if is_serving else _NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    def on_stopping(self, callback: Callable) -> None:
        """Register a (sync or async) callable run when shutdown begins, before the grace
        period (e.g. so in-flight streams know the server, not the client, is leaving)."""
        self._on_stopping.append(callback)

    def on_stop(self, callback: Callable) -> None:
        """Register a (sync or async) callable run after the server stopped."""
        self._on_stop.append(callback)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(self.stop(s.name)))

    async def stop(self, reason: str = "stop") -> None:
        if self._stopping:
            return await self._stopped.wait()
        self._stopping = True
        log.info("shutting down (%s): NOT_SERVING, grace %.1f s", reason, self.grace_s)
        await self.set_serving(False)
        for callback in self._on_stopping:
            await _call(callback)
        await self.server.stop(self.grace_s)
        for callback in reversed(self._on_stop):
            await _call(callback)
        self._stopped.set()

    async def wait(self) -> None:
        """Block until stop() finished (by signal or by a caller)."""
        await self._stopped.wait()


async def _call(callback: Callable) -> None:
    result = callback()
    if asyncio.iscoroutine(result):
        await result


async def run_until_stopped(server) -> None:
    """Run a role's server object (its `host` a ServiceHost, `start()` binding and warming it):
    SIGTERM/SIGINT stop it gracefully; returns once it has stopped."""
    server.host.install_signal_handlers()
    await server.start()
    await server.host.wait()


def run_main(serve: Callable, config_from_env: Callable) -> None:
    """A service's `main()`: logging from the environment, then `serve(config_from_env())`."""
    from services.common.logging import LoggingConfig, setup_logging
    logging_config = LoggingConfig.from_env()
    setup_logging(logging_config.level, logging_config.is_json)
    asyncio.run(serve(config_from_env()))
