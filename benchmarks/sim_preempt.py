"""Displacement (EngineConfig.inlaid_preempt_ratio) under overload, simulated on a GPU run's cost model.

With the ratio r > 0 the inlaid policy preempts the running request with the most predicted tokens
left for a waiting one whose predicted output is r times shorter, when the KV reserve leaves no room
(services/engine/policies/inlaid.py). It pays a recompute of the displaced request for a shorter
queue: this replays the GPU run's own workload (same generator, lengths, rates; several seeds)
drained, with r off and at each given value, beside fifo, on the run's calibration cost model and
on one refitted to the calibration steps and every 4-bit replay of the run (the calibration fit
misprices prefill steps by policy, step_cost_by_run.py; displacement adds recompute prefills).
Writes <out>.json and <out>.md. CPU only.

  python benchmarks/sim_preempt.py --run-json benchmarks/results/serve_gpu_24gib_long_drain30_7737606.json \\
      --steps-csv benchmarks/results/serve_gpu_24gib_long_drain30_7737606.steps.csv
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import read_steps, write_result  # noqa: E402
from serve_gpu_fit import fit_cost  # noqa: E402
from sim_starvation import report, simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def preempt_variants(ratios: list[float]):
    """variants(sched) for simulate: fifo, inlaid as the run had it, inlaid displacing at each ratio."""
    return lambda sched: [("fifo", "fifo", sched), ("inlaid", "inlaid", dataclasses.replace(sched, inlaid_preempt_ratio=0.0))] + [
        (f"inlaid, displace at {r:g}x", "inlaid", dataclasses.replace(sched, inlaid_preempt_ratio=r)) for r in ratios]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-json", required=True, help="a bench_serve_gpu result (serve_gpu*.json)")
    ap.add_argument("--steps-csv", required=True, help="its measured steps (serve_gpu*.steps.csv)")
    ap.add_argument("--rates", default="2.4,3.2", help="fractions of the run's FIFO capacity C")
    ap.add_argument("--seeds", default="10,11,12")
    ap.add_argument("--ratios", default="2,4,8", help="inlaid_preempt_ratio values to simulate (off is always run)")
    ap.add_argument("--cost", choices=("calib", "pooled"), default="calib",
                    help="calib: the run's calibration fit; pooled: calibration + every 4-bit replay's steps")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sim_preempt"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = json.loads(Path(args.run_json).read_text())
    steps = read_steps(args.steps_csv)
    rates = [float(x) for x in args.rates.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    cost, cost_steps = None, "the calibration steps"
    if args.cost == "pooled":
        pooled = [r for r in steps if "fp16" not in r["run"]]
        cost = fit_cost(pooled, "calibration + 4-bit replay steps")
        cost_steps = f"the calibration steps and every 4-bit replay ({len(pooled)} steps)"
    rows = simulate(run, steps, rates, seeds, preempt_variants([float(x) for x in args.ratios.split(",")]),
                    args.window_s, cost)
    m = run["meta"]
    meta = {"commit": args.commit, "run_json": args.run_json, "run_commit": m["git_commit"], "rates": rates,
            "seeds": seeds, "window_s": args.window_s, "num_tasks": m["num_tasks"], "beta": m["beta"],
            "max_num_seqs": m["max_num_seqs"], "length_scale": "×".join(f"{x:g}" for x in m.get("length_scale", (1, 1))),
            "cost_steps": cost_steps, "command": " ".join(["python", "benchmarks/sim_preempt.py"] + sys.argv[1:]),
            "wall_s": time.perf_counter() - t0}
    res = {"meta": meta, "rows": rows}
    write_result(args.out, res, report(res, "Displacement of long running requests under overload, simulated"))


if __name__ == "__main__":
    main()
