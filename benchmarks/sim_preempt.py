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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim_starvation import add_study_args, run_study  # noqa: E402


def preempt_variants(ratios: list[float]):
    """variants(sched) for simulate: fifo, inlaid as the run had it, inlaid displacing at each ratio."""
    return lambda sched: [("fifo", "fifo", sched)] + [
        ("inlaid" if r == 0 else f"inlaid, displace at {r:g}x", "inlaid",
         dataclasses.replace(sched, inlaid_preempt_ratio=r)) for r in [0.0, *ratios]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap, "sim_preempt")
    ap.add_argument("--ratios", default="2,4,8", help="inlaid_preempt_ratio values to simulate (off is always run)")
    ap.add_argument("--cost", choices=("calib", "pooled"), default="calib",
                    help="calib: the run's calibration fit; pooled: calibration + every 4-bit replay's steps")
    args = ap.parse_args()
    run_study(args, preempt_variants([float(x) for x in args.ratios.split(",")]), "sim_preempt.py",
              "Displacement of long running requests under overload, simulated", pooled_cost=args.cost == "pooled")


if __name__ == "__main__":
    main()
