"""bench_serve_gpu end to end on the CPU (--tiny: a tiny random model, fp32): calibration, the
policies at two rates and two ablations, so a section that would crash on the GPU machine crashes
here first (device time is scarce). Slow (~40 s): run with `make test-slow`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_serve_gpu as bench  # noqa: E402

pytestmark = pytest.mark.slow


def test_tiny_run_writes_calibration_policies_and_ablations(tmp_path: Path) -> None:
    bench.main(["--tiny", "--out", str(tmp_path), "--sections", "calib,main,ablate", "--policies", "inlaid,fifo",
                "--rates", "0.5,1.1", "--replay-s", "2", "--drain-s", "1", "--ablations", "streak2,r025",
                "--warm-burst-s", "0.5", "--burst-s", "3"])
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    cal = data["calibration"]
    assert cal["fifo_capacity_req_s"] > 0 and cal["sim_fifo_drain_req_s"] > 0
    assert {(r["variant"], r["load_frac"]) for r in data["main"]} == {
        (p, f) for p in ("inlaid", "fifo") for f in (0.5, 1.1)}
    assert [r["variant"] for r in data["ablations"]] == ["inlaid, decode streak 2",
                                                         "inlaid, reserve 1/4 of predicted output"]
    for r in data["main"]:   # every request's JCT, unfinished ones to the cut-off, bounds the finished mean
        assert r["jct_avg_all_s"] > 0
        if r["num_unfinished"] == 0:
            assert abs(r["jct_avg_all_s"] - r["jct_avg_s"]) < 1e-9
    md = (tmp_path / "serve_gpu.md").read_text()
    assert "drained on the fitted cost model" in md and "## Ablations" in md
    assert "JCT, all (≥)" in md and "JCT over every request" in md
    assert data["meta"]["host_python_loop_ms"] > 0 and "a fixed pure-Python loop" in md


def test_given_capacity_sets_the_rates(tmp_path: Path) -> None:
    """--capacity-req-s: the burst still runs (cost model, measured C recorded) but the rates are
    fractions of the given C, so replays of one command offer the same load."""
    bench.main(["--tiny", "--out", str(tmp_path), "--sections", "calib,main", "--policies", "fifo",
                "--rates", "0.5", "--replay-s", "2", "--drain-s", "1", "--warm-burst-s", "0.5", "--burst-s", "3",
                "--capacity-req-s", "3.0"])
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    cal = data["calibration"]
    assert cal["fifo_capacity_req_s"] == 3.0 and cal["capacity_given"] and cal["measured_capacity_req_s"] > 0
    assert [r["rate_req_s"] for r in data["main"]] == [1.5]
    assert "req/s, given** (`--capacity-req-s`)" in (tmp_path / "serve_gpu.md").read_text()


def test_repeated_traces_at_the_highest_rate(tmp_path: Path) -> None:
    """--trace-repeats 3: two more traces at the top rate, each replayed by inlaid and fifo on the
    run's base and by fifo in the fp16 section; the report tabulates the three traces' ratios."""
    bench.main(["--tiny", "--out", str(tmp_path), "--sections", "calib,main,repeat,fp16", "--policies", "inlaid,fifo",
                "--rates", "1.1", "--replay-s", "2", "--drain-s", "1", "--warm-burst-s", "0.5", "--burst-s", "3",
                "--trace-repeats", "3", "--fp16-policies", "fifo"])
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    assert [(r["trace_no"], r["variant"]) for r in data["repeats"]] == [
        (1, "inlaid"), (1, "fifo"), (2, "inlaid"), (2, "fifo")]
    assert [(r["trace_no"], r["variant"]) for r in data["fp16_repeats"]] == [(1, "fifo, fp16 base"), (2, "fifo, fp16 base")]
    assert [r["variant"] for r in data["fp16"]] == ["fifo, fp16 base"] and "trace_no" not in data["fp16"][0]
    md = (tmp_path / "serve_gpu.md").read_text()
    assert "## The highest rate on 3 traces" in md and "| target met on |" in md


def test_load_in_tokens_scales_each_trace(tmp_path: Path) -> None:
    """--load-unit tokens: each trace's req/s is C × rate scaled to its task mix (trace_rate), the
    main and repeat sections alike, and the report says so."""
    from serve_gpu_workload import trace_rate
    bench.main(["--tiny", "--out", str(tmp_path), "--sections", "calib,main,repeat", "--policies", "fifo",
                "--rates", "0.5", "--replay-s", "2", "--drain-s", "1", "--warm-burst-s", "0.5", "--burst-s", "3",
                "--capacity-req-s", "3.0", "--trace-repeats", "2", "--repeat-policies", "fifo",
                "--load-unit", "tokens"])
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    assert data["meta"]["load_unit"] == "tokens"
    args = bench.parse_args(["--tiny", "--load-unit", "tokens", "--out", str(tmp_path / "b")])
    b = bench.Bench(args)
    for row, seed in ((data["main"][0], 10), (data["repeats"][0], 1010)):
        assert row["rate_req_s"] == trace_rate(1.5, "tokens", b.tasks, b.lengths, seed, 1, args.zipf_a)
    assert "**Load in output tokens**" in (tmp_path / "serve_gpu.md").read_text()


def test_fp8_kv_cache_on_the_base_and_fp16_cache_in_the_fp16_section(tmp_path: Path) -> None:
    """--kv-cache-dtype fp8_e4m3 --kv-max-blocks: the run's base serves from a capped fp8 cache, the fp16
    section (S-LoRA's configuration) from a cache in its own dtype; the report says which is which."""
    bench.main(["--tiny", "--out", str(tmp_path), "--sections", "calib,main,fp16", "--policies", "inlaid",
                "--rates", "0.5", "--replay-s", "2", "--drain-s", "1", "--warm-burst-s", "0.5", "--burst-s", "3",
                "--fp16-policies", "fifo", "--kv-cache-dtype", "fp8_e4m3", "--kv-max-blocks", "300"])
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    meta = data["meta"]
    assert meta["kv_cache_dtype"] == "fp8_e4m3" and meta["num_kv_blocks"] == 300
    assert meta["memory"]["base"]["kv_cache_dtype"] == "float8_e4m3fn"
    assert meta["memory"]["fp16"]["kv_cache_dtype"] == "float32"      # --tiny: the fp16 section runs fp32 on CPU
    assert data["fp16_meta"]["num_kv_blocks"] > 300
    assert all(r["num_unfinished"] == 0 for r in data["main"])
    md = (tmp_path / "serve_gpu.md").read_text()
    assert "**fp8_e4m3 KV cache** on the quantized base, capped at 300 blocks" in md
    # the torch path keeps V in K's layout (token-major is the GPU fast path's, for fp8 caches)
    assert meta["kv_v_layout"] == "key" and meta["memory"]["base"]["kv_v_layout"] == "key"
    assert meta["decode_launch"]["fp8_dot"] is False and meta["decode_launch"]["fp8_block_n"] == 128
    assert "(fp8 caches: BN 128, 4 warps, stages default, CUDA cores)" in md


def test_inlaid_latency_target_reaches_the_engine_and_the_report(tmp_path: Path) -> None:
    """--inlaid-step-time-ratio / --inlaid-slo-scale: inlaid's engines run with the latency target and the
    deadline-aware admission; the report says so."""
    bench.main(["--tiny", "--out", str(tmp_path), "--sections", "calib,main", "--policies", "inlaid",
                "--rates", "0.5", "--replay-s", "2", "--drain-s", "1", "--warm-burst-s", "0.5", "--burst-s", "3",
                "--inlaid-step-time-ratio", "3", "--inlaid-slo-scale", "5"])
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    assert data["meta"]["inlaid_step_time_ratio"] == 3.0 and data["meta"]["inlaid_slo_scale"] == 5.0
    assert all(r["num_unfinished"] == 0 for r in data["main"])
    md = (tmp_path / "serve_gpu.md").read_text()
    assert "**inlaid's latency target**" in md and "**inlaid's deadline-aware admission**" in md


def test_client_timeouts_section_replays_three_arms_and_reports_goodput(tmp_path: Path) -> None:
    """--sections calib,timeouts: inlaid told / not told and fifo on the main trace with clients giving up
    after --client-timeout-s; every request is finished or cancelled, and the report has the table."""
    bench.main(["--tiny", "--out", str(tmp_path), "--sections", "calib,timeouts", "--policies", "inlaid",
                "--rates", "3.0", "--replay-s", "2", "--drain-s", "1", "--warm-burst-s", "0.5", "--burst-s", "3",
                "--client-timeout-s", "0.3"])
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    rows = data["timeouts"]
    assert [r["arm"] for r in rows] == ["inlaid, told the deadlines", "inlaid, not told", "fifo"]
    for r in rows:
        assert r["client_timeout_s"] == 0.3 and 0.0 <= r["goodput"] <= 1.0
        finished = r.get("num_requests", 0)
        assert finished + r["num_unfinished"] == r["num_trace_requests"] and r["num_cancelled"] <= r["num_unfinished"]
        assert r["goodput"] == finished / r["num_trace_requests"]
    assert "## Clients that give up after 0.3 s" in (tmp_path / "serve_gpu.md").read_text()
