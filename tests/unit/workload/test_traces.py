"""Trace generator: determinism, rates, popularity, variants and the row format."""
from __future__ import annotations

import statistics

import pytest

from services.common.workload.task import TaskError
from services.common.workload.traces import TraceConfig, arrival_times, generate_trace, trace_tasks


def test_rows_have_the_contract_fields(tokenizer):
    rows = generate_trace(TraceConfig(rate=4, duration_s=5, num_tasks=9, seed=1), tokenizer)
    assert rows and all(set(r) == {"arrival_s", "task", "prompt", "output_tokens", "prompt_tokens"}
                        for r in rows)
    assert [r["arrival_s"] for r in rows] == sorted(r["arrival_s"] for r in rows)
    assert all(0 <= r["arrival_s"] < 5 and r["output_tokens"] >= 1 and r["prompt_tokens"] > 10
               for r in rows)
    assert rows == generate_trace(TraceConfig(rate=4, duration_s=5, num_tasks=9, seed=1), tokenizer)
    assert rows != generate_trace(TraceConfig(rate=4, duration_s=5, num_tasks=9, seed=2), tokenizer)


def test_output_tokens_match_reference(tokenizer):
    from services.common.workload.task import get_task

    rows = generate_trace(TraceConfig(rate=10, duration_s=2, num_tasks=1), tokenizer)
    refs = {e.prompt: e.completion for e in get_task("arith").examples("test", 100)}
    for r in rows:
        assert r["output_tokens"] == len(tokenizer(refs[r["prompt"]], add_special_tokens=False).input_ids)


def test_variant_names_for_many_tasks():
    names = [t.name for t in trace_tasks(1000)]
    assert len(set(names)) == 1000
    assert names[0] == "arith" and "sort_list#17" in names


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 3.0)])
def test_arrival_rate_and_burstiness(arrival, cv):
    import random

    config = TraceConfig(rate=50, duration_s=200, arrival=arrival, cv=cv)
    times = arrival_times(config, random.Random(0))
    assert len(times) == pytest.approx(50 * 200, rel=0.1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.15)


def test_zipf_popularity_is_skewed(tokenizer):
    rows = generate_trace(TraceConfig(rate=100, duration_s=5, num_tasks=20, popularity="zipf",
                                      zipf_a=1.2), tokenizer)
    counts = {}
    for r in rows:
        counts[r["task"]] = counts.get(r["task"], 0) + 1
    assert counts["arith"] > 3 * counts.get("code_gen#2", 0)


@pytest.mark.parametrize("kwargs", [dict(rate=0), dict(num_tasks=1001), dict(arrival="uniform"),
                                    dict(popularity="pareto"), dict(cv=0), dict(duration_s=-1)])
def test_bad_configs(kwargs):
    with pytest.raises(TaskError):
        TraceConfig(**{"rate": 1, "duration_s": 1, **kwargs})
