"""kill -9 the quantizer mid-job (a real process, a real redis-server): the restarted quantizer
resumes the job and publishes it, or, past QUANTIZER_MAX_JOB_ATTEMPTS, marks it FAILED with the
reason; the served weight version never moves to a half-written one. Slow: `pytest -m slow`."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis

from services.common.pb.inlaid.v1 import quantizer_pb2, quantizer_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.task_registry import TaskRecord
from services.stack import wait_serving
from tests.faults.cluster import ROOT, FaultCluster, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
KEYS = RedisKeys()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A 16-layer random Llama (the SmolLM2 tokenizer) that takes seconds to quantize, so a
    kill lands mid-job; two adapters with calibration files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.common.model_source import resolve_model
    from tests.unit.quantizer.conftest import TOKENIZER_FILES, make_adapter, make_calibration

    root = tmp_path_factory.mktemp("qbase")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=384, intermediate_size=768, num_hidden_layers=16, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
        tie_word_embeddings=True)).save_pretrained(root / "model")
    for name in TOKENIZER_FILES:
        src = resolve_model("smollm2-135m").path / name
        if src.is_file():
            shutil.copy2(src, root / "model" / name)
    tasks = {}
    for i, name in enumerate(("alpha", "beta")):
        make_adapter(root / "model", root / f"adapter_{name}", seed=10 + i)
        make_calibration(root / f"{name}.jsonl", seed=i, num_lines=80)
        tasks[name] = quantizer_pb2.QuantTask(name=name, adapter_path=str(root / f"adapter_{name}"),
                                              calibration_path=str(root / f"{name}.jsonl"))
    return {"model": root / "model", "tasks": tasks}


class Quantizer:
    def __init__(self, cluster: FaultCluster, model: Path, ckpt: Path) -> None:
        self.port, self.cluster, self.process = free_port(), cluster, None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTIZER_")}
        self.env.update(REDIS_URL=cluster.redis_url, METRICS_PORT="off", LOG_FORMAT="text",
                        QUANTIZER_HOST="127.0.0.1", QUANTIZER_PORT=str(self.port),
                        QUANTIZER_MODEL=str(model), QUANTIZER_CHECKPOINT_DIR=str(ckpt),
                        QUANTIZER_NUM_CALIB_SEQS="16", QUANTIZER_SEQ_LEN="128",
                        QUANTIZER_GROUP_SIZE="32", QUANTIZER_NUM_THREADS="1",
                        # conftest's random adapters (‖ΔW‖ 25–40× the tiny base's ‖W‖) fail
                        # the influence screen by design (tests/unit/quantizer/test_influence.py).
                        QUANTIZER_INFLUENCE_IS_ENABLED="0")
        self.log = cluster.workdir / "quantizer.log"

    def start(self, max_job_attempts: int = 2) -> None:
        env = dict(self.env, QUANTIZER_MAX_JOB_ATTEMPTS=str(max_job_attempts))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "services.quantizer.server"],
                                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_serving(f"127.0.0.1:{self.port}", time.monotonic() + 120, self.process)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def call(self, method: str, request):
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            return getattr(quantizer_pb2_grpc.QuantizerServiceStub(channel), method)(request,
                                                                                    timeout=30)

    def job(self, job_id: str) -> quantizer_pb2.GetJobResponse:
        return self.call("GetJob", quantizer_pb2.GetJobRequest(job_id=job_id))

    def until(self, job_id: str, predicate, timeout_s: float = 240):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            job = self.job(job_id)
            if predicate(job):
                return job
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never reached the condition: {job}\n"
                             f"{self.log.read_text()[-3000:]}")


@pytest.fixture
def setup(base, tmp_path):
    cluster = FaultCluster()
    cluster.start_redis()
    client = redis.Redis(host="127.0.0.1", port=cluster.redis_port, decode_responses=True)
    quantizer = Quantizer(cluster, base["model"], tmp_path / "ckpt")
    yield cluster, client, quantizer, tmp_path / "ckpt"
    quantizer.stop()
    client.close()
    cluster.stop()


def _register(client, name: str) -> None:
    record = TaskRecord(name=name, adapter_path="/a", rank=4, state="QUANTIZING")
    client.hset(KEYS.tasks, name, record.to_json())


def _start_and_kill_mid_job(quantizer: Quantizer, client, task) -> str:
    job_id = quantizer.call("StartJob", quantizer_pb2.StartJobRequest(tasks=[task])).job_id
    job = quantizer.until(job_id, lambda j: j.num_layers_done >= 2)
    assert job.state == quantizer_pb2.JOB_STATE_RUNNING and job.num_layers_done < 16, job
    quantizer.kill()
    assert client.hget(KEYS.quant_job(job_id), "state") == "RUNNING"
    return job_id


def test_killed_job_is_resumed_then_failed_past_max_attempts(base, setup):
    cluster, client, quantizer, ckpt = setup
    _register(client, "alpha")
    quantizer.start()
    job_id = _start_and_kill_mid_job(quantizer, client, base["tasks"]["alpha"])
    stale = list(ckpt.glob(".tmp-v1-*"))
    assert stale, "the kill should leave a half-written version"
    assert client.hgetall(KEYS.weights) == {}

    quantizer.start()  # resumes the job from its start
    # The resumed job may already be writing its own temp dir; the killed run's must be gone.
    assert not any(path.exists() for path in stale)
    done = quantizer.until(job_id, lambda j: j.state == quantizer_pb2.JOB_STATE_DONE)
    assert (done.num_attempts, done.weight_version, done.num_layers_done) == (2, 1, 16), done
    assert client.hgetall(KEYS.weights) == {"version": "1", "path": str((ckpt / "v1").resolve())}
    assert TaskRecord.from_json("alpha", client.hget(KEYS.tasks, "alpha")).state == "READY"

    # With one attempt allowed, an interrupted job fails with the reason; v1 stays served.
    _register(client, "beta")
    quantizer.stop()
    quantizer.start(max_job_attempts=1)
    job_id = _start_and_kill_mid_job(quantizer, client, base["tasks"]["beta"])
    quantizer.start(max_job_attempts=1)
    failed = quantizer.job(job_id)
    assert failed.state == quantizer_pb2.JOB_STATE_FAILED, failed
    assert "quantizer stopped while this job was running" in failed.message
    assert "weight version 1 is unchanged" in failed.message
    beta = TaskRecord.from_json("beta", client.hget(KEYS.tasks, "beta"))
    assert beta.state == "FAILED" and "quantizer stopped" in beta.message
    assert client.hgetall(KEYS.weights)["version"] == "1"
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("CURRENT")) == ["v1"]
