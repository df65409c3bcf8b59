"""bench_serve_gpu's argument handling: the FIFO burst follows the output length factor, and
--ablations selects among the named inlaid ablations (an unknown name is refused)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_serve_gpu as bench  # noqa: E402


def test_burst_outlives_the_first_generation_of_longer_requests() -> None:
    assert bench.parse_args(["--tiny"]).burst_s == 5.0
    assert bench.parse_args(["--tiny", "--length-scale", "4x4"]).burst_s == 20.0
    assert bench.parse_args(["--tiny", "--length-scale", "2x0.5"]).burst_s == 5.0
    assert bench.parse_args(["--tiny", "--length-scale", "4x4", "--burst-s", "7"]).burst_s == 7.0


def test_ablations_are_selected_by_name() -> None:
    every = bench.Bench.ablations(SimpleNamespace(args=bench.parse_args(["--tiny"])))
    assert len(every) == len(bench.ABLATIONS)
    chosen = bench.Bench.ablations(SimpleNamespace(args=bench.parse_args(["--tiny", "--ablations", "r025,beta-inf"])))
    assert [label for label, *_ in chosen] == ["inlaid, reserve 1/4 of predicted output", "inlaid, beta=inf"]
    assert chosen[1][2] == 0   # β = ∞ is β 0 in the engine config


def test_unknown_ablation_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--ablations", "r025,nope"])
    assert "unknown ablations ['nope']" in capsys.readouterr().err
