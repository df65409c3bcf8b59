"""Tenancy through the real auth interceptor: tasks and requests are private to their tenant."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.auth import ApiKeyStore, AuthInterceptor
from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from tests.unit.gateway.conftest import write_lora

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b", "key-admin": {"tenant": "ops", "is_admin": True}}


def _as(key: str) -> tuple:
    return (("x-api-key", key),)


@pytest.fixture
async def gateway(make_gateway, gateway_config):
    interceptor = AuthInterceptor(ApiKeyStore.from_mapping(KEYS))
    return await make_gateway(gateway_config, interceptors=[interceptor])


async def _code(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code()


async def test_tasks_are_private_to_their_tenant_and_admin_tasks_shared(gateway, tmp_path):
    path = str(write_lora(tmp_path / "a"))
    stub = gateway.stub
    assert await _code(stub.ListTasks(gateway_pb2.ListTasksRequest())) is \
        grpc.StatusCode.UNAUTHENTICATED
    await stub.AddTask(gateway_pb2.AddTaskRequest(name="mine", adapter_path=path),
                       metadata=_as("key-a"))
    await stub.AddTask(gateway_pb2.AddTaskRequest(name="shared", adapter_path=path),
                       metadata=_as("key-admin"))

    async def names(key: str) -> list[str]:
        response = await stub.ListTasks(gateway_pb2.ListTasksRequest(), metadata=_as(key))
        return [t.name for t in response.tasks]

    assert await names("key-a") == ["mine", "shared"]
    assert await names("key-b") == ["shared"]
    assert await names("key-admin") == ["mine", "shared"]
    generate = gateway_pb2.GenerateRequest(task="mine", prompt="hi",
                                           params=common_pb2.SamplingParams(max_tokens=2))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(generate, metadata=_as("key-b")):
            pass
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    remove = stub.RemoveTask
    assert await _code(remove(gateway_pb2.RemoveTaskRequest(name="mine"),
                              metadata=_as("key-b"))) is grpc.StatusCode.NOT_FOUND
    assert await _code(remove(gateway_pb2.RemoveTaskRequest(name="shared"),
                              metadata=_as("key-a"))) is grpc.StatusCode.PERMISSION_DENIED
    await remove(gateway_pb2.RemoveTaskRequest(name="mine"), metadata=_as("key-a"))


async def test_requests_are_private_to_their_tenant(gateway):
    generate = gateway_pb2.GenerateRequest(prompt="hi", request_id="rq-1",
                                           params=common_pb2.SamplingParams(max_tokens=2))
    call = gateway.stub.Generate(generate, metadata=_as("key-a"))
    assert (await call.read()).request_id == "rq-1"
    queued = await gateway.queue.read_new("e", count=1, block_ms=1000)
    assert queued[0].request.tenant == "tenant-a"
    cancel = gateway_pb2.CancelRequest(request_id="rq-1")
    assert await _code(gateway.stub.Cancel(cancel, metadata=_as("key-b"))) is \
        grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in gateway.stub.Generate(generate, metadata=_as("key-b")):
            pass
    assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert (await gateway.stub.Cancel(cancel, metadata=_as("key-a"))).was_active
    call.cancel()
    await asyncio.sleep(0)
