"""StartJob's bits / group size on a real gRPC server and Redis: unsupported values answer
INVALID_ARGUMENT with the reason and leave nothing behind (no job record, no version, no
task state change); the first job quantizes with them; later jobs must match the base."""
from __future__ import annotations

import uuid

import grpc
import pytest

from services.common.pb.inlaid.v1 import quantizer_pb2, quantizer_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.quantizer.checkpoint import load_checkpoint
from services.quantizer.config import QuantConfig, QuantizerServiceConfig
from services.quantizer.influence import InfluenceConfig
from services.quantizer.server import QuantizerServer

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def quantizer(tiny_model, tmp_path, redis_url):
    keys = RedisKeys(namespace=f"qs{uuid.uuid4().hex[:10]}")
    server = QuantizerServer(QuantizerServiceConfig(
        host="127.0.0.1", port=0, model=str(tiny_model), checkpoint_dir=str(tmp_path / "ckpt"),
        redis_url=redis_url, redis_namespace=keys.namespace,
        quant=QuantConfig(num_seqs=4, seq_len=64, group_size=32)),
        # conftest's random adapters (‖ΔW‖ 25–40× the tiny base's ‖W‖) fail the influence
        # screen by design; test_influence.py covers it.
        influence=InfluenceConfig(is_enabled=False))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = connect(redis_url)
    yield server, quantizer_pb2_grpc.QuantizerServiceStub(channel), keys, client
    await channel.close()
    await server.stop()
    await client.aclose()


def _request(spec, bits: int = 0, group_size: int = 0) -> quantizer_pb2.StartJobRequest:
    return quantizer_pb2.StartJobRequest(tasks=[quantizer_pb2.QuantTask(
        name=spec.name, adapter_path=spec.adapter_path, calibration_path=spec.calibration_path)],
        bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits,group_size,reason", [
    (5, 0, "bits=5 is not supported"), (1, 0, "bits=1"), (16, 0, "bits=16"),
    (-4, 0, "bits=-4"), (0, -2, "group_size=-2"), (0, 100, "group_size=100"),
    (0, 1 << 30, "group_size=1073741824"), (3, 48, "group_size=48"),
])
async def test_unsupported_settings_are_invalid_and_write_nothing(quantizer, tiny_tasks, bits,
                                                                  group_size, reason):
    server, stub, keys, client = quantizer
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartJob(_request(tiny_tasks[0], bits, group_size))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert reason in err.value.details()
    assert await client.zcard(keys.quant_jobs) == 0
    assert await client.hgetall(keys.weights) == {}
    assert server.runner.pending_task_names() == set()
    assert not server.backend.root.exists() or not any(server.backend.root.iterdir())


async def test_first_job_uses_requested_settings_later_jobs_must_match(quantizer, tiny_tasks):
    server, stub, keys, client = quantizer
    alpha, beta, gamma = tiny_tasks
    job_id = (await stub.StartJob(_request(alpha, bits=8, group_size=64))).job_id
    await server.runner.wait(job_id, 120)
    job = await stub.GetJob(quantizer_pb2.GetJobRequest(job_id=job_id))
    assert job.state == quantizer_pb2.JOB_STATE_DONE, job.message
    assert (job.bits, job.group_size) == (8, 64)
    meta = load_checkpoint(server.backend.root / "v1").quant_config
    assert (meta["bits"], meta["group_size"]) == (8, 64)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartJob(_request(beta, bits=4))
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "8-bit with group size 64" in err.value.details()
    assert await client.zcard(keys.quant_jobs) == 1  # only the first job was recorded

    # 0 (or the same values) means the base's settings.
    for spec, bits, group in ((beta, 0, 0), (gamma, 8, 64)):
        job_id = (await stub.StartJob(_request(spec, bits, group))).job_id
        await server.runner.wait(job_id, 120)
        job = await stub.GetJob(quantizer_pb2.GetJobRequest(job_id=job_id))
        assert job.state == quantizer_pb2.JOB_STATE_DONE and (job.bits, job.group_size) == (8, 64)
