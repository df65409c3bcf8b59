"""benchmarks/sim_inlaid_grid.py on the recorded d5b34b3 drain run with a short trace: the grid's points
replay inlaid alone (fifo once), agree with sim_vs_fp16 on the same seed, and bad specs are clear errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import read_steps  # noqa: E402
from sim_inlaid_grid import parse_grid, parse_run, report, simulate_run  # noqa: E402
from sim_vs_fp16 import engines, ratio, simulate  # noqa: E402

RUN = ROOT / "benchmarks" / "results" / "serve_gpu_24gib_long_drain30_fixed_d5b34b3"


def test_grid_points_match_sim_vs_fp16() -> None:
    points = parse_grid(["inlaid_step_time_ratio=0,2"])
    assert points == [{"inlaid_step_time_ratio": 0.0}, {"inlaid_step_time_ratio": 2.0}]
    res = simulate_run(str(RUN), "requests", points, 3.2, [100], 3.0)
    run = json.loads(RUN.with_suffix(".json").read_text())
    eng = engines(run, read_steps(f"{RUN}.steps.csv"))
    for point, got in zip(points, res["points"]):
        row = simulate(run, eng, rates=[3.2], seeds=[100], window_s=3.0, inlaid=point)[0]
        assert got["vs_fp16"]["slo"] == pytest.approx(ratio(row, "fifo fp16", "slo"))
        assert got["vs_fifo"]["jct"] == pytest.approx(ratio(row, "fifo", "jct"))
    assert res["points"][0]["vs_fp16"] != res["points"][1]["vs_fp16"]
    text = report({"meta": {"commit": "abc", "command": "python x", "wall_s": 1.0, "load_frac": 3.2,
                            "window_s": 3.0, "seeds": [100]}, "points": points, "runs": [res]})
    assert "| inlaid_step_time_ratio 2 | **" in text and "fixed_d5b34b3" in text


def test_bad_specs_are_clear_errors() -> None:
    for spec, match in ((["no_such_field=1"], "SchedulerConfig field"), (["inlaid_slo_scale=x"], "numbers"),
                        (["inlaid_slo_scale=0.5"], "inlaid_slo_scale must be")):
        with pytest.raises(SystemExit, match=match):
            parse_grid(spec)
    with pytest.raises(SystemExit, match="load unit"):
        parse_run(f"{RUN}:bytes")
    with pytest.raises(SystemExit, match="not found"):
        parse_run(str(RUN) + "_missing")
