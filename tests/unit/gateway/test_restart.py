"""Gateway restart with streams open (fast, in-process; the real-process version is scenario f of
tests/faults): a stopping gateway leaves its requests running, and clients Resume on a new
gateway, receiving every token exactly once."""
from __future__ import annotations

import asyncio

import grpc

from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from services.common.request_queue import OutputChunk

N = 4


async def _held(call) -> list[int]:
    """Read one stream until it breaks; the token ids received, checked to be contiguous."""
    tokens: list[int] = []
    try:
        while (response := await call.read()) is not grpc.aio.EOF:
            assert response.offset == len(tokens) or not response.token_ids, response
            tokens += list(response.token_ids)
    except grpc.aio.AioRpcError:
        pass
    return tokens


async def test_stopped_gateway_leaves_requests_running_and_clients_resume(make_gateway,
                                                                          gateway_config):
    old = await make_gateway(gateway_config)
    calls = [old.stub.Generate(gateway_pb2.GenerateRequest(
        prompt="hi", request_id=f"rs-{i}", params=common_pb2.SamplingParams(max_tokens=6)))
        for i in range(N)]
    for call in calls:
        await call.read()  # the first message: every request is queued
    deliveries = []
    while len(deliveries) < N:
        deliveries += await old.queue.read_new("fake-engine", count=N, block_ms=100)
    by_id = {d.request.request_id: d for d in deliveries}

    async def write(rid: str, offset: int, tokens: list[int], final: bool = False) -> None:
        chunk = OutputChunk(offset, tokens, "", finish_reason=2 if final else 0,
                            num_output_tokens=offset + len(tokens))
        assert await old.queue.publish([(by_id[rid].entry_id, rid, chunk)]) == [True]

    for i in range(N):  # three tokens each before the restart
        await write(f"rs-{i}", 0, [100 + i, 200 + i, 300 + i])
    readers = [asyncio.create_task(_held(call)) for call in calls]
    await asyncio.sleep(0.3)
    await old.host.stop()  # SIGTERM's path: NOT_SERVING, grace, stop
    before = await asyncio.gather(*readers)
    assert [len(t) for t in before] == [3] * N  # every stream broke mid-request
    assert await old.queue.cancelled([f"rs-{i}" for i in range(N)]) == set()  # not cancelled

    new = await make_gateway(gateway_config)  # the replacement, same Redis
    for i in range(N):  # the engine kept going meanwhile
        await write(f"rs-{i}", 3, [400 + i, 500 + i, 600 + i], final=True)
    for i, tokens in enumerate(before):
        resumed = [r async for r in new.stub.Resume(gateway_pb2.ResumeRequest(
            request_id=f"rs-{i}", offset=len(tokens)))]
        got = list(tokens)
        for response in resumed[1:]:
            assert response.offset == len(got) or not response.token_ids, response
            got += list(response.token_ids)
        assert got == [100 + i, 200 + i, 300 + i, 400 + i, 500 + i, 600 + i]  # once, in order
        assert resumed[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
