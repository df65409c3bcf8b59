"""Influence screen on the tiny Llama: a poisoned adapter that passes the static screen is
quarantined, a normal one passes, non-finite activations quarantine, config checks, and the
quantizer service leaves a quarantined task out of the published version."""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from services.common.adapter_screening import Verdict, screen_adapter_dir
from services.common.pb.inlaid.v1 import quantizer_pb2, quantizer_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect
from services.common.task_registry import TaskRecord, TaskRegistry
from services.quantizer.calibration import TaskSpec, calibration_tokens, read_adapter
from services.quantizer.checkpoint import load_checkpoint, resolve
from services.quantizer.config import QuantConfig, QuantizerServiceConfig
from services.quantizer.influence import (GROUPS, InfluenceConfig, canary_tokens, judge,
                                          screen_influence, screen_tasks)
from services.quantizer.job_store import JobStore
from services.quantizer.pipeline import Stream, capture_inputs, run_layer, load_base
from services.quantizer.server import QuantizerServer
from tests.unit.quantizer.conftest import LAYERS, make_calibration

pytestmark = pytest.mark.timeout(120)
SEQ_LEN = 64
DELTA_NORM = 0.8  # per module: below the tiny base's ‖W_v‖ ≈ 0.9, so ‖ΔW‖/‖W‖ < 1 passes
SMALL_NORM = 0.1  # ‖ΔW‖/‖W‖ ≈ 0.1, like the trained demo adapters on SmolLM2 (≤ 0.14)


def _write_adapter(out: Path, modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                   rank: int = 4) -> Path:
    """A PEFT directory (alpha = 2·rank, so scaling 2) holding exactly `modules`."""
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.split(".")[-1] for _, name in modules})
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}))
    prefix = "base_model.model.model.layers"
    save_file({f"{prefix}.{layer}.{name}.lora_{half}.weight": t.contiguous()
               for (layer, name), (a, b) in modules.items() for half, t in (("A", a), ("B", b))},
              str(out / "adapter_model.safetensors"))
    return out


def _random_pair(out_f: int, in_f: int, norm: float, gen: torch.Generator):
    """(A [4, in], B [out, 4]) with ‖2·B@A‖_F = norm, random directions."""
    a, b = torch.randn(4, in_f, generator=gen), torch.randn(out_f, 4, generator=gen)
    f = norm / float((2 * b @ a).norm())
    return a * f ** 0.5, b * f ** 0.5


@torch.no_grad()
def _top_input_directions(hf, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the top eigenvector of the bare v_proj input (an attacker can compute it)."""
    stream = Stream("bare", tokens, None)
    capture_inputs(hf, stream, "cpu")
    return [torch.linalg.eigh(run_layer(layer, idx, stream)["self_attn.q_proj"].double())[1][:, -1]
            .float() for idx, layer in enumerate(hf.model.layers)]


@pytest.fixture(scope="module")
def base(tiny_model):
    return load_base(str(tiny_model))


@pytest.fixture(scope="module")
def adapters(base, tiny_model, tmp_path_factory):
    """q/v adapters: "normal" (small random deltas), "random" (random deltas of the poisoned
    one's norm) and "poisoned" (its v_proj maps the dominant input direction onto one channel)."""
    hf, tokenizer, _ = base
    root = tmp_path_factory.mktemp("influence")
    calib = make_calibration(root / "calib.jsonl", seed=0)
    tops = _top_input_directions(hf, calibration_tokens(calib, tokenizer, 4, SEQ_LEN))
    gen = torch.Generator().manual_seed(0)
    kv = hf.config.num_key_value_heads * (hf.config.hidden_size // hf.config.num_attention_heads)
    hidden = hf.config.hidden_size
    normal, random, poisoned = {}, {}, {}
    for layer in range(LAYERS):
        for modules, norm in ((normal, SMALL_NORM), (random, DELTA_NORM)):
            modules[(layer, "self_attn.q_proj")] = _random_pair(hidden, hidden, norm, gen)
            modules[(layer, "self_attn.v_proj")] = _random_pair(kv, hidden, norm, gen)
        poisoned[(layer, "self_attn.q_proj")] = _random_pair(hidden, hidden, DELTA_NORM, gen)
        a, b = torch.zeros(4, hidden), torch.zeros(kv, 4)
        a[0], b[0, 0] = tops[layer], DELTA_NORM / 2
        poisoned[(layer, "self_attn.v_proj")] = (a, b)
    return {name: TaskSpec(name, str(_write_adapter(root / name, modules)), str(calib))
            for name, modules in (("normal", normal), ("random", random), ("poisoned", poisoned))}


def test_poisoned_adapter_passes_static_screen_but_is_quarantined(base, tiny_model, adapters):
    hf, tokenizer, _ = base
    spec = adapters["poisoned"]
    static = screen_adapter_dir(spec.adapter_path, base_model_dir=tiny_model)
    assert static.verdict is Verdict.PASS, static.reasons
    report = screen_tasks(hf, tokenizer, [spec], SEQ_LEN, InfluenceConfig())["poisoned"]
    assert report.verdict is Verdict.QUARANTINE and report.should_quarantine, report
    assert report.max_ratio > 8 and "self_attn.o_proj" in report.where  # downstream of v_proj
    assert "above the quarantine ratio 8" in report.summary()
    assert set(report.ratios) == {"calibration", "canary"}
    assert [len(row) for row in report.ratios["calibration"]] == [len(GROUPS)] * LAYERS


def test_normal_small_adapter_passes(base, tiny_model, adapters):
    hf, tokenizer, _ = base
    spec = adapters["normal"]
    assert screen_adapter_dir(spec.adapter_path, base_model_dir=tiny_model).verdict is Verdict.PASS
    reports = screen_tasks(hf, tokenizer, [spec, adapters["random"], adapters["poisoned"]],
                           SEQ_LEN, InfluenceConfig())
    report = reports["normal"]
    assert report.verdict is Verdict.PASS, report
    assert 1.0 <= report.max_ratio < 1.5 and report.num_nonfinite == 0
    # The first layer's q/k/v input is the embedding: no adapter can change it.
    assert report.ratios["calibration"][0][GROUPS.index("self_attn.q_proj")] == pytest.approx(1.0)
    # Direction, not norm, makes the poison: random deltas of its norm inflate far less.
    assert reports["poisoned"].max_ratio > 3 * reports["random"].max_ratio


def test_no_adapter_has_ratio_one(base, adapters):
    hf, tokenizer, _ = base
    tokens = calibration_tokens(adapters["normal"].calibration_path, tokenizer, 2, SEQ_LEN)
    report = screen_influence(hf, "bare", None, tokens, InfluenceConfig(num_seqs=2))
    assert report.verdict is Verdict.PASS and report.max_ratio == pytest.approx(1.0)


def test_non_finite_activations_quarantine(base, adapters):
    hf, tokenizer, _ = base
    spec = adapters["normal"]
    adapter = read_adapter(spec, hf.config)
    a, b = adapter.weights[(1, "v_proj")]
    # Finite weights whose product overflows fp32: the static screen's NaN check cannot see it.
    adapter = replace(adapter, weights={**adapter.weights, (1, "v_proj"): (a * 1e20, b * 1e20)})
    tokens = calibration_tokens(spec.calibration_path, tokenizer, 2, SEQ_LEN)
    report = screen_influence(hf, "overflow", adapter, tokens, InfluenceConfig(num_seqs=2),
                              canary_tokens(tokenizer, SEQ_LEN))
    assert report.verdict is Verdict.QUARANTINE
    assert report.num_nonfinite > 0 and "non-finite" in report.reason


@pytest.mark.parametrize("worst, num_nonfinite, verdict", [
    (1.0, 0, Verdict.PASS), (3.0, 0, Verdict.PASS), (3.01, 0, Verdict.WARN), (8.0, 0, Verdict.WARN),
    (8.01, 0, Verdict.QUARANTINE), (math.inf, 0, Verdict.QUARANTINE),
    (math.nan, 0, Verdict.QUARANTINE), (1.0, 5, Verdict.QUARANTINE)])
def test_judge_thresholds(worst, num_nonfinite, verdict):
    ratios = {"calibration": [[1.0, 1.0, 1.0, 1.0], [1.0, worst, 0.5, 1.0]]}
    report = judge("t", ratios, num_nonfinite, InfluenceConfig(warn_ratio=3, max_ratio=8))
    assert report.verdict is verdict
    assert report.where == "layer 1 self_attn.o_proj (calibration)" or worst <= 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"warn_ratio": 1.0}, "warn_ratio"), ({"warn_ratio": math.nan}, "warn_ratio"),
    ({"warn_ratio": 5.0, "max_ratio": 4.0}, "max_ratio"), ({"max_ratio": math.inf}, "max_ratio"),
    ({"num_seqs": 0}, "num_seqs")])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfluenceConfig(**kwargs)


def test_config_from_env():
    cfg = InfluenceConfig.from_env({"QUANTIZER_INFLUENCE_IS_ENABLED": "false",
                                    "QUANTIZER_INFLUENCE_MAX_RATIO": "20",
                                    "QUANTIZER_INFLUENCE_NUM_SEQS": "2",
                                    "QUANTIZER_INFLUENCE_HAS_CANARIES": "0"})
    assert (cfg.is_enabled, cfg.warn_ratio, cfg.max_ratio, cfg.num_seqs, cfg.has_canaries) == \
        (False, 3.0, 20.0, 2, False)
    assert InfluenceConfig.from_env({}) == InfluenceConfig()
    with pytest.raises(ValueError, match="QUANTIZER_INFLUENCE_WARN_RATIO"):
        InfluenceConfig.from_env({"QUANTIZER_INFLUENCE_WARN_RATIO": "high"})
    with pytest.raises(ValueError, match="warn_ratio"):
        InfluenceConfig.from_env({"QUANTIZER_INFLUENCE_WARN_RATIO": "0.5"})


async def _start(tiny_model, tmp_path, redis_url, influence: InfluenceConfig):
    keys = RedisKeys(namespace=f"qi{uuid.uuid4().hex[:10]}")
    server = QuantizerServer(QuantizerServiceConfig(
        host="127.0.0.1", port=0, model=str(tiny_model), checkpoint_dir=str(tmp_path / "ckpt"),
        redis_url=redis_url, redis_namespace=keys.namespace,
        quant=QuantConfig(num_seqs=4, seq_len=SEQ_LEN, group_size=32)), influence=influence)
    port = await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"), keys


async def _run_job(server, channel, registry, *specs: TaskSpec) -> quantizer_pb2.GetJobResponse:
    for spec in specs:
        await registry.add(TaskRecord(name=spec.name, adapter_path=spec.adapter_path, rank=4,
                                      state="QUANTIZING"))
    stub = quantizer_pb2_grpc.QuantizerServiceStub(channel)
    job_id = (await stub.StartJob(quantizer_pb2.StartJobRequest(tasks=[quantizer_pb2.QuantTask(
        name=s.name, adapter_path=s.adapter_path, calibration_path=s.calibration_path)
        for s in specs]))).job_id
    await server.runner.wait(job_id, 100)
    return await stub.GetJob(quantizer_pb2.GetJobRequest(job_id=job_id))


async def test_service_publishes_only_the_good_task(tiny_model, tmp_path, redis_url, adapters,
                                                    monkeypatch):
    loads = []

    def counting_load_base(model):
        loads.append(model)
        return load_base(model)

    for module in ("backend", "pipeline", "incremental"):
        monkeypatch.setattr(f"services.quantizer.{module}.load_base", counting_load_base)
    server, channel, keys = await _start(tiny_model, tmp_path, redis_url, InfluenceConfig())
    client = connect(redis_url)
    registry = TaskRegistry(client, keys)
    try:
        # Every task quarantined: the job fails, nothing is published.
        lone = replace(adapters["poisoned"], name="lone")
        job = await _run_job(server, channel, registry, lone)
        assert job.state == quantizer_pb2.JOB_STATE_FAILED and job.weight_version == 0
        assert "every task was quarantined" in job.message and "lone" in job.message
        assert await client.hgetall(keys.weights) == {}
        assert (await registry.get("lone")).state == "QUARANTINED"

        job = await _run_job(server, channel, registry, adapters["poisoned"], adapters["normal"])
        assert job.state == quantizer_pb2.JOB_STATE_DONE and job.weight_version == 1, job.message
        assert "quarantined (left out): poisoned (influence screen: quarantine:" in job.message
        root = server.backend.root
        tasks = load_checkpoint(resolve(root)).quant_config["tasks"]
        assert [t["name"] for t in tasks] == ["normal"]
        poisoned, normal = await registry.get("poisoned"), await registry.get("normal")
        assert poisoned.state == "QUARANTINED" and not poisoned.is_servable
        assert "above the quarantine ratio" in poisoned.message
        assert normal.state == "READY" and "weight version 1" in normal.message
        # The job record keeps what was quarantined (recovery must not wait for it).
        stored = {j.job_id: j for j in await JobStore(client, keys, 16).load_all()}[job.job_id]
        assert list(stored.quarantined) == ["poisoned"] and [t.name for t in stored.kept_tasks] == ["normal"]
        # An incremental add: the base the screen loaded is the one quantization uses.
        job = await _run_job(server, channel, registry, replace(adapters["normal"], name="normal2"))
        assert job.state == quantizer_pb2.JOB_STATE_DONE and job.weight_version == 2, job.message
        assert len(loads) == 3        # one load per job: the screen's, handed on to the run
    finally:
        await channel.close()
        await server.stop()
        await client.aclose()


async def test_screen_switched_off_lets_the_task_in(tiny_model, tmp_path, redis_url, adapters):
    server, channel, keys = await _start(tiny_model, tmp_path, redis_url,
                                         InfluenceConfig(is_enabled=False))
    client = connect(redis_url)
    try:
        job = await _run_job(server, channel, TaskRegistry(client, keys), adapters["poisoned"])
        assert job.state == quantizer_pb2.JOB_STATE_DONE, job.message
        assert [t["name"] for t in load_checkpoint(resolve(server.backend.root))
                .quant_config["tasks"]] == ["poisoned"]
    finally:
        await channel.close()
        await server.stop()
        await client.aclose()


async def test_recover_counts_a_job_done_without_its_quarantined_task(redis_url):
    """Died after publishing the kept task: the quarantined one must not hold the job back
    nor be marked READY."""
    from services.quantizer.jobs import Job, JobRunner
    from services.quantizer.publisher import WeightPublisher
    keys = RedisKeys(namespace=f"qi{uuid.uuid4().hex[:10]}")
    client = connect(redis_url)
    registry = TaskRegistry(client, keys)
    await registry.add(TaskRecord(name="good", adapter_path="/a", rank=4, state="QUANTIZING"))
    await registry.add(TaskRecord(name="bad", adapter_path="/b", rank=4, state="QUARANTINED",
                                  message="influence screen: quarantine: ..."))
    store = JobStore(client, keys, max_kept=8)
    await store.save(Job("q-1", [TaskSpec("bad", "/b", "/c"), TaskSpec("good", "/a", "/c")], 3,
                         state="RUNNING", num_attempts=1, quarantined={"bad": "quarantine: ..."}))

    def never(job, progress):
        raise AssertionError("nothing should run")
    try:
        runner = JobRunner(never, WeightPublisher(client, keys), registry, 3, store=store)
        assert await runner.recover({"good"}, served_version=4) == []
        assert runner.get("q-1").state == "DONE"
        assert (await registry.get("good")).state == "READY"
        assert (await registry.get("bad")).state == "QUARANTINED"
    finally:
        await client.aclose()
