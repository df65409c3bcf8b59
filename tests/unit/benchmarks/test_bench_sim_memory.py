"""bench_sim_memory on the committed 24 GiB GPU run: both bases' fitted models, a short replay each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_a_short_projection_runs_both_bases_and_writes_its_ratios(tmp_path: Path) -> None:
    out = tmp_path / "mem"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_sim_memory.py", "--scenarios", "1x1,2x2", "--rates", "1.3",
         "--seeds", "20", "--window-s", "2", "--variants", "inlaid,inlaid-r025,fifo", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["meta"]["kv_blocks"] == {"4-bit": 1830, "fp16": 688}
    assert {(r["policy"], r["base"], r["scenario"]) for r in res["rows"]} == {
        (v, b, s) for v in ("inlaid", "inlaid-r025", "fifo") for b in ("4-bit", "fp16") for s in ("1x1", "2x2")}
    assert all(r["throughput_req_s"] > 0 for r in res["rows"])
    md = out.with_suffix(".md").read_text()
    assert "| 2x2 | 1.3 | inlaid-r025 |" in md      # the ratio table against fifo on fp16
