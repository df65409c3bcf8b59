"""LLMEngine on SmolLM2 (CPU): continuous batching, KV reuse, stops, aborts, bad requests."""
from __future__ import annotations

import pytest
import torch

from services.common.model_source import resolve_model
from services.engine.config import EngineConfig
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.errors import (AdapterInUseError, DuplicateRequestError,
                                    InvalidRequestError, UnknownTaskError)
from services.engine.llm_engine import LLMEngine
from services.engine.sampler import Sampler
from services.engine.sequence import FinishReason, SamplingParams
from peft_adapters import make_peft_adapter

NUM_BLOCKS = 6      # 6 × 16 tokens: small enough that finished requests' blocks must be reused


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    # fifo: these tests walk continuous batching and preemption step by step in arrival order
    eng = LLMEngine(EngineConfig(num_kv_blocks=NUM_BLOCKS, block_size=16, device="cpu", policy="fifo",
                                 max_model_len=512, max_tokens_limit=200))
    path = make_peft_adapter(resolve_model().path, tmp_path_factory.mktemp("ad") / "qv",
                             4, ["q_proj", "v_proj"])
    eng.add_adapter("qv", path)
    return eng


def prompt(engine, text: str, n: int = 20) -> list[int]:
    ids = engine.tokenizer.encode(text * 10)[:n]
    assert len(ids) == n
    return ids


def drain(engine, outputs: dict) -> list:
    outs = engine.step()
    for o in outs:
        outputs.setdefault(o.request_id, []).append(o)
    return outs


def test_continuous_batching_reuses_finished_blocks(engine):
    bm = engine.block_manager
    outputs: dict = {}
    ignore = dict(ignore_eos=True)
    engine.add_request("A", prompt(engine, "The sea is "), SamplingParams(max_tokens=3, **ignore))
    engine.add_request("B", prompt(engine, "One two three "), SamplingParams(max_tokens=8, **ignore),
                       task="qv")
    assert {o.request_id for o in drain(engine, outputs)} == {"A", "B"}   # both prefilled
    a_blocks = list(engine.scheduler.running[0].block_table)
    engine.add_request("C", prompt(engine, "Red green blue "), SamplingParams(max_tokens=6, **ignore))
    step2 = drain(engine, outputs)              # C joins the running batch: prefill + decode
    assert {o.request_id for o in step2} == {"A", "B", "C"}
    assert bm.num_free_blocks == 0
    # D cannot get blocks until A finishes; A finishes at step 3, then D takes A's blocks.
    engine.add_request("D", prompt(engine, "Alpha beta "), SamplingParams(max_tokens=4, **ignore))
    step3 = drain(engine, outputs)
    assert [o.request_id for o in step3 if o.is_finished] == ["A"]
    assert "D" not in {o.request_id for o in step3}
    assert bm.num_free_blocks == len(a_blocks)
    drain(engine, outputs)                      # D admitted into A's blocks
    d_seq = next(s for s in engine.scheduler.running if s.request_id == "D")
    assert sorted(d_seq.block_table) == sorted(a_blocks)
    while engine.has_unfinished:
        drain(engine, outputs)
    for rid, n in (("A", 3), ("B", 8), ("C", 6), ("D", 4)):
        last = outputs[rid][-1]
        assert last.is_finished and last.finish_reason is FinishReason.LENGTH
        assert last.num_output_tokens == n == sum(len(o.new_token_ids) for o in outputs[rid])
    assert bm.num_free_blocks == NUM_BLOCKS and engine.num_unfinished == 0
    stats = engine.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_kv_blocks"] == NUM_BLOCKS and stats["num_resident_adapters"] == 1
    # Batching does not change greedy results: each request alone gives the same tokens.
    alone = engine.generate([prompt(engine, "Red green blue ")],
                            SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert alone.token_ids == [t for o in outputs["C"] for t in o.new_token_ids]


def test_stop_string_truncates_and_never_streams_it(engine):
    ids = engine.tokenizer.encode("Count: one, two, three, four, five, six, seven, eight,")
    full = engine.generate([ids], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert len(full.text) > 12
    stop = full.text[6:10]
    cut = full.text.find(stop)
    engine.add_request("s", ids, SamplingParams(max_tokens=24, stop=(stop,), ignore_eos=True))
    chunks = []
    while engine.has_unfinished:
        chunks += engine.step()
    text = "".join(c.new_text for c in chunks)
    assert text == full.text[:cut] and stop not in text
    assert chunks[-1].finish_reason is FinishReason.STOP and chunks[-1].is_finished


def test_abort_frees_blocks(engine):
    engine.add_request("x", prompt(engine, "Hello world "), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_free_blocks < NUM_BLOCKS
    out = engine.abort("x")
    assert out.is_finished and out.finish_reason is FinishReason.CANCELLED
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS and not engine.has_unfinished
    assert engine.abort("x") is None


def test_step_prefetches_the_next_waiting_tasks_adapters(engine, monkeypatch):
    """lora_prefetch: before running a step, the engine hands the scheduler's next waiting tasks to
    the adapter store's background packer (when it can help: this CPU engine keeps no host packs,
    so the test stands in for it)."""
    import dataclasses
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, lora_prefetch=2))
    calls = []
    monkeypatch.setattr(engine.runner.lora, "prefetch", lambda names, limit: calls.append((names, limit)) or 0)
    monkeypatch.setattr(type(engine.runner.lora), "can_prefetch", property(lambda self: True))
    for i in range(4):   # 4 × 50 tokens: the 6-block cache admits 1 at a time, the rest wait
        engine.add_request(f"pf{i}", prompt(engine, "Hello world, how are you? ", 50), SamplingParams(max_tokens=2),
                           task="qv")
    outputs: dict = {}
    drain(engine, outputs)
    assert calls and calls[0] == (["qv"], 2)
    while engine.has_unfinished:
        drain(engine, outputs)
    assert all(outputs[f"pf{i}"][-1].is_finished for i in range(4))


def test_bad_requests(engine):
    ok = prompt(engine, "Hi there ")
    cases = [
        ([], SamplingParams(), "", InvalidRequestError, "empty"),
        (ok, SamplingParams(max_tokens=201), "", InvalidRequestError, "exceeds the limit"),
        (ok, SamplingParams(max_tokens=80), "", InvalidRequestError, "KV blocks"),
        ([5] * 500, SamplingParams(max_tokens=20), "", InvalidRequestError, "max_model_len"),
        ([10**6], SamplingParams(), "", InvalidRequestError, "out of range"),
        (ok, SamplingParams(), "nope", UnknownTaskError, "unknown task 'nope'"),
    ]
    for ids, params, task, exc, match in cases:
        with pytest.raises(exc, match=match):
            engine.add_request("bad", ids, params, task=task)
    assert issubclass(UnknownTaskError, KeyError) and issubclass(InvalidRequestError, ValueError)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    engine.add_request("dup", ok, SamplingParams(max_tokens=2))
    with pytest.raises(DuplicateRequestError):
        engine.add_request("dup", ok, SamplingParams(max_tokens=2))
    engine.abort("dup")
    assert not engine.has_unfinished


def test_adapter_in_use_cannot_be_removed(engine, tmp_path):
    path = make_peft_adapter(resolve_model().path, tmp_path / "k", 2, ["k_proj"])
    engine.add_adapter("k", path)
    engine.add_request("u", prompt(engine, "Hi there "), SamplingParams(max_tokens=2), task="k")
    with pytest.raises(AdapterInUseError):
        engine.remove_adapter("k")
    while engine.has_unfinished:
        engine.step()
    engine.remove_adapter("k")
    assert "k" not in engine.adapter_names
    with pytest.raises(UnknownTaskError):
        engine.add_request("u2", prompt(engine, "Hi there "), SamplingParams(), task="k")


def test_seeded_sampling_is_reproducible_across_batches(engine):
    ids = prompt(engine, "Once upon a time ")
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, top_k=40, seed=123,
                       ignore_eos=True)
    alone = engine.generate([ids], p)[0].token_ids
    other = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    batched = engine.generate([prompt(engine, "Zebra "), ids], [other, p])[1].token_ids
    assert alone == batched


def test_sampler_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    probs = Sampler.probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, True, False, False]
    probs = Sampler.probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert (probs > 0).tolist() == [True, False, False, False]
    probs = Sampler.probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert (probs > 0).tolist() == [True, True, False, False]
    assert Sampler("cpu").sample(logits[None], [SamplingParams()], ["r"]) == [0]


def test_detokenizer_never_emits_broken_utf8(engine):
    tok = engine.tokenizer
    text = " héllo 世界 🎉🎉 naïve ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"))
    chunks = [detok.add(t) for t in ids]
    chunks.append(detok.flush())
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks[:-1]                 # some token ended mid-character and was held back
    assert "".join(chunks) == tok.decode(ids)


def test_config_from_env():
    cfg = EngineConfig.from_env({"ENGINE_MAX_ADAPTERS": "12", "ENGINE_DTYPE": "float32",
                                 "ENGINE_KV_CACHE_BYTES": "1048576", "ENGINE_POLICY": "fifo",
                                 "ENGINE_INLAID_FULL_BATCH_STREAK_FACTOR": "3"})
    assert cfg.max_adapters == 12 and cfg.kv_cache_bytes == 1 << 20 and cfg.model == "smollm2-135m"
    assert cfg.scheduler_config().max_adapters_per_batch == 10
    assert cfg.scheduler_config().inlaid_full_batch_streak_factor == 3
    assert cfg.triton_fast_launch and not cfg.serial_split_k           # the kernel switches' defaults
    assert cfg.gemm_stream_k and not cfg.gemm_tma                      # stream-K tuned at M <= 16; TMA kinds not
    cfg = EngineConfig.from_env({"ENGINE_TRITON_FAST_LAUNCH": "0", "ENGINE_SERIAL_SPLIT_K": "1",
                                 "ENGINE_GEMM_STREAM_K": "0", "ENGINE_GEMM_TMA": "1"})
    assert not cfg.triton_fast_launch and cfg.serial_split_k and not cfg.gemm_stream_k and cfg.gemm_tma
    assert cfg.lora_expand_rows and cfg.lora_prefetch == 32               # LoRA: per-token expand, 32 packed ahead
    assert cfg.pdl == 0                                                   # PDL off (slower in the engine's LoRA steps)
    assert cfg.fused_decode_attention and not cfg.fused_mlp_activation    # both measured on the H100: faster / slower
    cfg = EngineConfig.from_env({"ENGINE_LORA_EXPAND_ROWS": "0", "ENGINE_LORA_PREFETCH": "8", "ENGINE_PDL": "2",
                                 "ENGINE_FUSED_DECODE_ATTENTION": "0", "ENGINE_FUSED_MLP_ACTIVATION": "1"})
    assert not cfg.lora_expand_rows and cfg.lora_prefetch == 8 and cfg.pdl == 2
    assert not cfg.fused_decode_attention and cfg.fused_mlp_activation
    # decode attention: tensor cores and split-KV below 4 programs per SM by default (measured faster on the H100)
    assert cfg.decode_attention_dot and cfg.decode_split_programs_per_sm == 4
    cfg = EngineConfig.from_env({"ENGINE_DECODE_ATTENTION_DOT": "0", "ENGINE_DECODE_SPLIT_PROGRAMS_PER_SM": "0"})
    assert not cfg.decode_attention_dot and cfg.decode_split_programs_per_sm == 0
    for env in ({"ENGINE_MAX_ADAPTERS": "x"}, {"ENGINE_DTYPE": "int3"}, {"ENGINE_PDL": "3"},
                {"ENGINE_MAX_ADAPTERS": "4"}, {"ENGINE_BLOCK_SIZE": "0"}, {"ENGINE_LORA_PREFETCH": "-1"},
                {"ENGINE_DECODE_SPLIT_PROGRAMS_PER_SM": "-1"}):
        with pytest.raises(ValueError):
            EngineConfig.from_env(env)


def test_preemption_recomputes_to_the_same_tokens(engine):
    """Three requests outgrow the 6 KV blocks: the newest is preempted, recomputed, unchanged."""
    texts = ["The sea is ", "One two three ", "Red green blue "]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    alone = [engine.generate([prompt(engine, t)], params)[0].token_ids for t in texts]
    for i, t in enumerate(texts):
        engine.add_request(f"p{i}", prompt(engine, t), params)
    seqs = {s.request_id: s for s in engine.scheduler.waiting}
    tokens: dict = {}
    preempted = 0
    while engine.has_unfinished:
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        preempted = max(preempted, sum(s.num_preemptions for s in seqs.values()))
    assert preempted >= 1
    assert [tokens[f"p{i}"] for i in range(3)] == alone
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS
