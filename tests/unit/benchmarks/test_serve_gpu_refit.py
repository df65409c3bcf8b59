"""The serving benchmark's --refit path on a recorded GPU run (benchmarks/results/serve_gpu.*).

It runs on a CPU after a device call: refit the cost model to the measured steps and rerun the
simulated sections. It once raised NameError before writing anything, which only showed when
someone needed it, so it runs here on short simulated traces.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_gpu_fit import refit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.parametrize("stem", ["serve_gpu", "serve_gpu_ce90b7a"])   # without / with a scale section
def test_refit_rewrites_the_report_with_simulated_rates(tmp_path: Path, stem: str) -> None:
    for ext in ("json", "steps.csv"):
        shutil.copy(RESULTS / f"{stem}.{ext}", tmp_path / f"serve_gpu.{ext}")
    before = json.loads((tmp_path / "serve_gpu.json").read_text())
    refit(tmp_path, sim_s=1.0, sim_rates=[0.5, 1.3], seed=0)
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    assert data["refit"]["cost_model"]["a_s"] > 0
    assert data["refit"]["fit_70_30"]["heldout"]["median_abs_rel_err"] < 0.5
    assert {r["load_frac"] for r in data["sim_rates"]} == {0.5, 1.3}
    assert {r["policy"] for r in data["sim_rates"]} >= {"inlaid", "fifo"}
    if "scale" in before:   # the simulated scaling rows cover the real run's task counts
        counts = {r["num_tasks"] for r in before["scale"]["real"]}
        assert {r["num_tasks"] for r in data["scale"]["sim"]} == counts
    assert "Simulated" in (tmp_path / "serve_gpu.md").read_text()


def test_refit_keeps_the_runs_length_scale(tmp_path: Path) -> None:
    """A --length-scale 4x4 run is re-simulated on 4x requests (the refit once used unscaled ones)."""
    for ext in ("json", "steps.csv"):
        shutil.copy(RESULTS / f"serve_gpu_24gib_long_e03242d.{ext}", tmp_path / f"serve_gpu.{ext}")
    refit(tmp_path, sim_s=3.0, sim_rates=[1.3], seed=0)
    data = json.loads((tmp_path / "serve_gpu.json").read_text())
    assert data["meta"]["length_scale"] == [4.0, 4.0]
    row = next(r for r in data["sim_rates"] if r["variant"] == "inlaid")
    out_per_request = row["throughput_tok_s"] / row["throughput_req_s"]
    assert out_per_request > 60, out_per_request   # unscaled traces average ~28 output tokens
