"""benchmarks/sim_vs_fp16.py on the recorded d5b34b3 drain run, with short traces: the fp16 engine
gets its own cost model and smaller KV cache, and the report counts the seeds meeting each target."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import read_steps  # noqa: E402
from sim_vs_fp16 import engines, ratio, report, simulate  # noqa: E402

RUN = ROOT / "benchmarks" / "results" / "serve_gpu_24gib_long_drain30_fixed_d5b34b3"


def test_three_engines_on_two_seeds() -> None:
    run = json.loads(RUN.with_suffix(".json").read_text())
    eng = engines(run, read_steps(f"{RUN}.steps.csv"))
    assert eng["fp16"][1].num_kv_blocks == 688 < eng["4-bit"][1].num_kv_blocks == 1830
    assert eng["errors"]["fp16, inlaid's steps (held out)"]["num_steps"] > 0
    rows = simulate(run, eng, rates=[3.2], seeds=[100, 101], window_s=3.0)
    assert [r["seed"] for r in rows] == [100, 101]
    for r in rows:   # the fp16 engine is slower per step and holds fewer sequences: fifo there is worst
        assert r["fifo fp16"]["jct_avg_s"] > r["fifo"]["jct_avg_s"]
        assert ratio(r, "fifo fp16", "jct") > ratio(r, "fifo", "jct") > 1.0
    meta = {"commit": "test", "run_json": str(RUN), "run_commit": "d5b34b3", "run_device": "H100", "rates": [3.2],
            "seeds": [100, 101], "window_s": 3.0, "capacity": 15.9, "slo_scale": 5.0, "fit_errors": eng["errors"],
            "command": "test", "wall_s": 0.0}
    text = report({"meta": meta, "rows": rows})
    assert "## 3.2 × C" in text and "| fifo on fp16 (S-LoRA's configuration) |" in text
    assert "of 2 seeds." in text


def test_prefill_cut_lowers_only_the_4bit_prefill_step_price() -> None:
    run = json.loads(RUN.with_suffix(".json").read_text())
    steps = read_steps(f"{RUN}.steps.csv")
    fitted, cut = engines(run, steps), engines(run, steps, prefill_cut_ms=5.7)
    assert abs(fitted["4-bit"][0].g_s_per_prefill_step - cut["4-bit"][0].g_s_per_prefill_step - 5.7e-3) < 1e-12
    assert cut["4-bit"][0].a_s == fitted["4-bit"][0].a_s and cut["fp16"][0] == fitted["fp16"][0]
    assert "cut by 5.7 ms" in cut["4-bit"][0].source
    huge = engines(run, steps, prefill_cut_ms=1e6)
    assert huge["4-bit"][0].g_s_per_prefill_step == 0.0      # never below zero



def test_load_in_tokens_scales_each_seed_to_the_burst_mix() -> None:
    """--load-unit tokens: a seed whose Zipf order favours shorter tasks gets more requests per
    second, so each trace offers the capacity burst's output tokens per second at frac × C."""
    from serve_gpu_fit import run_lengths
    from serve_gpu_workload import expected_output_tokens, task_names
    run = json.loads(RUN.with_suffix(".json").read_text())
    eng = engines(run, read_steps(f"{RUN}.steps.csv"))
    rows = simulate(run, eng, rates=[3.2], seeds=[100, 102], window_s=2.0, load_unit="tokens")
    lengths = run_lengths(run["meta"])
    tasks = task_names(run["meta"]["num_tasks"], list(lengths))
    c = run["calibration"]["fifo_capacity_req_s"]
    ref = expected_output_tokens(tasks, lengths, 1, zipf_a=run["meta"]["zipf_a"])
    for r in rows:
        mean = expected_output_tokens(tasks, lengths, r["seed"], zipf_a=run["meta"]["zipf_a"])
        assert abs(r["rate_req_s"] * mean - 3.2 * c * ref) < 1e-6 * ref
    assert rows[1]["rate_req_s"] > 1.5 * rows[0]["rate_req_s"]     # seed 102's mix is ~1.7x shorter


def test_latency_target_changes_inlaid_only() -> None:
    """inlaid_step_time_ratio: inlaid's replays change, fifo's stay the same. (On this run's steps, with
    its looser solo-latency fit, the capped pool lowers inlaid's SLO attainment: docs/results.md.)"""
    run = json.loads(RUN.with_suffix(".json").read_text())
    eng = engines(run, read_steps(f"{RUN}.steps.csv"))
    off = simulate(run, eng, rates=[3.2], seeds=[100], window_s=3.0)[0]
    on = simulate(run, eng, rates=[3.2], seeds=[100], window_s=3.0, inlaid={"inlaid_step_time_ratio": 2.0})[0]
    assert on["fifo"] == off["fifo"] and on["fifo fp16"] == off["fifo fp16"]
    assert on["inlaid"] != off["inlaid"]
    assert on["inlaid"]["throughput_req_s"] < off["inlaid"]["throughput_req_s"]


def test_slo_breakdown_buckets_by_output_length() -> None:
    """sim_slo_breakdown.buckets: attainment, deadline, wait and decode pace per output-length bucket."""
    from sim_slo_breakdown import buckets
    from services.engine.simulator.metrics import RequestRecord
    recs = [RequestRecord("a", "t", 0.0, 0.1, 0.2, 10, 5, 0, solo_latency_s=0.05),     # JCT 0.2 <= 0.25: met
            RequestRecord("b", "t", 0.0, 0.5, 1.1, 10, 7, 0, solo_latency_s=0.05),     # JCT 1.1: missed
            RequestRecord("c", "t", 0.0, 0.1, 1.0, 10, 100, 0, solo_latency_s=0.5)]    # JCT 1.0 <= 2.5: met
    rows = {r["tokens"]: r for r in buckets(recs, 5.0)}
    assert set(rows) == {"1-15", "64-127"}
    assert rows["1-15"]["requests"] == 2 and rows["1-15"]["slo"] == 0.5
    assert abs(rows["1-15"]["ttft_s"] - 0.3) < 1e-12 and abs(rows["1-15"]["deadline_s"] - 0.25) < 1e-12
    assert abs(rows["1-15"]["decode_s_per_token"] - (0.1 / 4 + 0.6 / 6) / 2) < 1e-12
    assert rows["64-127"]["slo"] == 1.0
