"""Quantization jobs outlive the quantizer process: records in a real Redis, a real gRPC server on
an ephemeral port; a job running when its quantizer died is resumed, or FAILED with the reason
once it has been interrupted too often; the served weight version never changes half-way."""
from __future__ import annotations

import threading
import uuid

import grpc
import pytest

from services.common.pb.inlaid.v1 import quantizer_pb2, quantizer_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.common.task_registry import TaskRecord, TaskRegistry
from services.quantizer.calibration import TaskSpec
from services.quantizer.checkpoint import resolve
from services.quantizer.config import QuantConfig, QuantizerServiceConfig
from services.quantizer.influence import InfluenceConfig
from services.quantizer.job_store import JobStore
from services.quantizer.jobs import Job, JobRunner
from services.quantizer.publisher import WeightPublisher
from services.quantizer.server import QuantizerServer

pytestmark = pytest.mark.timeout(180)
DONE, FAILED = quantizer_pb2.JOB_STATE_DONE, quantizer_pb2.JOB_STATE_FAILED


class Quantizer:
    """A QuantizerServer with a gRPC stub; `crash()` leaves Redis exactly as kill -9 would
    (the job's record still says RUNNING: nothing is written on the way out)."""

    def __init__(self, server: QuantizerServer, channel) -> None:
        self.server, self.channel = server, channel
        self.stub = quantizer_pb2_grpc.QuantizerServiceStub(channel)

    async def start_job(self, *specs: TaskSpec, bits: int = 0, group_size: int = 0) -> str:
        request = quantizer_pb2.StartJobRequest(tasks=[quantizer_pb2.QuantTask(
            name=s.name, adapter_path=s.adapter_path or "", calibration_path=s.calibration_path)
            for s in specs], bits=bits, group_size=group_size)
        return (await self.stub.StartJob(request)).job_id

    async def get(self, job_id: str) -> quantizer_pb2.GetJobResponse:
        return await self.stub.GetJob(quantizer_pb2.GetJobRequest(job_id=job_id))

    async def finish(self, job_id: str) -> quantizer_pb2.GetJobResponse:
        await self.server.runner.wait(job_id, 120)
        return await self.get(job_id)

    def hang_jobs(self) -> threading.Event:
        """From now on a job blocks in its thread (after one layer) until the event is set."""
        release, real = threading.Event(), self.server.runner._quantize

        def hang(job, progress):
            progress(1, job.num_layers_total)
            release.wait(60)
            raise RuntimeError("released")  # the process is 'dead': never publish
        self.server.runner._quantize = hang
        self._restore = real
        return release

    async def crash(self) -> None:
        await self.channel.close()
        await self.server.stop()


@pytest.fixture
def env(tiny_model, tmp_path, redis_url):
    keys = RedisKeys(namespace=f"qp{uuid.uuid4().hex[:10]}")
    return {"keys": keys, "root": tmp_path / "ckpt", "model": tiny_model, "redis_url": redis_url}


@pytest.fixture
async def start_quantizer(env):
    started: list[Quantizer] = []

    async def start(max_job_attempts: int = 2) -> Quantizer:
        config = QuantizerServiceConfig(
            host="127.0.0.1", port=0, model=str(env["model"]), checkpoint_dir=str(env["root"]),
            redis_url=env["redis_url"], redis_namespace=env["keys"].namespace,
            max_job_attempts=max_job_attempts,
            quant=QuantConfig(num_seqs=4, seq_len=64, group_size=32))
        # conftest's random adapters (‖ΔW‖ 25–40× the tiny base's ‖W‖) fail the influence
        # screen by design; test_influence.py covers it.
        server = QuantizerServer(config, influence=InfluenceConfig(is_enabled=False))
        port = await server.start()
        quantizer = Quantizer(server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        started.append(quantizer)
        return quantizer

    yield start
    for quantizer in started:
        await quantizer.channel.close()
        await quantizer.server.stop()


@pytest.fixture
async def redis(env):
    client = connect(env["redis_url"])
    yield client
    await client.aclose()


async def _register(redis, keys, *specs: TaskSpec) -> TaskRegistry:
    registry = TaskRegistry(redis, keys)
    for spec in specs:
        await registry.add(TaskRecord(name=spec.name, adapter_path=spec.adapter_path or "",
                                      rank=4, state="QUANTIZING"))
    return registry


async def test_finished_job_is_readable_after_restart(start_quantizer, env, redis, tiny_tasks):
    await _register(redis, env["keys"], tiny_tasks[0])
    first = await start_quantizer()
    job_id = await first.start_job(tiny_tasks[0])
    assert (await first.finish(job_id)).state == DONE
    await first.crash()

    second = await start_quantizer()
    job = await second.get(job_id)
    assert (job.state, job.weight_version, job.num_attempts) == (DONE, 1, 1), job
    assert (job.num_layers_done, job.num_layers_total) == (2, 2)
    assert (job.bits, job.group_size) == (4, 32)


async def test_running_job_is_resumed_by_the_next_quantizer(start_quantizer, env, redis,
                                                            tiny_tasks):
    registry = await _register(redis, env["keys"], tiny_tasks[0])
    first = await start_quantizer()
    release = first.hang_jobs()
    job_id = await first.start_job(tiny_tasks[0])
    stored = await _until_recorded(redis, env["keys"], job_id)
    assert (stored["state"], stored["num_layers_done"]) == ("RUNNING", "1")
    await first.crash()
    # A killed job can leave a half-written version directory behind.
    stale = env["root"] / ".tmp-v1-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    try:
        second = await start_quantizer()
        assert not stale.exists()
        job = await second.finish(job_id)
    finally:
        release.set()
    assert job.state == DONE and job.num_attempts == 2, job
    assert "resumed after a quantizer restart" not in job.message  # replaced by the result
    assert await redis.hgetall(env["keys"].weights) == {
        "version": "1", "path": str((env["root"] / "v1").resolve())}
    assert (await registry.get("alpha")).state == "READY"


async def test_interrupted_too_often_fails_with_reason_and_keeps_weights(start_quantizer, env,
                                                                         redis, tiny_tasks):
    alpha, beta = tiny_tasks[0], tiny_tasks[1]
    registry = await _register(redis, env["keys"], alpha, beta)
    first = await start_quantizer(max_job_attempts=1)
    assert (await first.finish(await first.start_job(alpha))).state == DONE
    served = await redis.hgetall(env["keys"].weights)
    release = first.hang_jobs()
    job_id = await first.start_job(beta)
    await _until_recorded(redis, env["keys"], job_id)
    await first.crash()
    try:
        second = await start_quantizer(max_job_attempts=1)
        job = await second.get(job_id)
    finally:
        release.set()
    assert job.state == FAILED, job
    assert "quantizer stopped while this job was running" in job.message
    assert "layer 1/2" in job.message and "weight version 1 is unchanged" in job.message
    record = await registry.get("beta")
    assert record.state == "FAILED" and "quantizer stopped" in record.message
    assert await redis.hgetall(env["keys"].weights) == served
    assert resolve(env["root"]).name == "v1"
    assert sorted(p.name for p in env["root"].iterdir() if p.name.startswith("v")) == ["v1"]
    # The task can be submitted again once it failed.
    assert second.server.runner.pending_task_names() == set()


async def test_recover_marks_a_job_done_when_its_version_was_published(env, redis):
    """Died after publishing, before recording DONE: the version already holds the task."""
    keys, registry = env["keys"], TaskRegistry(redis, env["keys"])
    await registry.add(TaskRecord(name="x", adapter_path="/a", rank=4, state="QUANTIZING"))
    store = JobStore(redis, keys, max_kept=8)
    await store.save(Job("q-published", [TaskSpec("x", "/a", "/c.jsonl")], 3, state="RUNNING",
                         num_layers_done=3, num_attempts=1))
    await store.save(Job("q-queued", [TaskSpec("y", "/a", "/c.jsonl")], 3))

    def never(job, progress):
        raise AssertionError("nothing should run")
    runner = JobRunner(never, WeightPublisher(redis, keys), registry, 3, store=store)
    requeued = await runner.recover({"x"}, served_version=7)
    assert [j.job_id for j in requeued] == ["q-queued"]
    done = runner.get("q-published")
    assert (done.state, done.weight_version) == ("DONE", 7)
    assert (await registry.get("x")).state == "READY"
    assert (await redis.hget(keys.quant_job("q-published"), "state")) == "DONE"


async def test_store_keeps_active_jobs_and_trims_finished(env, redis):
    store = JobStore(redis, env["keys"], max_kept=3)
    for i in range(6):
        state = "RUNNING" if i == 0 else "DONE"
        await store.save(Job(f"q-{i}", [TaskSpec(f"t{i}", None, "/c")], 2, state=state,
                             created_s=1000.0 + i))
    jobs = await store.load_all()
    # The oldest finished ones go; the running one stays although it is the oldest.
    assert [(j.job_id, j.state) for j in jobs] == [("q-0", "RUNNING"), ("q-4", "DONE"),
                                                  ("q-5", "DONE")]
    assert not await redis.exists(env["keys"].quant_job("q-1"))
    assert await redis.ttl(env["keys"].quant_job("q-5")) > 0
    assert await redis.ttl(env["keys"].quant_job("q-0")) == -1  # active: no expiry
    await redis.hset(env["keys"].quant_job("q-4"), "state", "BOGUS")
    assert "q-4" not in [j.job_id for j in await store.load_all()]


async def _until_recorded(redis, keys, job_id: str, timeout_s: float = 60.0) -> dict:
    """The job's Redis record once it shows layer 1 done. Progress reaches Redis through a task
    the job thread schedules after updating the in-memory job, so polling the in-memory job and
    then reading Redis raced (seen under CPU load)."""
    import asyncio
    import time
    end = time.monotonic() + timeout_s
    while (stored := await redis.hgetall(keys.quant_job(job_id))).get("num_layers_done") != "1":
        assert time.monotonic() < end, "progress not recorded"
        await asyncio.sleep(0.02)
    return stored
