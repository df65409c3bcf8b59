"""The serving benchmarks' shared replay loop on the real engine (SmolLM2, CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.simulator.trace import TraceRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from engine_replay import replay  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return LLMEngine(EngineConfig(num_kv_blocks=16, block_size=16, device="cpu", max_model_len=256,
                                  max_tokens_limit=64))


def _trace(lengths: list[int], gap_s: float) -> list[TraceRequest]:
    return [TraceRequest(arrival_s=i * gap_s, task="", prompt_tokens=8, output_tokens=n,
                         request_id=f"r{i}") for i, n in enumerate(lengths)]


def test_every_request_ends_at_its_trace_length(engine):
    trace = _trace([3, 5, 2, 4], gap_s=0.05)
    prompts = {r.request_id: [101 + i] * r.prompt_tokens for i, r in enumerate(trace)}
    result = replay(engine, trace, prompts, max_tokens=32)
    assert result.num_unfinished == 0
    by_id = {r.request_id: r for r in result.records}
    assert {rid: rec.num_output_tokens for rid, rec in by_id.items()} == {"r0": 3, "r1": 5, "r2": 2, "r3": 4}
    for req in trace:
        rec = by_id[req.request_id]
        assert req.arrival_s <= rec.first_token_s <= rec.finished_s <= result.wall_s
    assert sum(s.num_prefill_tokens for s in result.steps) >= 4 * 8   # every prompt was prefilled
    assert not engine.has_unfinished


def test_deadline_aborts_what_is_open(engine):
    trace = _trace([2, 40], gap_s=0.0) + [TraceRequest(arrival_s=60.0, task="", prompt_tokens=8,
                                                       output_tokens=2, request_id="late")]
    prompts = {r.request_id: [101] * r.prompt_tokens for r in trace}
    result = replay(engine, trace, prompts, max_tokens=64, deadline_s=0.5)
    assert result.wall_s < 30.0                    # did not wait for the request arriving at 60 s
    assert result.num_unfinished >= 1
    assert not engine.has_unfinished               # open requests were aborted, blocks freed
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_client_timeouts_abort_and_count_what_was_computed(engine):
    """client_timeout_s: a client that gives up has its request aborted (as the gateway cancels it) and
    counted with the tokens computed for it; told, the engine holds each request's deadline; the rest
    finish; every request is accounted for and every KV block comes back."""
    seen = []
    add_request = engine.add_request

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deadline_s"))
        return add_request(*args, **kwargs)

    engine.add_request = spy
    try:
        trace = _trace([60, 2], gap_s=0.0)
        prompts = {r.request_id: [101] * r.prompt_tokens for r in trace}
        result = replay(engine, trace, prompts, max_tokens=64, client_timeout_s=0.2)
        blind = replay(engine, trace, prompts, max_tokens=64, client_timeout_s=0.2, deadline_to_policy=False)
    finally:
        del engine.add_request
    for res in (result, blind):
        assert len(res.records) + len(res.cancelled) == 2
        assert "r0" in {rid for rid, _ in res.cancelled}       # 60 tokens in 0.2 s: not on this model
        assert all(r.finished_s - r.arrival_s <= 0.2 for r in res.records)
    assert seen[:2] != [None, None] and seen[2:] == [None, None]
    assert not engine.has_unfinished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
