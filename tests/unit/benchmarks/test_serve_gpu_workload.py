"""The GPU serving benchmark's workload: a trace's expected work per request, and loads in tokens."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_gpu_workload import expected_output_tokens, make_trace, task_names, trace_rate  # noqa: E402

# two families far apart in output length, three tasks each: which one a seed's Zipf order puts
# first decides the work per request
LENGTHS = {"short": [(100, 4), (120, 8)], "long": [(200, 300), (220, 500)]}
TASKS = task_names(6, list(LENGTHS))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_expected_output_tokens_is_the_trace_mean(seed: int) -> None:
    trace = make_trace(TASKS, LENGTHS, 2000.0, 10.0, seed)
    sampled = sum(r.output_tokens for r in trace) / len(trace)
    assert len(trace) > 15000
    assert sampled == pytest.approx(expected_output_tokens(TASKS, LENGTHS, seed), rel=0.03)


def test_seeds_differ_in_work_per_request() -> None:
    means = [expected_output_tokens(TASKS, LENGTHS, seed) for seed in range(10)]
    assert max(means) > 1.5 * min(means)
    pooled = expected_output_tokens(TASKS, LENGTHS, 0, pooled=True)
    assert pooled == pytest.approx((4 + 8 + 300 + 500) / 4)


def test_trace_rate_in_tokens_offers_the_reference_mix_tokens_per_second() -> None:
    assert trace_rate(10.0, "requests", TASKS, LENGTHS, 5, 1) == 10.0
    for seed in range(5):
        rate = trace_rate(10.0, "tokens", TASKS, LENGTHS, seed, 1)
        assert rate * expected_output_tokens(TASKS, LENGTHS, seed) == pytest.approx(
            10.0 * expected_output_tokens(TASKS, LENGTHS, 1))
    assert trace_rate(10.0, "tokens", TASKS, LENGTHS, 1, 1) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="load unit must be one of"):
        trace_rate(10.0, "watts", TASKS, LENGTHS, 1, 1)


def test_same_seed_same_trace() -> None:
    """The weights moved into zipf_weights: a seed still draws the same trace."""
    a = make_trace(TASKS, LENGTHS, 50.0, 2.0, 7)
    b = make_trace(TASKS, LENGTHS, 50.0, 2.0, 7)
    assert [(r.arrival_s, r.task, r.output_tokens) for r in a] == [(r.arrival_s, r.task, r.output_tokens) for r in b]
