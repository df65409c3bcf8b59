"""serve_gpu_ratios: the per-trace ratios of a run with repeated traces and their report section,
on hand-made result rows."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_gpu_ratios import ratios, repeats_md, trace_ratios  # noqa: E402


def _row(variant: str, thr: float, lat: float, jct: float, slo: float, **extra) -> dict:
    return dict(variant=variant, throughput_req_s=thr, latency_avg_s_per_token=lat, jct_avg_s=jct,
                jct_avg_all_s=jct, ttft_avg_s=1.0, slo_attainment_all=slo, num_trace_requests=100, **extra)


def _data() -> dict:
    return {
        "main": [_row("inlaid", 9.0, 0.1, 1.0, 0.9, load_frac=1.1), _row("fifo", 9.0, 0.2, 2.0, 0.3, load_frac=1.1),
                 _row("inlaid", 5.0, 0.1, 1.0, 1.0, load_frac=0.5), _row("fifo", 5.0, 0.1, 1.0, 1.0, load_frac=0.5)],
        "repeats": [_row("inlaid", 8.0, 0.1, 1.0, 0.8, load_frac=1.1, trace_no=1),
                    _row("fifo", 4.0, 0.3, 3.0, 0.1, load_frac=1.1, trace_no=1)],
        "fp16": [_row("fifo, fp16 base", 6.0, 0.2, 2.0, 0.1, load_frac=1.1)],
        "fp16_repeats": [_row("fifo, fp16 base", 4.0, 0.4, 4.0, 0.2, load_frac=1.1, trace_no=1)],
    }


def test_ratios_are_oriented_so_that_more_is_better() -> None:
    q = ratios(_row("inlaid", 8.0, 0.1, 1.0, 0.8), _row("fifo", 4.0, 0.3, 3.0, 0.1))
    assert [round(q[k], 9) for k in ("throughput", "avg_latency", "jct", "slo")] == [2.0, 3.0, 3.0, 8.0]


def test_each_trace_pairs_inlaid_with_its_own_baselines_at_the_top_rate() -> None:
    rows = trace_ratios(_data())
    assert [r["trace_no"] for r in rows] == [0, 1]
    assert rows[0]["same"]["jct"] == 2.0 and rows[0]["fp16"]["throughput"] == 1.5   # the 0.5 rows ignored
    assert rows[1]["same"]["throughput"] == 2.0 and rows[1]["fp16"]["slo"] == 4.0


def test_a_missing_baseline_shows_as_a_dash_and_no_mean() -> None:
    data = _data()
    data["fp16_repeats"] = []
    md = "\n".join(repeats_md(data))
    assert "## The highest rate on 2 traces" in md
    assert "| 1 | 100 | 2.00 | 3.00 | 3.00 | 8.00 | – | – | – | – |" in md
    mean, met = _cells(md, "| geometric mean"), _cells(md, "| target met on")
    assert mean[2:4] == ["1.41", "2.45"] and mean[6:] == ["–"] * 4    # √(1·2), √(2·3); fp16 columns: –
    assert met[2] == "1 of 2"     # throughput ≥ 1.5: trace 1 only


def _cells(md: str, start: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_one_trace_gives_no_section() -> None:
    data = _data()
    data["repeats"] = []
    assert repeats_md(data) == []
