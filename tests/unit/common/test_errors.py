"""Error → status code mapping, exercised through a real grpc.aio server with the interceptor."""
from __future__ import annotations

import grpc
import pytest
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.adapters import AdapterError
from services.common.errors import (AlreadyExistsError, FailedPreconditionError,
                                    InvalidArgumentError, NotFoundError, ResourceExhaustedError,
                                    status_code_for)
from services.common.grpc_server import ServiceHost
from services.common.pb.inlaid.v1 import engine_pb2, engine_pb2_grpc
from services.engine.errors import InvalidRequestError, UnknownTaskError

CODES = [
    (InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError("x"), grpc.StatusCode.ALREADY_EXISTS),
    (ResourceExhaustedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPreconditionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownTaskError("t"), grpc.StatusCode.NOT_FOUND),
    (InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (redis.exceptions.ConnectionError("down"), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL),
    (ValueError("x"), grpc.StatusCode.INTERNAL),  # a bare ValueError is a bug, not bad input
]


@pytest.mark.parametrize("exc,code", CODES)
def test_status_code_for(exc, code):
    assert status_code_for(exc) is code


class _Failing(engine_pb2_grpc.EngineServiceServicer):
    def __init__(self) -> None:
        self.error: Exception | None = None

    async def GetStatus(self, request, context):
        raise self.error

    async def Drain(self, request, context):
        return engine_pb2.DrainResponse(num_running=3)


async def test_interceptor_maps_errors_and_health_starts_not_serving():
    servicer = _Failing()
    host = ServiceHost(["inlaid.v1.EngineService"], "127.0.0.1", 0, grace_s=0.1)
    engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, host.server)
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="inlaid.v1.EngineService")
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await host.set_serving(True)
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            assert (await stub.Drain(engine_pb2.DrainRequest())).num_running == 3
            for exc, code in [(NotFoundError("no task 'x'"), grpc.StatusCode.NOT_FOUND),
                              (KeyError("boom"), grpc.StatusCode.INTERNAL)]:
                servicer.error = exc
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetStatus(engine_pb2.GetStatusRequest())
                assert info.value.code() is code
                assert "x" in info.value.details() or "boom" in info.value.details()
    finally:
        await host.stop()
