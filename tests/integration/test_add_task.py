"""Add a task while serving: gateway AddTask with calibration data → the real quantizer service
(subprocess) re-quantizes SmolLM2 incrementally → `inlaid:weights` → the engine worker swaps the
base between steps, while another client keeps streaming. Also a job that fails at run time."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch

from services.common.grpc_server import ServiceHost
from services.common.metrics import create_metrics
from services.common.pb.inlaid.v1 import (common_pb2, engine_pb2, engine_pb2_grpc, gateway_pb2,
                                          gateway_pb2_grpc, quantizer_pb2, quantizer_pb2_grpc)
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.common.request_queue import RequestQueue
from services.common.task_registry import TaskRecord, TaskRegistry
from services.common.workload.task import get_task
from services.engine.llm_engine import LLMEngine
from services.engine.sequence import SamplingParams
from services.engine.servicer import EngineServicer
from services.engine.worker import EngineWorker, WorkerConfig
from services.gateway.config import GatewayConfig
from services.gateway.peers import QuantizerClient
from services.gateway.servicer import GatewayServicer
from services.quantizer.calibration import TaskSpec
from services.quantizer.config import QuantConfig
from services.quantizer.qlinear import apply_checkpoint
from services.stack import wait_serving
from tests.integration.conftest import ROOT, engine_config, free_port

# ~3 min on 2 shared CPU cores: two SmolLM2 quantizations (each ~1 min) dominate.
pytestmark = pytest.mark.timeout(900)
OLD, NEW, BROKEN = "arith", "sort_list", "num2words_en"
NUM_SEQS, SEQ_LEN = 1, 64          # one 64-token calibration sequence per task: fast on a CPU
MAX_TOKENS, CONCURRENCY = 12, 2
FINISHED = (common_pb2.FINISH_REASON_EOS, common_pb2.FINISH_REASON_LENGTH)


def _calibration(path: Path, task: str, num: int = 6) -> Path:
    """A small calibration JSONL from the workload kit's calib split."""
    with open(path, "w") as f:
        for ex in get_task(task).examples("calib", num):
            f.write(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n")
    return path


def _greedy(prompt: str, task: str) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(task=task, prompt=prompt, params=common_pb2.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0))


async def _stream(stub, prompt: str, task: str) -> tuple[list[int], int, str]:
    """(output tokens, finish reason, text); checks offsets are contiguous."""
    tokens, finish, text = [], 0, ""
    async for response in stub.Generate(_greedy(prompt, task), timeout=300):
        if response.token_ids or response.finish_reason:
            assert response.offset == len(tokens), "offsets must be contiguous"
            tokens += list(response.token_ids)
            text += response.text
            finish = response.finish_reason or finish
    return tokens, finish, text


def _reference(version_dir: Path, task: str, adapter: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy outputs of a standalone LLMEngine with that checkpoint applied."""
    engine = LLMEngine(engine_config())
    apply_checkpoint(engine.runner, version_dir)
    engine.add_adapter(task, adapter)
    results = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS), tasks=[task] * len(prompts))
    return [r.token_ids for r in results]


class Spine:
    """Gateway (with a QuantizerClient) + engine worker + EngineService on ephemeral ports."""

    def __init__(self, engine: LLMEngine, tokenizer, redis_url: str, namespace: str,
                 quantizer_addr: str) -> None:
        self.engine, self.quantizer_addr = engine, quantizer_addr
        self.keys = RedisKeys(namespace=namespace, pool="p")
        self.client, self.worker_client = connect(redis_url), connect(redis_url)
        self.registry = TaskRegistry(self.client, self.keys)
        config = GatewayConfig(port=0, model=str(tokenizer.model_dir), redis_namespace=namespace,
                               pool="p", max_tokens_limit=512, max_model_len=engine.max_model_len,
                               read_block_ms=100, quantizer_addr=quantizer_addr,
                               quantizer_timeout_s=60.0)
        self.gateway = GatewayServicer(config, RequestQueue(self.client, self.keys), self.registry,
                                       tokenizer, None, QuantizerClient(quantizer_addr, 60.0),
                                       create_metrics())
        self.worker = EngineWorker(engine, RequestQueue(self.worker_client, self.keys),
                                   TaskRegistry(self.worker_client, self.keys),
                                   WorkerConfig(redis_namespace=namespace, pool="p",
                                                read_block_ms=50, tasks_poll_s=0.2),
                                   create_metrics())
        self.hosts: list[ServiceHost] = []
        self.channels: list = []

    async def start(self) -> None:
        await RequestQueue(self.client, self.keys).ensure_group()
        for name, add, servicer in (
                ("inlaid.v1.GatewayService", gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
                 self.gateway),
                ("inlaid.v1.EngineService", engine_pb2_grpc.add_EngineServiceServicer_to_server,
                 EngineServicer(self.worker))):
            host = ServiceHost([name], "127.0.0.1", 0, grace_s=0.5)
            add(servicer, host.server)
            await host.start()
            await host.set_serving(True)
            self.hosts.append(host)
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") for h in self.hosts]
        self.channels.append(grpc.aio.insecure_channel(self.quantizer_addr))
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channels[0])
        self.engine_stub = engine_pb2_grpc.EngineServiceStub(self.channels[1])
        self.q_stub = quantizer_pb2_grpc.QuantizerServiceStub(self.channels[2])
        self.run = asyncio.get_running_loop().create_task(self.worker.run())

    async def weight_version(self) -> int:
        return (await self.engine_stub.GetStatus(engine_pb2.GetStatusRequest())).weight_version

    async def wait_job(self, job_id: str, timeout_s: float) -> quantizer_pb2.GetJobResponse:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.q_stub.GetJob(quantizer_pb2.GetJobRequest(job_id=job_id))
            if job.state in (quantizer_pb2.JOB_STATE_DONE, quantizer_pb2.JOB_STATE_FAILED):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self.worker.stop()
        await asyncio.wait_for(self.run, 60)
        for request_id in list(self.worker._inflight):
            self.engine.abort(request_id)
        await self.worker.close()
        for channel in self.channels:
            await channel.close()
        for host in self.hosts:
            await host.stop()
        await self.gateway.close()
        await self.client.aclose()
        await self.worker_client.aclose()


async def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def serving_engine():
    # Its own engine: swapping in quantized weights must not leak into the session engine.
    torch.set_num_threads(2)
    return LLMEngine(engine_config())


@pytest.fixture
def quantizer(tmp_path, redis_url):
    """v1 (quantized for OLD) made with the library, then the real service on it."""
    from services.quantizer.pipeline import quantize
    root = tmp_path / "ckpt"
    calib = _calibration(tmp_path / f"{OLD}.jsonl", OLD)
    started = time.perf_counter()
    quantize("smollm2-135m", [TaskSpec(OLD, str(ROOT / "adapters" / OLD), str(calib))],
             QuantConfig(num_seqs=NUM_SEQS, seq_len=SEQ_LEN), root, show_progress=False)
    print(f"v1 (full, 1 task) took {time.perf_counter() - started:.1f} s")
    namespace, port = f"it{uuid.uuid4().hex[:10]}", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTIZER_")}
    env.update(REDIS_URL=redis_url, QUANTIZER_HOST="127.0.0.1", QUANTIZER_PORT=str(port),
               QUANTIZER_REDIS_NAMESPACE=namespace, QUANTIZER_CHECKPOINT_DIR=str(root),
               QUANTIZER_NUM_CALIB_SEQS=str(NUM_SEQS), QUANTIZER_SEQ_LEN=str(SEQ_LEN),
               QUANTIZER_NUM_THREADS="1", METRICS_PORT="off", LOG_FORMAT="text")
    log = open(tmp_path / "quantizer.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "services.quantizer.server"], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", time.monotonic() + 120, process)
    except (RuntimeError, TimeoutError) as exc:
        process.kill()
        pytest.fail(f"quantizer did not start: {exc}: {(tmp_path / 'quantizer.log').read_text()[-2000:]}")
    yield f"127.0.0.1:{port}", namespace, root
    process.terminate()
    process.wait(20)
    log.close()
    print((tmp_path / "quantizer.log").read_text()[-3000:])


@pytest.mark.slow
async def test_add_task_while_serving(quantizer, serving_engine, redis_url, tokenizer, tmp_path):
    t_start = time.perf_counter()
    quantizer_addr, namespace, root = quantizer
    spine = Spine(serving_engine, tokenizer, redis_url, namespace, quantizer_addr)
    await spine.start()
    stub, engine_stub, q_stub, registry, client, keys = (spine.stub, spine.engine_stub, spine.q_stub,
                                                        spine.registry, spine.client, spine.keys)
    weight_version = spine.weight_version

    try:
        adapters = ROOT / "adapters"
        await stub.AddTask(gateway_pb2.AddTaskRequest(name=OLD, adapter_path=str(adapters / OLD)))
        # The quantizer published its existing v1 at start; the engine serves it.
        await until(lambda: _eq(weight_version(), 1), 60, "the engine to serve v1")
        prompts = [ex.prompt for ex in get_task(OLD).examples("test", 3)]
        prompt_ids = [tokenizer.encode_prompt(p) for p in prompts]

        # A bad calibration file is refused up front: nothing registered, nothing started.
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AddTask(gateway_pb2.AddTaskRequest(name="empty_calib", adapter_path=str(
                adapters / NEW), calibration_path=str(empty)))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.value.details()
        assert await registry.get("empty_calib") is None

        # Client 1 streams OLD requests for the whole time the quantizer works.
        outputs: list[tuple[int, list[int], int, str]] = []
        stop = asyncio.Event()

        async def client_loop(offset: int) -> None:
            i = offset
            while not stop.is_set():
                tokens, finish, text = await _stream(stub, prompts[i % len(prompts)], OLD)
                outputs.append((i % len(prompts), tokens, finish, text))
                i += 1

        clients = [asyncio.get_running_loop().create_task(client_loop(k)) for k in range(CONCURRENCY)]
        # Client 2 adds NEW with calibration data, then BROKEN whose file breaks while it queues.
        t_add = time.perf_counter()
        added = await stub.AddTask(gateway_pb2.AddTaskRequest(
            name=NEW, adapter_path=str(adapters / NEW),
            calibration_path=str(_calibration(tmp_path / f"{NEW}.jsonl", NEW))))
        assert added.job_id and added.task.state == common_pb2.TASK_STATE_QUANTIZING
        broken_calib = _calibration(tmp_path / "broken.jsonl", BROKEN)
        broken = await stub.AddTask(gateway_pb2.AddTaskRequest(
            name=BROKEN, adapter_path=str(adapters / BROKEN), calibration_path=str(broken_calib)))
        broken_calib.write_text("")
        first = await q_stub.GetJob(quantizer_pb2.GetJobRequest(job_id=broken.job_id))
        assert first.state == quantizer_pb2.JOB_STATE_QUEUED, first

        done_layers = []
        while True:
            job = await q_stub.GetJob(quantizer_pb2.GetJobRequest(job_id=added.job_id))
            done_layers.append(job.num_layers_done)
            if job.state in (quantizer_pb2.JOB_STATE_DONE, quantizer_pb2.JOB_STATE_FAILED):
                break
            assert time.perf_counter() - t_add < 600, "quantization job took too long"
            await asyncio.sleep(0.5)
        t_job = time.perf_counter() - t_add
        assert job.state == quantizer_pb2.JOB_STATE_DONE, job.message
        assert job.weight_version == 2 and job.num_layers_done == job.num_layers_total == 30
        assert done_layers == sorted(done_layers) and len(set(done_layers)) > 2  # progress moved
        await until(lambda: _eq(weight_version(), 2), 60, "the engine to serve v2")
        assert (await registry.get(NEW)).state == "READY"
        num_during = len(outputs)
        # A few more requests entirely on v2, then stop the streaming clients.
        await until(lambda: _ge(len(outputs), num_during + 2 * CONCURRENCY), 120, "more outputs")
        stop.set()
        await asyncio.gather(*clients)

        # The broken job failed; the task says why; the served weights did not change.
        while (b := await q_stub.GetJob(quantizer_pb2.GetJobRequest(job_id=broken.job_id))).state \
                in (quantizer_pb2.JOB_STATE_QUEUED, quantizer_pb2.JOB_STATE_RUNNING):
            await asyncio.sleep(0.2)
        assert b.state == quantizer_pb2.JOB_STATE_FAILED and "empty" in b.message, b
        record = await registry.get(BROKEN)
        assert record.state == "FAILED" and "empty" in record.message
        await asyncio.sleep(1.0)  # a couple of worker polls
        assert await weight_version() == 2
        assert (await client.hgetall(keys.weights))["version"] == "2"

        # Every streamed request finished completely, and matches the greedy output of v1 or v2
        # (a request in flight at the swap mixes both: at most CONCURRENCY of them).
        v1_ref = _reference(root / "v1", OLD, adapters / OLD, prompt_ids)
        v2_ref = _reference(root / "v2", OLD, adapters / OLD, prompt_ids)
        mixed = 0
        for idx, tokens, finish, text in outputs:
            assert finish in FINISHED and tokens and text == tokenizer.decode(tokens)
            mixed += tokens not in (v1_ref[idx], v2_ref[idx])
        assert mixed <= CONCURRENCY, (mixed, len(outputs))
        assert outputs[-1][1] == v2_ref[outputs[-1][0]]

        # The new task is served from the re-quantized base.
        new_prompt = get_task(NEW).examples("test", 1)[0].prompt
        tokens, finish, _ = await _stream(stub, new_prompt, NEW)
        assert finish in FINISHED
        assert tokens == _reference(root / "v2", NEW, adapters / NEW,
                                    [tokenizer.encode_prompt(new_prompt)])[0]
        status = await engine_stub.GetStatus(engine_pb2.GetStatusRequest())
        assert status.weight_version == 2 and NEW in status.loaded_adapters
        print(f"streamed {len(outputs)} requests ({mixed} across the swap); job {t_job:.1f} s; "
              f"test body {time.perf_counter() - t_start:.1f} s")
    finally:
        await spine.stop()


async def _eq(value, expected) -> bool:
    return (await value) == expected


async def _ge(value, minimum) -> bool:
    return value >= minimum


async def test_add_task_tiny_llama(tmp_path, redis_url):
    """The same path in seconds: a 2-layer random Llama served by the real engine, the quantizer
    service in-process; the first job quantizes fully (no version yet) and the engine swaps."""
    from services.common.tokenizer import Tokenizer
    from services.engine.config import EngineConfig
    from services.quantizer.config import QuantizerServiceConfig
    from services.quantizer.influence import InfluenceConfig
    from services.quantizer.server import QuantizerServer
    from tests.unit.quantizer.conftest import make_adapter, make_calibration, make_tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_tiny_llama(tmp_path / "tiny")
    adapter = make_adapter(model, tmp_path / "adapter", seed=3)
    calib = make_calibration(tmp_path / "calib.jsonl", seed=3)
    namespace = f"it{uuid.uuid4().hex[:10]}"
    server = QuantizerServer(QuantizerServiceConfig(
        host="127.0.0.1", port=0, model=str(model), checkpoint_dir=str(tmp_path / "ckpt"),
        redis_url=redis_url, redis_namespace=namespace,
        quant=QuantConfig(num_seqs=4, seq_len=64, group_size=32)),
        # conftest's random adapters (‖ΔW‖ 25–40× the tiny base's ‖W‖) fail the influence
        # screen by design; test_influence.py covers it.
        influence=InfluenceConfig(is_enabled=False))
    port = await server.start()
    engine = LLMEngine(EngineConfig(model=str(model), device="cpu", kv_cache_bytes=4 << 20,
                                    max_num_seqs=4, max_model_len=256))
    spine = Spine(engine, Tokenizer(model), redis_url, namespace, f"127.0.0.1:{port}")
    await spine.start()
    try:
        prompt = "w3_1 alpha w3_2 seven"
        before, _, _ = await _stream(spine.stub, prompt, "")
        added = await spine.stub.AddTask(gateway_pb2.AddTaskRequest(
            name="tiny", adapter_path=str(adapter), calibration_path=str(calib)))
        assert added.task.state == common_pb2.TASK_STATE_QUANTIZING
        job = await spine.wait_job(added.job_id, 60)
        assert job.state == quantizer_pb2.JOB_STATE_DONE, job.message
        assert (job.num_layers_done, job.num_layers_total, job.weight_version) == (2, 2, 1)
        await until(lambda: _eq(spine.weight_version(), 1), 30, "the engine to serve v1")
        assert (await spine.registry.get("tiny")).state == "READY"

        prompt_ids = Tokenizer(model).encode_prompt(prompt)
        tokens, finish, _ = await _stream(spine.stub, prompt, "tiny")
        reference = LLMEngine(EngineConfig(model=str(model), device="cpu", kv_cache_bytes=4 << 20,
                                           max_num_seqs=4, max_model_len=256))
        apply_checkpoint(reference.runner, tmp_path / "ckpt" / "v1")
        reference.add_adapter("tiny", adapter)
        expected = reference.generate([prompt_ids], SamplingParams(max_tokens=MAX_TOKENS),
                                      tasks=["tiny"])[0].token_ids
        assert finish in FINISHED and tokens == expected
        # The bare base changed too (quantized): evidence that the swap really happened.
        after, _, _ = await _stream(spine.stub, prompt, "")
        unquantized = LLMEngine(EngineConfig(model=str(model), device="cpu", kv_cache_bytes=4 << 20,
                                             max_num_seqs=4, max_model_len=256))
        assert before == unquantized.generate([prompt_ids], SamplingParams(max_tokens=MAX_TOKENS))[0].token_ids
        apply_checkpoint(unquantized.runner, tmp_path / "ckpt" / "v1")
        assert after == unquantized.generate([prompt_ids], SamplingParams(max_tokens=MAX_TOKENS))[0].token_ids

        # A job failing at run time (calibration gone after validation): FAILED, v1 still served.
        gone = make_calibration(tmp_path / "gone.jsonl", seed=4)
        await spine.registry.add(TaskRecord(name="gone", adapter_path=str(adapter), rank=4,
                                            state="QUANTIZING"))
        gone.unlink()
        failed = await server.runner.submit([TaskSpec("gone", str(adapter), str(gone))])
        job = await spine.wait_job(failed.job_id, 60)
        assert job.state == quantizer_pb2.JOB_STATE_FAILED and "does not exist" in job.message
        assert (await spine.registry.get("gone")).state == "FAILED"
        await asyncio.sleep(0.5)
        assert await spine.weight_version() == 1
    finally:
        await spine.stop()
        await server.stop()
        torch.set_num_threads(threads)  # the session engine of other tests keeps its setting
