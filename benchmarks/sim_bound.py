"""How far scheduling alone can take inlaid past fifo on one base, simulated on a GPU run's cost model.

Issue 7's same-base targets (vs fifo on the same 4-bit base: 1.5x throughput, 2x JCT, 5x SLO) are
set against a drained overload replay in which every policy serves the same requests on the same
engine. This replays the GPU run's own workload (same generator, lengths; several seeds), drained,
at rates up to far past saturation, with fifo, inlaid as the run had it, and inlaid relaxed towards
shortest-remaining-first with perfect knowledge: oracle lengths; no task cap (β = ∞); then also a
prefill chance at every step (decode streak 1), no task-switch margin and no starvation guard.
If none of them reaches a target at any rate, no reordering of this workload on this engine is
likely to (the last one also shows what SRPT's order costs in extra prefill steps). Writes
<out>.json and <out>.md. CPU only.

  python benchmarks/sim_bound.py --run-json benchmarks/results/serve_gpu_24gib_long_drain30_ba97a3b.json \\
      --steps-csv benchmarks/results/serve_gpu_24gib_long_drain30_ba97a3b.steps.csv
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim_starvation import add_study_args, run_study  # noqa: E402


def bound_variants(sched):
    """fifo, inlaid as run, then inlaid relaxed one constraint at a time towards oracle SRPT."""
    no_cap = dataclasses.replace(sched, max_adapters_per_batch=0)
    srpt = dataclasses.replace(no_cap, max_decode_streak=1, inlaid_task_switch_tokens=0, starvation_limit_s=1e9)
    return [("fifo", "fifo", sched),
            ("inlaid", "inlaid", sched),
            ("inlaid, oracle lengths", "inlaid", sched, "oracle"),
            ("inlaid, oracle, β = ∞", "inlaid", no_cap, "oracle"),
            ("inlaid, oracle, β = ∞, streak 1, no switch margin, no guard", "inlaid", srpt, "oracle")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap, "sim_bound")
    ap.set_defaults(rates="2.4,3.2,4.8,6.4", seeds="10,11,12,13,14")
    ap.add_argument("--cost", choices=("calib", "pooled"), default="pooled",
                    help="calib: the run's calibration fit; pooled: calibration + every 4-bit replay's steps")
    args = ap.parse_args()
    run_study(args, bound_variants, "sim_bound.py", "What scheduling alone can win over fifo, simulated",
              pooled_cost=args.cost == "pooled")


if __name__ == "__main__":
    main()
