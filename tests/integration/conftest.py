"""Integration fixtures: real Redis, the real LLMEngine on SmolLM2 (CPU), gateway + worker on
ephemeral ports, the predictor as a subprocess when it exists. One engine per session; each
test gets its own Redis namespace so tests cannot see each other's queues or tasks."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from services.common.grpc_server import ServiceHost
from services.common.metrics import Metrics, create_metrics
from services.common.model_source import resolve_model
from services.common.pb.inlaid.v1 import gateway_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.common.request_queue import RequestQueue
from services.common.task_registry import TaskRegistry
from services.common.tokenizer import Tokenizer
from services.engine.config import EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.worker import EngineWorker, WorkerConfig
from services.gateway.config import GatewayConfig
from services.gateway.peers import PredictorClient
from services.gateway.servicer import GatewayServicer
from services.stack import wait_serving

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_config() -> EngineConfig:
    return EngineConfig(device="cpu", kv_cache_bytes=48 << 20, max_num_seqs=8,
                        max_model_len=1024)


@pytest.fixture(scope="session")
def engine():
    torch.set_num_threads(2)
    return LLMEngine(engine_config())


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer(resolve_model().path)


@pytest.fixture(scope="session")
def predictor_addr():
    """The real predictor service in a subprocess (statistics-only unless a model is shipped)."""
    if importlib.util.find_spec("services.predictor.server") is None:
        yield ""
        return
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PREDICTOR_REDIS_URL")}
    env.update(PREDICTOR_PORT=str(port), PREDICTOR_HOST="127.0.0.1", PREDICTOR_NUM_THREADS="1",
               METRICS_PORT="off")  # a fixed metrics port could clash with another run
    process = subprocess.Popen([sys.executable, "-m", "services.predictor.server"], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_serving(f"127.0.0.1:{port}", time.monotonic() + 60, process)
    except (RuntimeError, TimeoutError) as exc:
        process.kill()
        pytest.fail(f"predictor did not start: {exc}: {process.stderr.read().decode()[-2000:]}")
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


@dataclass
class Stack:
    """A gateway and one or more workers sharing a Redis namespace."""

    stub: gateway_pb2_grpc.GatewayServiceStub
    queue: RequestQueue
    registry: TaskRegistry
    keys: RedisKeys
    redis_url: str
    predictor_addr: str
    workers: list
    metrics: Metrics

    def start_worker(self, engine: LLMEngine, **overrides) -> tuple[EngineWorker, asyncio.Task]:
        client = connect(self.redis_url)
        config = WorkerConfig(redis_namespace=self.keys.namespace, pool=self.keys.pool,
                              predictor_addr=self.predictor_addr, read_block_ms=50,
                              tasks_poll_s=0.2, **overrides)
        worker = EngineWorker(engine, RequestQueue(client, self.keys),
                              TaskRegistry(client, self.keys), config, self.metrics)
        task = asyncio.get_running_loop().create_task(worker.run())
        self.workers.append((worker, task, client))
        return worker, task


async def _stop_worker(worker: EngineWorker, task: asyncio.Task, client) -> None:
    worker.stop()
    if not task.done():
        try:
            await asyncio.wait_for(task, timeout=30)
        except asyncio.TimeoutError:
            task.cancel()
    # The session engine is shared: leave it empty for the next test.
    for request_id in list(worker._inflight):
        worker.engine.abort(request_id)
    for name in worker.loaded_adapters:
        worker.engine.remove_adapter(name)
    await worker.close()
    await client.aclose()


@pytest.fixture
async def stack(redis_url, engine, tokenizer, predictor_addr):
    keys = RedisKeys(namespace=f"it{uuid.uuid4().hex[:10]}", pool="p")
    client = connect(redis_url)
    queue, registry = RequestQueue(client, keys), TaskRegistry(client, keys)
    await queue.ensure_group()
    config = GatewayConfig(port=0, redis_namespace=keys.namespace, pool=keys.pool,
                           max_tokens_limit=512, max_model_len=engine_config().max_model_len,
                           read_block_ms=100, predictor_addr=predictor_addr,
                           predictor_timeout_s=1.0)
    predictor = PredictorClient(predictor_addr, 1.0) if predictor_addr else None
    metrics = create_metrics()
    servicer = GatewayServicer(config, queue, registry, tokenizer, predictor, metrics=metrics)
    host = ServiceHost(["inlaid.v1.GatewayService"], "127.0.0.1", 0, grace_s=0.5)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, host.server)
    port = await host.start()
    await host.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    result = Stack(gateway_pb2_grpc.GatewayServiceStub(channel), queue, registry, keys, redis_url,
                   predictor_addr, [], metrics)
    yield result
    await channel.close()
    await host.stop()
    for worker, task, worker_client in result.workers:
        await _stop_worker(worker, task, worker_client)
    await servicer.close()
    await client.aclose()


def _make_peft_adapter(model, out: Path, rank: int, targets: list[str], seed: int):
    """Save a random PEFT LoRA of `model` to `out`; returns the bare model again."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (a no-op adapter); make it matter
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(out))
    return peft_model.unload()


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory) -> dict[str, Path]:
    """Two small random PEFT adapters of different ranks and targets."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    model = AutoModelForCausalLM.from_pretrained(resolve_model().path)
    model = _make_peft_adapter(model, root / "qv", 4, ["q_proj", "v_proj"], seed=1)
    _make_peft_adapter(model, root / "mlp", 8, ["o_proj", "up_proj", "down_proj"], seed=2)
    return {"qv": root / "qv", "mlp": root / "mlp"}
