"""Serving metrics over finished requests and executed steps (shared by simulator and real-engine bench)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestRecord:
    """Timeline of one served request (seconds on one clock)."""

    request_id: str
    task: str
    arrival_s: float
    first_token_s: float
    finished_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    solo_latency_s: float | None = None   # latency if served alone (SLO reference); None = unknown

    @property
    def jct_s(self) -> float:
        return self.finished_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


@dataclass(frozen=True)
class StepRecord:
    """One executed step: its batch composition and duration."""

    num_prefill_tokens: int
    num_decode_seqs: int
    num_adapters: int
    num_kv_tokens_read: int
    step_s: float
    schedule_s: float = 0.0      # the policy's share of step_s (real-engine replays; 0 in the simulator)


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(requests: list[RequestRecord], steps: list[StepRecord] | None = None,
              slo_scale: float = 5.0) -> dict:
    """Throughput, latency, TTFT, JCT, SLO attainment and batch statistics.

    Definitions: JCT = finish − arrival; latency = JCT / output tokens (per
    output token, so long jobs are not counted as slow just for being long);
    TTFT = first token − arrival; SLO attained when JCT ≤ slo_scale × the
    request's latency served alone; throughput over first arrival → last finish.
    """
    if not requests:
        raise ValueError("no finished requests to summarize")
    jct = np.array([r.jct_s for r in requests])
    ttft = np.array([r.ttft_s for r in requests])
    norm = np.array([r.jct_s / max(1, r.num_output_tokens) for r in requests])
    duration = max(r.finished_s for r in requests) - min(r.arrival_s for r in requests)
    num_out = sum(r.num_output_tokens for r in requests)
    out = {
        "num_requests": len(requests),
        "duration_s": duration,
        "throughput_req_s": len(requests) / duration if duration > 0 else float("nan"),
        "throughput_tok_s": num_out / duration if duration > 0 else float("nan"),
        "latency_avg_s_per_token": float(norm.mean()),
        "latency_p99_s_per_token": _pct(norm, 99),
        "jct_avg_s": float(jct.mean()),
        "jct_p99_s": _pct(jct, 99),
        "ttft_avg_s": float(ttft.mean()),
        "ttft_p99_s": _pct(ttft, 99),
        "num_preemptions": sum(r.num_preemptions for r in requests),
    }
    solo = [r for r in requests if r.solo_latency_s is not None]
    if solo:
        out["slo_scale"] = slo_scale
        out["slo_attainment"] = sum(r.jct_s <= slo_scale * r.solo_latency_s for r in solo) / len(solo)
    if steps:
        adapters = np.array([s.num_adapters for s in steps])
        out.update({
            "num_steps": len(steps),
            "adapters_per_step_avg": float(adapters.mean()),
            "adapters_per_step_std": float(adapters.std()),
            "adapters_per_step_max": int(adapters.max()),
            "decode_seqs_per_step_avg": float(np.mean([s.num_decode_seqs for s in steps])),
            "steps_with_prefill_frac": float(np.mean([s.num_prefill_tokens > 0 for s in steps])),
        })
    return out
