"""step_cost_by_run: the per-replay fit recovers known step costs and skips replays too short to fit;
the bias table prices each replay with the run's own cost model."""
from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import step_cost_by_run as S  # noqa: E402


def synthetic_steps(run: str, n: int, coef: tuple[float, ...], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prefill = rng.choice([0, 0, 0, rng.randint(16, 2048)])
        decode, adapters = rng.randint(1, 128), rng.randint(1, 12)
        t = coef[0] + coef[1] * prefill + coef[2] * decode + coef[3] * adapters + coef[4] * (prefill > 0)
        rows.append({"num_prefill_tokens": prefill, "num_decode_seqs": decode, "num_adapters": adapters,
                     "num_kv_tokens_read": 0, "step_s": t * (1 + rng.uniform(-0.01, 0.01)), "run": run})
    return rows


def test_fit_recovers_the_step_costs_of_each_replay(tmp_path: Path) -> None:
    fast, slow = (4e-3, 20e-6, 40e-6, 100e-6, 5e-3), (7e-3, 25e-6, 80e-6, 30e-6, 3e-3)
    rows = synthetic_steps("fast", 400, fast, 1) + synthetic_steps("slow", 400, slow, 2) \
        + synthetic_steps("tiny", 5, fast, 3)
    path = tmp_path / "x.steps.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for name, coef in (("fast", fast), ("slow", slow)):
        got, err = S.fit_rows([r for r in rows if r["run"] == name])
        assert got == pytest.approx(coef, rel=0.1, abs=2e-6)
        assert err < 0.02
    table = S.report(path)
    assert "| fast | 400 |" in table and "| slow | 400 |" in table
    assert "| tiny |" not in table     # too few steps to fit five terms


def test_bias_table_prices_each_replay_with_the_runs_cost_model(tmp_path: Path) -> None:
    """A replay whose steps follow the run's cost model is priced at 1.00; a slower one below 1;
    fp16 replays are left out; the pooled refit column is filled for replays, not calibration."""
    fast, slow = (4e-3, 20e-6, 40e-6, 100e-6, 5e-3), (8e-3, 40e-6, 80e-6, 200e-6, 10e-3)
    rows = synthetic_steps("calib burst fifo", 300, fast, 4) + synthetic_steps("inlaid", 300, fast, 5) \
        + synthetic_steps("fifo", 300, slow, 6) + synthetic_steps("fifo, fp16 base", 300, slow, 7)
    steps = tmp_path / "run.steps.csv"
    with steps.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    model = {"a_s": fast[0], "b_s_per_prefill_token": fast[1], "c_s_per_decode_seq": fast[2],
             "d_s_per_adapter": fast[3], "e_s_per_kv_token": 0.0, "g_s_per_prefill_step": fast[4],
             "source": "synthetic"}
    results = tmp_path / "run.json"
    results.write_text(json.dumps({"calibration": {"cost_model": model}}))
    table = S.report(steps, results)
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()
             if line.startswith("| ") and line.count("|") == 9}
    assert float(cells["inlaid"][5]) == pytest.approx(1.0, abs=0.01)
    assert float(cells["fifo"][5]) == pytest.approx(0.5, abs=0.02)       # steps twice the model's price
    assert cells["calib burst fifo"][7].startswith("–")
    assert float(cells["inlaid"][7].rstrip(" |")) > 1.1   # the pooled fit also saw fifo's slower steps
    assert "fifo, fp16 base" not in cells
