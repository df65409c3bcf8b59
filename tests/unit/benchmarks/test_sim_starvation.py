"""benchmarks/sim_starvation.py on the recorded d2add64 drain run, with a short window.

The starvation limit must matter where requests wait past it (a 5 s limit under 3.2 x C overload
reorders the queue) and not at all once it is longer than every wait (30 s vs off on 3 s traces).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import read_steps  # noqa: E402
from sim_starvation import report, simulate, starvation_variants  # noqa: E402

RUN = ROOT / "benchmarks" / "results" / "serve_gpu_24gib_long_drain_d2add64"


def test_starvation_limits_on_the_drain_run() -> None:
    run = json.loads(RUN.with_suffix(".json").read_text())
    steps = read_steps(f"{RUN}.steps.csv")
    rows = simulate(run, steps, rates=[3.2], seeds=[10], variants=starvation_variants([1, 30, 0]), window_s=3.0)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"fifo", "inlaid, starvation 1 s", "inlaid, starvation 30 s", "inlaid, starvation off"}
    assert by["inlaid, starvation 30 s"]["jct_avg_s"] == by["inlaid, starvation off"]["jct_avg_s"]
    assert by["inlaid, starvation 1 s"]["jct_avg_s"] != by["inlaid, starvation off"]["jct_avg_s"]
    assert by["inlaid, starvation off"]["jct_avg_s"] < by["fifo"]["jct_avg_s"]
    meta = {"commit": "test", "run_json": str(RUN), "run_commit": "d2add64", "rates": [3.2], "seeds": [10],
            "window_s": 3.0, "num_tasks": 21, "beta": 10, "max_num_seqs": 256, "length_scale": "4×4",
            "command": "test", "wall_s": 0.0}
    text = report({"meta": meta, "rows": rows})
    assert "## 3.2 × C" in text and "| fifo |" in text


def test_displacement_variants_on_the_drain_run() -> None:
    """sim_preempt's variants through the same simulate: displacement preempts only when on."""
    from sim_preempt import preempt_variants
    run = json.loads(RUN.with_suffix(".json").read_text())
    steps = read_steps(f"{RUN}.steps.csv")
    rows = simulate(run, steps, rates=[3.2], seeds=[10], variants=preempt_variants([1]), window_s=3.0)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"fifo", "inlaid", "inlaid, displace at 1x"}
    assert by["inlaid, displace at 1x"]["jct_avg_s"] != by["inlaid"]["jct_avg_s"]


def test_bound_variants_take_their_prediction_mode() -> None:
    """sim_bound's variants carry a 4th field, the prediction mode: oracle lengths change the order
    (the run's predictions are noisy), and each relaxation is simulated as its own row."""
    from sim_bound import bound_variants
    run = json.loads(RUN.with_suffix(".json").read_text())
    steps = read_steps(f"{RUN}.steps.csv")
    rows = simulate(run, steps, rates=[3.2], seeds=[10], variants=bound_variants, window_s=3.0)
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["fifo", "inlaid", "inlaid, oracle lengths", "inlaid, oracle, β = ∞",
                        "inlaid, oracle, β = ∞, streak 1, no switch margin, no guard"]
    assert by["inlaid, oracle lengths"]["jct_avg_s"] != by["inlaid"]["jct_avg_s"]
    assert by["inlaid, oracle, β = ∞, streak 1, no switch margin, no guard"]["jct_avg_s"] != \
        by["inlaid, oracle, β = ∞"]["jct_avg_s"]
