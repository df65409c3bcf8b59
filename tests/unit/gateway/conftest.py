"""Gateway fixtures: a real Redis, the real tokenizer, the servicer on an ephemeral port."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from services.common.grpc_server import ServiceHost
from services.common.model_source import resolve_model
from services.common.pb.inlaid.v1 import gateway_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.common.request_queue import RequestQueue
from services.common.task_registry import TaskRegistry
from services.common.tokenizer import Tokenizer
from services.gateway.config import GatewayConfig
from services.gateway.servicer import GatewayServicer


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer(resolve_model().path)


class Gateway:
    """A running gateway plus handles on its Redis state, for assertions."""

    def __init__(self, stub, queue: RequestQueue, registry: TaskRegistry, host: ServiceHost,
                 servicer: GatewayServicer) -> None:
        self.stub = stub
        self.queue = queue
        self.registry = registry
        self.host = host
        self.servicer = servicer


@pytest.fixture
def gateway_config():
    return GatewayConfig(port=0, redis_namespace=f"gw{uuid.uuid4().hex[:8]}", max_queue=4,
                         max_tokens_limit=256, max_model_len=512, read_block_ms=100)


@pytest.fixture
async def make_gateway(redis_url, tokenizer):
    """Factory: start a gateway with a config (and optional predictor client)."""
    started = []

    async def start(config: GatewayConfig, predictor=None, quantizer=None,
                    interceptors=None) -> Gateway:
        client = connect(redis_url)
        keys = RedisKeys(config.redis_namespace, config.pool)
        queue, registry = RequestQueue(client, keys), TaskRegistry(client, keys)
        await queue.ensure_group()
        servicer = GatewayServicer(config, queue, registry, tokenizer, predictor, quantizer)
        host = ServiceHost(["inlaid.v1.GatewayService"], "127.0.0.1", 0, grace_s=0.1,
                           interceptors=interceptors)
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, host.server)
        host.on_stopping(servicer.begin_shutdown)
        port = await host.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((host, channel, client, servicer))
        return Gateway(gateway_pb2_grpc.GatewayServiceStub(channel), queue, registry, host,
                       servicer)

    yield start
    for host, channel, client, servicer in started:
        await channel.close()
        await host.stop()
        await servicer.close()
        await client.aclose()


@pytest.fixture
async def gateway(make_gateway, gateway_config) -> Gateway:
    return await make_gateway(gateway_config)


def write_lora(path: Path, rank: int = 4, layers=(0, 1), hidden: int = 576,
               modules=("q_proj",), config_rank: int | None = None) -> Path:
    """A PEFT-format LoRA directory for SmolLM2 written by hand (no model load needed)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in layers:
        for module in modules:
            out = 192 if module in ("k_proj", "v_proj") else hidden
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank) * 0.01
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": config_rank or rank, "lora_alpha": 2 * rank,
        "target_modules": list(modules), "bias": "none"}))
    return path
