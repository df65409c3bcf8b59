"""step_cost_by_run: the per-replay fit recovers known step costs and skips replays too short to fit."""
from __future__ import annotations

import csv
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
