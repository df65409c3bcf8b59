"""benchmarks/sim_client_timeouts.py on the recorded d5b34b3 drain run with a short trace: every arm
accounts for every request, an impatient client loses requests a patient one gets, and the report renders."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sim_client_timeouts import ARMS, report, simulate  # noqa: E402

RUN = ROOT / "benchmarks" / "results" / "serve_gpu_24gib_long_drain30_fixed_d5b34b3"


def test_goodput_and_waste_per_arm() -> None:
    res = simulate(str(RUN), "requests", [3.2], [0.5, 60.0], [100], 3.0)
    short, long_ = res["rows"]
    for label, _, _ in ARMS:
        assert 0.0 <= short[label]["goodput"] < long_[label]["goodput"] == 1.0
        assert short[label]["wasted"] > 0.0 == long_[label]["wasted"]
    text = report({"meta": {"commit": "abc", "command": "python x", "wall_s": 1.0, "window_s": 3.0, "seeds": [100]},
                   "run": res, "rows": res["rows"]})
    assert "| 3.2 × C | 0.5 |" in text and "told / not told" in text
