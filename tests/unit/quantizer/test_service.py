"""The quantizer service on a tiny random Llama with a real Redis: StartJob validation, full then
incremental jobs, publication to `inlaid:weights`, task states, failures, configuration."""
from __future__ import annotations

import json
import os
import uuid

import grpc
import pytest

from services.common.pb.inlaid.v1 import quantizer_pb2, quantizer_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.common.task_registry import TaskRecord, TaskRegistry
from services.quantizer.calibration import CalibrationError, TaskSpec
from services.quantizer.checkpoint import load_checkpoint, resolve
from services.quantizer.config import QuantConfig, QuantConfigError, QuantizerServiceConfig
from services.quantizer.influence import InfluenceConfig
from services.quantizer.jobs import JobRunner
from services.quantizer.publisher import WeightPublisher
from services.quantizer.server import QuantizerServer
from services.quantizer.servicer import QuantizerServicer
from tests.unit.quantizer.conftest import make_adapter, make_calibration, make_tiny_llama

pytestmark = pytest.mark.timeout(120)
DONE, FAILED = quantizer_pb2.JOB_STATE_DONE, quantizer_pb2.JOB_STATE_FAILED


class Service:
    def __init__(self, server: QuantizerServer, stub, keys: RedisKeys, client) -> None:
        self.server, self.stub, self.keys, self.client = server, stub, keys, client
        self.registry = TaskRegistry(client, keys)

    async def register(self, spec: TaskSpec) -> None:
        """What the gateway does before StartJob: the task serves meanwhile, QUANTIZING."""
        await self.registry.add(TaskRecord(name=spec.name, adapter_path=spec.adapter_path or "",
                                           rank=4, state="QUANTIZING"))

    async def start_job(self, *specs: TaskSpec) -> str:
        request = quantizer_pb2.StartJobRequest(tasks=[quantizer_pb2.QuantTask(
            name=s.name, adapter_path=s.adapter_path or "", calibration_path=s.calibration_path)
            for s in specs])
        return (await self.stub.StartJob(request)).job_id

    async def finish(self, job_id: str) -> quantizer_pb2.GetJobResponse:
        await self.server.runner.wait(job_id, 100)
        return await self.stub.GetJob(quantizer_pb2.GetJobRequest(job_id=job_id))

    async def weights(self) -> dict:
        return await self.client.hgetall(self.keys.weights)


def _config(model, root, redis_url, namespace) -> QuantizerServiceConfig:
    return QuantizerServiceConfig(host="127.0.0.1", port=0, model=str(model),
                                  checkpoint_dir=str(root), redis_url=redis_url,
                                  redis_namespace=namespace,
                                  quant=QuantConfig(num_seqs=4, seq_len=64, group_size=32))


@pytest.fixture
async def service(tiny_model, tmp_path, redis_url):
    keys = RedisKeys(namespace=f"qt{uuid.uuid4().hex[:10]}")
    # conftest's random adapters (‖ΔW‖ 25–40× the tiny base's ‖W‖) fail the influence
    # screen by design; test_influence.py covers it.
    server = QuantizerServer(_config(tiny_model, tmp_path / "ckpt", redis_url, keys.namespace),
                             influence=InfluenceConfig(is_enabled=False))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = connect(redis_url)
    yield Service(server, quantizer_pb2_grpc.QuantizerServiceStub(channel), keys, client)
    await channel.close()
    await server.stop()
    await client.aclose()


async def test_first_job_full_then_incremental_publishes_versions(service, tiny_tasks):
    alpha, beta = tiny_tasks[0], tiny_tasks[1]
    for spec in (alpha, beta):
        await service.register(spec)
    first = await service.finish(await service.start_job(alpha))
    assert first.state == DONE, first.message
    assert (first.num_layers_done, first.num_layers_total, first.weight_version) == (2, 2, 1)
    root = service.server.backend.root
    assert await service.weights() == {"version": "1", "path": str((root / "v1").resolve())}
    assert (await service.registry.get("alpha")).state == "READY"
    assert (await service.registry.get("beta")).state == "QUANTIZING"

    second = await service.finish(await service.start_job(beta))
    assert second.state == DONE and second.weight_version == 2, second.message
    assert resolve(root).name == "v2"
    assert (await service.weights())["path"] == str((root / "v2").resolve())
    tasks = load_checkpoint(root / "v2").quant_config["tasks"]
    assert [t["name"] for t in tasks] == ["alpha", "beta"]
    assert (await service.registry.get("beta")).state == "READY"
    assert "weight version 2" in (await service.registry.get("beta")).message

    # A task already in the quantized base cannot be added again.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.start_job(alpha)
    assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("other_base")
    return make_adapter(make_tiny_llama(root / "model", hidden=32), root / "adapter", seed=7)


async def test_bad_inputs_are_rejected_before_anything_starts(service, tiny_tasks, tmp_path,
                                                              other_base_adapter):
    adapter = tiny_tasks[0].adapter_path
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text("{not json\n")
    cases = [
        (TaskSpec("t1", adapter, str(tmp_path / "missing.jsonl")), "does not exist"),
        (TaskSpec("t2", adapter, str(empty)), "is empty"),
        (TaskSpec("t3", adapter, str(short)), "too short"),
        (TaskSpec("t4", adapter, str(malformed)), "not JSON"),
        (TaskSpec("t5", str(other_base_adapter), tiny_tasks[0].calibration_path), "t5"),
        (TaskSpec("t6", str(tmp_path / "no_adapter"), tiny_tasks[0].calibration_path), "t6"),
        (TaskSpec("bad name!", adapter, tiny_tasks[0].calibration_path), "invalid"),
        (TaskSpec("t7", adapter, ""), "calibration_path is required"),
    ]
    for spec, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await service.start_job(spec)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (spec, err.value.details())
        assert reason in err.value.details(), err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.StartJob(quantizer_pb2.StartJobRequest())
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await service.stub.GetJob(quantizer_pb2.GetJobRequest(job_id="nope"))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert service.server.runner.pending_task_names() == set()
    assert await service.weights() == {}
    assert not service.server.backend.root.exists() or not any(service.server.backend.root.iterdir())


async def test_job_failing_at_run_time_marks_task_failed_and_keeps_weights(service, tiny_tasks,
                                                                          tmp_path):
    alpha = tiny_tasks[0]
    await service.register(alpha)
    assert (await service.finish(await service.start_job(alpha))).state == DONE
    before = await service.weights()
    # Valid when submitted, gone when the job reads it (a file removed while the job queued).
    calib = make_calibration(tmp_path / "vanishing.jsonl", seed=9)
    spec = TaskSpec("vanishing", tiny_tasks[1].adapter_path, str(calib))
    await service.register(spec)
    calib.unlink()
    job = await service.server.runner.submit([spec])  # bypasses StartJob's up-front check
    failed = await service.finish(job.job_id)
    assert failed.state == FAILED and "does not exist" in failed.message
    record = await service.registry.get("vanishing")
    assert record.state == "FAILED" and "does not exist" in record.message
    assert await service.weights() == before
    assert resolve(service.server.backend.root).name == "v1"
    assert [p.name for p in service.server.backend.root.iterdir() if p.name.startswith(".tmp")] == []


async def test_runner_failure_never_publishes(redis_url):
    keys = RedisKeys(namespace=f"qt{uuid.uuid4().hex[:10]}")
    client = connect(redis_url)
    registry = TaskRegistry(client, keys)
    await registry.add(TaskRecord(name="x", adapter_path="/a", rank=4, state="QUANTIZING"))

    def explode(tasks, progress):
        progress(1, 3)
        raise CalibrationError("calibration file went bad")

    runner = JobRunner(explode, WeightPublisher(client, keys), registry, num_layers=3)
    runner.start()
    job = await runner.submit([TaskSpec("x", "/a", "/c.jsonl")])
    assert job.state == "QUEUED" and job.num_layers_total == 3
    job = await runner.wait(job.job_id, 10)
    assert (job.state, job.num_layers_done) == ("FAILED", 1)
    assert "went bad" in job.message
    assert (await registry.get("x")).state == "FAILED"
    assert await client.hgetall(keys.weights) == {}
    await runner.close()
    await client.aclose()


async def test_existing_version_is_published_at_start(tiny_model, tiny_tasks, tmp_path, redis_url):
    from services.quantizer.pipeline import quantize
    root = tmp_path / "ckpt"
    quantize(str(tiny_model), tiny_tasks[:1], QuantConfig(num_seqs=4, seq_len=32, group_size=32),
             root, show_progress=False)
    keys = RedisKeys(namespace=f"qt{uuid.uuid4().hex[:10]}")
    server = QuantizerServer(_config(tiny_model, root, redis_url, keys.namespace))
    await server.start()
    client = connect(redis_url)
    try:
        assert await client.hgetall(keys.weights) == {"version": "1",
                                                     "path": str((root / "v1").resolve())}
    finally:
        await server.stop()
        await client.aclose()


async def test_servicer_unavailable_until_attached():
    from services.common.errors import UnavailableError
    with pytest.raises(UnavailableError):
        await QuantizerServicer().GetJob(quantizer_pb2.GetJobRequest(job_id="x"), None)


def test_config_from_env(tmp_path):
    cfg = QuantizerServiceConfig.from_env({"ENGINE_MODEL": "/m/tiny", "QUANTIZER_BITS": "3",
                                           "QUANTIZER_NUM_CALIB_SEQS": "2",
                                           "QUANTIZER_SEQ_LEN": "64"})
    assert (cfg.model, cfg.port, cfg.quant.bits, cfg.quant.num_seqs, cfg.quant.seq_len) == \
        ("/m/tiny", 50054, 3, 2, 64)
    assert cfg.quant.group_size == 128 and cfg.quant.method == "mlgptq" and not cfg.quant.mse
    assert QuantizerServiceConfig.from_env({"QUANTIZER_MSE": "on"}).quant.mse
    assert not QuantizerServiceConfig.from_env({"QUANTIZER_MSE": "false"}).quant.mse
    assert QuantizerServiceConfig.from_env({"QUANTIZER_MODEL": "a", "ENGINE_MODEL": "b"}).model == "a"
    os.environ["INLAID_CACHE_DIR"], old = str(tmp_path), os.environ.get("INLAID_CACHE_DIR")
    try:
        assert QuantizerServiceConfig.from_env({}).resolved_checkpoint_dir() == \
            str(tmp_path / "quantized" / "smollm2-135m")
    finally:
        if old is None:
            del os.environ["INLAID_CACHE_DIR"]
        else:
            os.environ["INLAID_CACHE_DIR"] = old
    for env, reason in [({"QUANTIZER_BITS": "5"}, "bits=5"), ({"QUANTIZER_GROUP_SIZE": "100"}, "group_size"),
                        ({"QUANTIZER_METHOD": "rtn"}, "mlgptq"), ({"QUANTIZER_PORT": "x"}, "QUANTIZER_PORT"),
                        ({"QUANTIZER_MSE": "maybe"}, "QUANTIZER_MSE='maybe' is not a valid boolean")]:
        with pytest.raises(QuantConfigError, match=reason):
            QuantizerServiceConfig.from_env(env)
