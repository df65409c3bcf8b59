"""GatewayServicer over gRPC: validation → status codes, queueing, streaming, cancel, resume.

The engine side is played by the test: it reads the request stream and writes output
chunks exactly as services.engine.worker does (the real worker is covered in tests/integration).
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from services.common.request_queue import OutputChunk

P = common_pb2.SamplingParams
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _req(**kw) -> gateway_pb2.GenerateRequest:
    kw.setdefault("params", P(max_tokens=8))
    if "messages" not in kw:
        kw.setdefault("prompt", "Hello there")
    return gateway_pb2.GenerateRequest(**kw)


async def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value.code(), info.value.details()


BAD_INPUTS = [
    ("empty", dict(prompt=""), "empty input"),
    ("both", dict(prompt="x", messages=[common_pb2.ChatMessage(role="user", content="y")]),
     "either prompt or messages"),
    ("bad role", dict(messages=[common_pb2.ChatMessage(role="robot", content="y")]), "role"),
    ("empty messages", dict(messages=[common_pb2.ChatMessage(role="user", content="")]),
     "empty content"),
    ("max_tokens 0", dict(params=P(max_tokens=0)), "max_tokens"),
    ("max_tokens over limit", dict(params=P(max_tokens=257)), "max_tokens"),
    ("negative temperature", dict(params=P(max_tokens=4, temperature=-0.5)), "temperature"),
    ("top_p > 1", dict(params=P(max_tokens=4, top_p=1.5)), "top_p"),
    ("negative top_k", dict(params=P(max_tokens=4, top_k=-1)), "top_k"),
    ("empty stop", dict(params=P(max_tokens=4, stop=[""])), "stop[0]"),
    ("too many stops", dict(params=P(max_tokens=4, stop=["a"] * 17)), "stop strings"),
    ("too long", dict(prompt="word " * 400, params=P(max_tokens=200)), "exceeds the context"),
    ("bad request id", dict(request_id="a b"), "request_id"),
]


@pytest.mark.parametrize("name,kwargs,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_is_invalid_argument(gateway, name, kwargs, needle):
    code, details = await _code(gateway.stub.Generate(_req(**kwargs)))
    assert code is INVALID and needle in details
    assert await gateway.queue.backlog() == 0  # nothing was queued


async def test_unknown_task_is_not_found(gateway):
    code, details = await _code(gateway.stub.Generate(_req(task="nope")))
    assert code is grpc.StatusCode.NOT_FOUND and "nope" in details


async def test_full_queue_is_resource_exhausted(gateway, gateway_config):
    for _ in range(gateway_config.max_queue):
        await gateway.queue.client.xadd(gateway.queue.keys.requests, {"req": "{}"})
    call = gateway.stub.Generate(_req())
    code, details = await _code(call)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in details
    assert "retry in 1 s" in details
    trailing = dict(await call.trailing_metadata())
    assert trailing["grpc-retry-pushback-ms"] == "1000" and trailing["retry-after-s"] == "1"
    assert await gateway.queue.backlog() == gateway_config.max_queue  # nothing more queued


async def _serve_one(gateway, chunks: list[OutputChunk], gate: asyncio.Event | None = None):
    """Play the engine: take one request and write the given chunks to its output stream."""
    deliveries = []
    while not deliveries:
        deliveries = await gateway.queue.read_new("fake-engine", count=1, block_ms=100)
    delivery = deliveries[0]
    if gate is not None:
        await gate.wait()
    for chunk in chunks:
        await gateway.queue.publish([(delivery.entry_id, delivery.request.request_id, chunk)])
    return delivery.request


async def test_generate_queues_tokenized_request_and_streams_chunks(gateway, tokenizer):
    chunks = [OutputChunk(0, [10, 11], "ab"), OutputChunk(2, [12], "c"),
              OutputChunk(3, [], "", finish_reason=1, num_prompt_tokens=3, num_output_tokens=3)]
    engine = asyncio.create_task(_serve_one(gateway, chunks))
    request = _req(messages=[common_pb2.ChatMessage(role="user", content="hi")],
                   params=P(max_tokens=8, temperature=0.7, top_p=0, seed=5, stop=["\n"]))
    responses = [r async for r in gateway.stub.Generate(request)]
    queued = await engine
    assert responses[0].request_id == queued.request_id and len(queued.request_id) == 32
    text = tokenizer.render_chat([("user", "hi")])
    assert queued.prompt_token_ids == tokenizer.encode_rendered(text)
    assert queued.params == dict(max_tokens=8, temperature=pytest.approx(0.7), top_p=1.0, top_k=0,
                                 seed=5, stop=["\n"], ignore_eos=False)
    assert [(r.offset, list(r.token_ids), r.text) for r in responses[1:]] == \
        [(0, [10, 11], "ab"), (2, [12], "c"), (3, [], "")]
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_EOS
    assert responses[-1].num_output_tokens == 3
    assert await gateway.queue.backlog() == 0 and await gateway.queue.num_pending() == 0
    assert queued.deadline_ts is None                     # the client set no deadline


async def test_client_deadline_travels_with_the_queued_request(gateway):
    """A Generate with a gRPC deadline queues it (wall clock) for the engine's scheduler."""
    import time
    done = OutputChunk(0, [], "", finish_reason=1)
    engine = asyncio.create_task(_serve_one(gateway, [done]))
    before = time.time()
    responses = [r async for r in gateway.stub.Generate(_req(), timeout=30)]
    queued = await engine
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_EOS
    # gRPC carries the deadline as a timeout the server re-bases on its own clock: allow it a second
    assert before + 25 < queued.deadline_ts <= time.time() + 31


async def test_client_cancel_sets_cancel_key(gateway):
    call = gateway.stub.Generate(_req(request_id="client-1"))
    first = await call.read()
    assert first.request_id == "client-1"
    call.cancel()
    key = gateway.queue.keys.cancel("client-1")
    for _ in range(50):
        if await gateway.queue.client.exists(key):
            break
        await asyncio.sleep(0.05)
    assert await gateway.queue.client.exists(key)


async def test_cancel_rpc_and_resume_from_offset(gateway):
    missing = gateway_pb2.CancelRequest(request_id="missing")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.stub.Cancel(missing)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    chunks = [OutputChunk(0, [10, 11], "ab"), OutputChunk(2, [12], "c", finish_reason=2,
                                                          num_output_tokens=3)]
    gate = asyncio.Event()
    engine = asyncio.create_task(_serve_one(gateway, chunks, gate))
    call = gateway.stub.Generate(_req(request_id="r-9"))
    await call.read()
    response = await gateway.stub.Cancel(gateway_pb2.CancelRequest(request_id="r-9"))
    assert response.was_active
    assert await gateway.queue.cancelled(["r-9"]) == {"r-9"}
    gate.set()
    await engine
    while (await call.read()).finish_reason == 0:
        pass
    resumed = [r async for r in gateway.stub.Resume(gateway_pb2.ResumeRequest(request_id="r-9",
                                                                              offset=1))]
    assert [(r.offset, list(r.token_ids)) for r in resumed[1:]] == [(1, [11]), (2, [12])]
    # The same idempotency key re-attaches instead of queueing the request again.
    again = [r async for r in gateway.stub.Generate(_req(request_id="r-9"))]
    assert [list(r.token_ids) for r in again[1:]] == [[10, 11], [12]]
    assert await gateway.queue.backlog() == 0


class _SlowPredictor:
    def __init__(self, delay_s: float, value: int) -> None:
        self.delay_s, self.value = delay_s, value

    async def predict(self, task: str, prompt: str) -> int | None:
        # Mirrors PredictorClient: its own timeout turns a slow predictor into None.
        try:
            await asyncio.wait_for(asyncio.sleep(self.delay_s), timeout=0.1)
        except asyncio.TimeoutError:
            return None
        return self.value

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("delay_s,expected", [(0.0, 42), (5.0, None)])
async def test_predictor_tags_request_and_never_blocks(make_gateway, gateway_config, delay_s,
                                                       expected):
    gateway = await make_gateway(gateway_config, predictor=_SlowPredictor(delay_s, 42))
    done = OutputChunk(0, [1], "x", finish_reason=2, num_output_tokens=1)
    engine = asyncio.create_task(_serve_one(gateway, [done]))
    responses = [r async for r in gateway.stub.Generate(_req(), timeout=3)]
    assert (await engine).predicted_output_tokens == expected
    assert responses[0].predicted_output_tokens == (expected or 0)


async def test_gateway_shutdown_leaves_requests_running_for_resume(gateway):
    call = gateway.stub.Generate(_req(request_id="keep-1"))
    assert (await call.read()).request_id == "keep-1"
    await gateway.host.stop("test")
    with pytest.raises(grpc.aio.AioRpcError):
        await call.read()
    await asyncio.sleep(0.2)
    assert not await gateway.queue.client.exists(gateway.queue.keys.cancel("keep-1"))
    assert await gateway.queue.backlog() == 1


async def test_one_idempotency_key_sent_twice_at_once_runs_once(gateway):
    done = OutputChunk(0, [7], "x", finish_reason=2, num_output_tokens=1)
    engine = asyncio.create_task(_serve_one(gateway, [done]))
    calls = [gateway.stub.Generate(_req(request_id="same-key")) for _ in range(2)]
    async def collect(call):
        return [r async for r in call]

    results = await asyncio.gather(*(collect(c) for c in calls))
    await engine
    assert [[list(r.token_ids) for r in rs[1:]] for rs in results] == [[[7]], [[7]]]
    assert await gateway.queue.client.xlen(gateway.queue.keys.requests) == 0
    assert await gateway.queue.read_new("other", count=5, block_ms=0) == []


async def test_deadline_cancels_the_request(gateway):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in gateway.stub.Generate(_req(request_id="late-1"), timeout=0.5):
            pass
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    key = gateway.queue.keys.cancel("late-1")
    # grpc.aio cancels the server handler asynchronously after the deadline; on a loaded
    # machine that has taken over 2.5 s, so allow up to 10 s before calling it lost.
    for _ in range(200):
        if await gateway.queue.client.exists(key):
            break
        await asyncio.sleep(0.05)
    assert await gateway.queue.client.exists(key)


async def test_stream_at_its_deadline_is_deadline_exceeded_never_a_clean_end(gateway):
    """The gateway's own deadline check can fire before grpc cancels the call: the stream must
    then end with DEADLINE_EXCEEDED (and cancel the request), not as if it were complete."""
    import time

    from services.common.request_queue import QueuedRequest
    from services.gateway.servicer import DeadlineExceededError

    await gateway.queue.enqueue(QueuedRequest("late-2", "", [1, 2], {"max_tokens": 4}))
    stream = gateway.servicer._stream("late-2", 0, cancel_on_exit=True,
                                      deadline_s=time.monotonic() + 0.3)
    with pytest.raises(DeadlineExceededError):
        async for _ in stream:
            pass
    for _ in range(100):
        if await gateway.queue.client.exists(gateway.queue.keys.cancel("late-2")):
            break
        await asyncio.sleep(0.02)
    assert await gateway.queue.client.exists(gateway.queue.keys.cancel("late-2"))


@pytest.mark.parametrize("predictor_delay_s", [5.0, None], ids=["predictor-down", "no-predictor"])
async def test_prediction_degrades_to_task_statistics(make_gateway, gateway_config,
                                                      predictor_delay_s):
    """A predictor outage (or none configured) tags requests with the task's running median."""
    predictor = None if predictor_delay_s is None else _SlowPredictor(predictor_delay_s, 42)
    gateway = await make_gateway(gateway_config, predictor=predictor)
    await gateway.queue.client.lpush(gateway.queue.keys.stats(""), 5, 9, 30, 7, 11)
    done = OutputChunk(0, [1], "x", finish_reason=2, num_output_tokens=1)
    engine = asyncio.create_task(_serve_one(gateway, [done]))
    responses = [r async for r in gateway.stub.Generate(_req(), timeout=3)]
    assert (await engine).predicted_output_tokens == 9  # median of 5, 7, 9, 11, 30
    assert responses[0].predicted_output_tokens == 9


async def test_open_streams_are_bounded_with_a_retry_hint(make_gateway, gateway_config):
    import dataclasses

    gateway = await make_gateway(dataclasses.replace(gateway_config, max_streams=1))
    first = gateway.stub.Generate(_req(request_id="held-1"))
    assert (await first.read()).request_id == "held-1"  # holds the only stream
    for call in (gateway.stub.Generate(_req(request_id="held-2")),
                 gateway.stub.Resume(gateway_pb2.ResumeRequest(request_id="held-1"))):
        code, details = await _code(call)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 1 streams" in details
        assert dict(await call.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
    assert await gateway.queue.backlog() == 1  # the refused Generate queued nothing
    first.cancel()
    for _ in range(100):  # the handler's finally runs once grpc has cancelled it
        if gateway.servicer._num_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert gateway.servicer._num_streams == 0
