"""Every cross-tenant attempt, RPC by RPC, through the real auth interceptor and a real Redis:
tenant B acting on tenant A's task or request is refused (and changes nothing), a missing or
wrong key is UNAUTHENTICATED, an admin key may act on everything."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.auth import ApiKeyStore, AuthInterceptor
from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from tests.unit.gateway.conftest import write_lora

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b", "key-admin": {"tenant": "ops", "is_admin": True}}
A, B, ADMIN = (("x-api-key", "key-a"),), (("x-api-key", "key-b"),), (("x-api-key", "key-admin"),)
NO_KEY, BAD_KEY = (), (("x-api-key", "not-a-key"),)


@pytest.fixture
async def gateway(make_gateway, gateway_config):
    return await make_gateway(gateway_config, interceptors=[AuthInterceptor(
        ApiKeyStore.from_mapping(KEYS))])


@pytest.fixture
async def owned(gateway, tmp_path):
    """Tenant A's private task 'a-task' and A's queued request 'a-req' (held open)."""
    stub = gateway.stub
    await stub.AddTask(gateway_pb2.AddTaskRequest(name="a-task",
                                                  adapter_path=str(write_lora(tmp_path / "a"))),
                       metadata=A)
    call = stub.Generate(gateway_pb2.GenerateRequest(
        prompt="hi", request_id="a-req", params=common_pb2.SamplingParams(max_tokens=2)),
        metadata=A)
    assert (await call.read()).request_id == "a-req"
    yield str(write_lora(tmp_path / "b"))  # a valid adapter B could register
    call.cancel()
    await asyncio.sleep(0)


async def _drain(call) -> None:
    async for _ in call:
        pass


def _attempts(stub, other_adapter: str):
    """(name, coroutine factory taking metadata) for every way to reach A's task or request."""
    gen = lambda **kw: gateway_pb2.GenerateRequest(  # noqa: E731
        prompt="hi", params=common_pb2.SamplingParams(max_tokens=2), **kw)
    return [
        ("Generate on A's task", lambda md: _drain(stub.Generate(gen(task="a-task"), metadata=md))),
        ("Generate reusing A's request id",
         lambda md: _drain(stub.Generate(gen(request_id="a-req"), metadata=md))),
        ("Resume A's request", lambda md: _drain(stub.Resume(
            gateway_pb2.ResumeRequest(request_id="a-req"), metadata=md))),
        ("Resume A's request at an offset", lambda md: _drain(stub.Resume(
            gateway_pb2.ResumeRequest(request_id="a-req", offset=1), metadata=md))),
        ("Cancel A's request", lambda md: stub.Cancel(
            gateway_pb2.CancelRequest(request_id="a-req"), metadata=md)),
        ("RemoveTask A's task", lambda md: stub.RemoveTask(
            gateway_pb2.RemoveTaskRequest(name="a-task"), metadata=md)),
        ("AddTask over A's task name", lambda md: stub.AddTask(gateway_pb2.AddTaskRequest(
            name="a-task", adapter_path=other_adapter), metadata=md)),
    ]


REFUSED = {"Generate on A's task": grpc.StatusCode.NOT_FOUND,
           "Generate reusing A's request id": grpc.StatusCode.ALREADY_EXISTS,
           "Resume A's request": grpc.StatusCode.NOT_FOUND,
           "Resume A's request at an offset": grpc.StatusCode.NOT_FOUND,
           "Cancel A's request": grpc.StatusCode.NOT_FOUND,
           "RemoveTask A's task": grpc.StatusCode.NOT_FOUND,
           "AddTask over A's task name": grpc.StatusCode.ALREADY_EXISTS}


async def _code(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code()


async def test_every_cross_tenant_attempt_is_refused_and_changes_nothing(gateway, owned):
    attempts = _attempts(gateway.stub, owned)
    assert set(REFUSED) == {name for name, _ in attempts}
    for name, attempt in attempts:
        assert await _code(attempt(B)) is REFUSED[name], name
    # Nothing B tried had an effect on A's task or request.
    record = await gateway.registry.get("a-task")
    assert record is not None and record.tenant == "tenant-a"
    assert not await gateway.queue.client.exists(gateway.queue.keys.cancel("a-req"))
    assert await gateway.queue.owner("a-req") == "tenant-a"
    listed = await gateway.stub.ListTasks(gateway_pb2.ListTasksRequest(), metadata=B)
    assert [t.name for t in listed.tasks] == []
    assert await gateway.queue.backlog() == 1  # only A's request was ever queued


async def test_missing_or_wrong_key_is_unauthenticated_everywhere(gateway, owned):
    calls = _attempts(gateway.stub, owned) + [
        ("ListTasks", lambda md: gateway.stub.ListTasks(gateway_pb2.ListTasksRequest(),
                                                        metadata=md))]
    for metadata in (NO_KEY, BAD_KEY):
        for name, attempt in calls:
            assert await _code(attempt(metadata)) is grpc.StatusCode.UNAUTHENTICATED, name
    assert await gateway.registry.get("a-task") is not None


async def test_admin_reaches_every_tenant(gateway, owned):
    stub = gateway.stub
    listed = await stub.ListTasks(gateway_pb2.ListTasksRequest(), metadata=ADMIN)
    assert [t.name for t in listed.tasks] == ["a-task"]
    assert (await stub.Cancel(gateway_pb2.CancelRequest(request_id="a-req"),
                              metadata=ADMIN)).was_active
    await stub.RemoveTask(gateway_pb2.RemoveTaskRequest(name="a-task"), metadata=ADMIN)
    assert await gateway.registry.get("a-task") is None
