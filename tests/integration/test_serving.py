"""End to end: gateway → Redis → engine worker (real LLMEngine, SmolLM2 on CPU) → client stream."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from services.common.request_queue import QueuedRequest
from services.engine.llm_engine import LLMEngine
from tests.integration.conftest import engine_config

P = common_pb2.SamplingParams
pytestmark = pytest.mark.timeout(180)


def _req(prompt: str = "The capital of France is", task: str = "", max_tokens: int = 6,
         **kw) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(task=task, prompt=prompt, params=P(
        max_tokens=max_tokens, ignore_eos=True, **kw))


async def _collect(call) -> list[gateway_pb2.GenerateResponse]:
    return [r async for r in call]


def _tokens(responses) -> list[int]:
    """Output tokens of a stream, checking the offsets are contiguous."""
    tokens: list[int] = []
    for r in responses[1:]:
        assert r.offset == len(tokens), "offsets must be contiguous"
        tokens += list(r.token_ids)
    return tokens


async def _add_task(stack, name: str, path) -> None:
    await stack.stub.AddTask(gateway_pb2.AddTaskRequest(name=name, adapter_path=str(path)))


async def test_two_adapters_and_base_stream_concurrently(stack, engine, peft_adapters):
    worker, _ = stack.start_worker(engine)
    await _add_task(stack, "qv", peft_adapters["qv"])
    await _add_task(stack, "mlp", peft_adapters["mlp"])
    calls = [stack.stub.Generate(_req(task=task), timeout=120) for task in ("", "qv", "mlp")]
    results = await asyncio.gather(*(_collect(c) for c in calls))
    outputs = []
    for responses in results:
        first, last = responses[0], responses[-1]
        assert first.request_id and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.num_output_tokens == 6 and len(_tokens(responses)) == 6
        assert "".join(r.text for r in responses) != ""
        if stack.predictor_addr:
            assert first.predicted_output_tokens > 0
        outputs.append(_tokens(responses))
    assert outputs[1] != outputs[0] or outputs[2] != outputs[0], "adapters changed nothing"
    assert sorted(worker.loaded_adapters) == ["mlp", "qv"]
    assert await stack.queue.num_pending() == 0 and await stack.queue.backlog() == 0
    metrics = stack.metrics.render().decode()
    for task in ("", "qv", "mlp"):
        assert f'inlaid_requests_total{{finish_reason="length",task="{task}"}} 1.0' in metrics
        assert f'inlaid_generated_tokens_total{{task="{task}"}} 6.0' in metrics
    assert await stack.queue.client.lrange(stack.keys.stats("qv"), 0, -1) == ["6"]


BAD = [
    (_req(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (_req(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "empty input"),
    (_req(temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (_req(top_p=2), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (_req(top_k=-3), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (_req(prompt="hello " * 600, max_tokens=500), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    (_req(task="no-such-task"), grpc.StatusCode.NOT_FOUND, "no-such-task"),
]


async def test_bad_inputs_fail_while_others_keep_streaming(stack, engine):
    stack.start_worker(engine)
    good = stack.stub.Generate(_req(max_tokens=10), timeout=120)
    first = await good.read()
    for request, code, needle in BAD:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _collect(stack.stub.Generate(request, timeout=30))
        assert info.value.code() is code and needle in info.value.details()
    rest = [first]
    while True:
        response = await good.read()
        rest.append(response)
        if response.finish_reason:
            break
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and len(_tokens(rest)) == 10


async def test_malformed_adapter_is_rejected_with_reason(stack, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.stub.AddTask(gateway_pb2.AddTaskRequest(name="bad", adapter_path=str(bad)))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "PREFIX_TUNING" in info.value.details()
    assert (await stack.stub.ListTasks(gateway_pb2.ListTasksRequest())).tasks == []


async def test_cancel_frees_the_request(stack, engine):
    worker, _ = stack.start_worker(engine)
    call = stack.stub.Generate(_req(max_tokens=400), timeout=120)
    request_id = (await call.read()).request_id
    while not (await call.read()).token_ids:
        pass
    call.cancel()
    for _ in range(200):
        if not engine.has_unfinished and await stack.queue.num_pending() == 0:
            break
        await asyncio.sleep(0.05)
    assert not engine.has_unfinished and worker.num_inflight == 0
    assert await stack.queue.num_pending() == 0 and await stack.queue.backlog() == 0
    written, is_done = await stack.queue.written(request_id)
    assert is_done and 0 < len(written) < 400
    last = await stack.queue.client.xrevrange(stack.keys.output(request_id), count=1)
    assert int(last[0][1]["f"]) == common_pb2.FINISH_REASON_CANCELLED


async def test_request_is_acked_only_after_finishing_and_survives_a_dead_worker(stack, engine):
    # Reference: the same greedy request, uninterrupted.
    worker, task = stack.start_worker(engine)
    reference = _tokens(await _collect(stack.stub.Generate(_req(max_tokens=40), timeout=120)))
    worker.stop()
    await task

    doomed = LLMEngine(engine_config())
    dead, dead_task = stack.start_worker(doomed, claim_idle_s=1.0)
    # Long enough that it is still running when we look at the pending list.
    call = stack.stub.Generate(_req(max_tokens=40), timeout=120)
    responses = [await call.read()]
    while sum(len(r.token_ids) for r in responses) < 3:
        responses.append(await call.read())
    assert await stack.queue.num_pending() == 1  # started, not finished: not acked
    dead_task.cancel()  # the engine dies: no final chunk, no ack
    await asyncio.sleep(0)
    assert await stack.queue.num_pending() == 1

    stack.start_worker(engine, claim_idle_s=0.5, claim_every_s=0.2)
    while not responses[-1].finish_reason:
        responses.append(await call.read())
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert responses[-1].num_output_tokens == 40
    assert _tokens(responses) == reference  # continued after the streamed prefix, no repeats
    assert await stack.queue.num_pending() == 0 and await stack.queue.backlog() == 0


async def test_removed_task_is_unloaded_and_not_found(stack, engine, peft_adapters):
    worker, _ = stack.start_worker(engine)
    await _add_task(stack, "qv", peft_adapters["qv"])
    await _collect(stack.stub.Generate(_req(task="qv", max_tokens=2), timeout=120))
    assert worker.loaded_adapters == ["qv"]
    await stack.stub.RemoveTask(gateway_pb2.RemoveTaskRequest(name="qv"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(stack.stub.Generate(_req(task="qv"), timeout=30))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    for _ in range(100):
        if not worker.loaded_adapters:
            break
        await asyncio.sleep(0.05)
    assert worker.loaded_adapters == [] and "qv" not in engine.adapter_names


async def test_engine_side_rejection_reaches_the_client_as_error(stack, engine):
    # A request the gateway accepts but the engine cannot serve (its context is shorter than
    # the gateway was told) finishes with ERROR and the engine's reason; the entry is acked.
    stack.start_worker(engine)
    await stack.queue.enqueue(_queued("too-long", [1] * 300, 900))
    responses = await _collect(stack.stub.Resume(gateway_pb2.ResumeRequest(request_id="too-long"),
                                                 timeout=60))
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert "exceeds max_model_len" in responses[-1].error
    assert await stack.queue.num_pending() == 0


async def test_client_deadline_reaches_the_engine(stack, engine, monkeypatch):
    """The gateway passes the client's gRPC deadline on; the worker hands it to the engine on the
    engine's monotonic clock (the inlaid policy ranks by it); no deadline, None."""
    import time
    seen = []
    add_request = engine.add_request

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deadline_s"))
        return add_request(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", spy)
    stack.start_worker(engine)
    before = time.monotonic()
    timed = await _collect(stack.stub.Generate(_req(max_tokens=2), timeout=60))
    untimed = await _collect(stack.stub.Generate(_req(max_tokens=2)))
    assert [r[-1].finish_reason for r in (timed, untimed)] == [common_pb2.FINISH_REASON_LENGTH] * 2
    assert len(seen) == 2 and seen[1] is None
    assert before + 50 < seen[0] <= time.monotonic() + 61     # the server re-bases the timeout: a second of slack


def _queued(request_id: str, prompt: list[int], max_tokens: int):
    return QueuedRequest(request_id=request_id, task="", prompt_token_ids=prompt,
                         params={"max_tokens": max_tokens})


async def test_unloadable_weight_version_is_skipped_and_serving_goes_on(stack, engine):
    worker, _ = stack.start_worker(engine)
    await stack.queue.client.hset(stack.keys.weights, mapping={"version": 3,
                                                               "path": "/nonexistent/ckpt"})
    responses = await _collect(stack.stub.Generate(_req(max_tokens=2), timeout=60))
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    for _ in range(100):
        if 3 in worker._failed_weights:
            break
        await asyncio.sleep(0.05)
    assert worker.weight_version == 0 and 3 in worker._failed_weights


async def test_published_quantized_base_is_swapped_in_between_steps(stack, tmp_path):
    from services.quantizer.config import QuantConfig
    from services.quantizer.pipeline import quantize
    from services.quantizer.qlinear import QuantLinear

    version_dir = await asyncio.to_thread(quantize, "smollm2-135m", [],
                                          QuantConfig(method="rtn", bits=4), tmp_path / "q",
                                          "cpu", None, False)
    own = LLMEngine(engine_config())  # not the session engine: the swap is permanent
    worker, _ = stack.start_worker(own)
    before = _tokens(await _collect(stack.stub.Generate(_req(max_tokens=4), timeout=60)))
    await stack.queue.client.hset(stack.keys.weights, mapping={"version": 1,
                                                               "path": str(version_dir)})
    for _ in range(200):
        if worker.weight_version == 1:
            break
        await asyncio.sleep(0.05)
    assert worker.weight_version == 1
    assert isinstance(own.runner.base_linear(0, "q_proj"), QuantLinear)
    after = await _collect(stack.stub.Generate(_req(max_tokens=4), timeout=60))
    assert after[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(_tokens(after)) == len(before) == 4


async def test_a_failing_engine_step_errors_its_requests_and_serving_continues(stack, engine,
                                                                                monkeypatch):
    stack.start_worker(engine)
    real_step = engine.step
    calls = {"n": 0}

    def broken_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("kernel exploded")
        return real_step()

    monkeypatch.setattr(engine, "step", broken_step)
    failed = await _collect(stack.stub.Generate(_req(max_tokens=8), timeout=60))
    assert failed[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert "kernel exploded" in failed[-1].error
    assert not engine.has_unfinished and await stack.queue.num_pending() == 0
    ok = await _collect(stack.stub.Generate(_req(max_tokens=3), timeout=60))
    assert ok[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
