"""The inlaid policy's starvation limit under overload, simulated on a GPU run's fitted cost model.

A request that has waited longer than `starvation_limit_s` goes ahead of SRTF. In a 10 s overload
replay with a 16 s drain most late requests wait longer than the benchmark's 5 s, so the guard,
not SRTF, orders a large share of the queue. This replays the GPU run's own workload (same
generator, lengths, rates; several seeds) on its cost model with the limit at 5 / 15 / 30 s and
off, beside fifo, and writes <out>.json and <out>.md. CPU only.

  python benchmarks/sim_starvation.py --run-json benchmarks/results/serve_gpu_24gib_long_drain_d2add64.json \
      --steps-csv benchmarks/results/serve_gpu_24gib_long_drain_d2add64.steps.csv
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sim import with_predictions  # noqa: E402
from results_io import read_steps, write_result  # noqa: E402
from serve_gpu_fit import pooled_4bit_cost, replay_setup  # noqa: E402
from serve_gpu_workload import make_trace, task_names  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.simulator.simulator import Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("throughput_req_s", "jct_avg_s", "jct_p99_s", "ttft_p99_s", "slo_attainment", "num_preemptions")


def starvation_variants(limits: list[float]):
    """variants(sched) for simulate: fifo, then inlaid at each starvation limit (0: off)."""
    return lambda sched: [("fifo", "fifo", sched)] + [
        (f"inlaid, starvation {'off' if lim == 0 else f'{lim:g} s'}", "inlaid",
         dataclasses.replace(sched, starvation_limit_s=lim or 1e9)) for lim in limits]


def simulate(run: dict, steps: list[dict], rates: list[float], seeds: list[int], variants,
             window_s: float, cost=None) -> list[dict]:
    """Rows of (rate, seed, variant) metrics: the run's workload at each rate and seed, simulated
    drained for every (label, policy, SchedulerConfig[, prediction mode of bench_sim.with_predictions])
    of variants(the run's SchedulerConfig) on
    `cost` (default: the cost model fitted to the run's calibration steps)."""
    meta = run["meta"]
    calib_cost, sched, sim_cfg, lengths = replay_setup(run, steps)
    cost = cost or calib_cost
    tasks = task_names(meta["num_tasks"], list(lengths))
    capacity = run["calibration"]["fifo_capacity_req_s"]
    variants = variants(sched)
    rows = []
    for frac in rates:
        for seed in seeds:
            trace = make_trace(tasks, lengths, frac * capacity, window_s, seed, zipf_a=meta["zipf_a"],
                               pred_sigma=meta["pred_sigma"], prefix=f"st{seed}-")
            for label, policy, cfg, *mode in variants:   # an optional 4th field: the prediction mode
                run_trace = with_predictions(trace, mode[0] if mode else "predictor")
                m = Simulator(POLICIES[policy], cfg, cost, sim_cfg).run(run_trace).metrics
                rows.append({"load_frac": frac, "seed": seed, "variant": label, **{k: m[k] for k in KEYS}})
                print(f"{frac:.1f} C seed {seed} {label:26s} JCT {m['jct_avg_s']:5.2f} s p99 {m['jct_p99_s']:5.1f} "
                      f"SLO {m['slo_attainment']:.3f}", flush=True)
    return rows


def report(res: dict, title: str = "Starvation limit under overload, simulated") -> str:
    meta = res["meta"]
    lines = [f"# {title} (commit {meta['commit']})", "",
             f"Device: this CPU, simulated; step times from the cost model fitted to "
             f"{meta.get('cost_steps', 'the calibration steps')} of "
             f"`{meta['run_json']}` (H100, commit {meta['run_commit']}); nothing here ran on a GPU. "
             f"Command: `{meta['command']}` ({meta['wall_s']:.0f} s).", "",
             f"Workload: that run's generator and settings ({meta['num_tasks']} tasks, lengths ×{meta['length_scale']}, "
             f"β = {meta['beta']}, max {meta['max_num_seqs']} running), {meta['window_s']:g} s of Poisson arrivals at "
             f"each rate, simulated to the last request (drained); seeds {meta['seeds']}. "
             "Rows are means over the seeds; ratios are fifo / inlaid (> 1: inlaid better; SLO: inlaid / fifo).", ""]
    for frac in meta["rates"]:
        rows = [r for r in res["rows"] if r["load_frac"] == frac]
        lines += [f"## {frac:g} × C", "", "| variant | req/s | JCT avg s | JCT p99 s | TTFT p99 s | SLO | preemptions "
                  "| JCT vs fifo | SLO vs fifo |", "|---|---|---|---|---|---|---|---|---|"]
        means = {}
        for label in dict.fromkeys(r["variant"] for r in rows):
            means[label] = {k: statistics.fmean(r[k] for r in rows if r["variant"] == label) for k in KEYS}
        fifo = means["fifo"]
        for label, m in means.items():
            lines.append(f"| {label} | {m['throughput_req_s']:.2f} | {m['jct_avg_s']:.2f} | {m['jct_p99_s']:.1f} | "
                         f"{m['ttft_p99_s']:.1f} | {m['slo_attainment']:.3f} | {m['num_preemptions']:.1f} | "
                         f"{fifo['jct_avg_s'] / m['jct_avg_s']:.2f}× | "
                         f"{m['slo_attainment'] / max(fifo['slo_attainment'], 1e-9):.2f}× |")
        lines.append("")
    return "\n".join(lines) + "\n"


def add_study_args(ap: argparse.ArgumentParser, out: str) -> None:
    """The options every drained-replay study takes (this one, sim_preempt.py)."""
    ap.add_argument("--run-json", required=True, help="a bench_serve_gpu result (serve_gpu*.json)")
    ap.add_argument("--steps-csv", required=True, help="its measured steps (serve_gpu*.steps.csv)")
    ap.add_argument("--rates", default="2.4,3.2", help="fractions of the run's FIFO capacity C")
    ap.add_argument("--seeds", default="10,11,12")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out))


def run_study(args, variants, script: str, title: str, pooled_cost: bool = False) -> None:
    """Simulate the variants on the run's workload and write <out>.json / .md; pooled_cost: the cost
    model refitted to the calibration steps and every 4-bit replay instead of the calibration fit."""
    t0 = time.perf_counter()
    run = json.loads(Path(args.run_json).read_text())
    steps = read_steps(args.steps_csv)
    rates = [float(x) for x in args.rates.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    cost, cost_steps = None, "the calibration steps"
    if pooled_cost:
        cost, pooled = pooled_4bit_cost(steps)
        cost_steps = f"the calibration steps and every 4-bit replay ({len(pooled)} steps)"
    rows = simulate(run, steps, rates, seeds, variants, args.window_s, cost)
    m = run["meta"]
    meta = {"commit": args.commit, "run_json": args.run_json, "run_commit": m["git_commit"], "rates": rates,
            "seeds": seeds, "window_s": args.window_s, "num_tasks": m["num_tasks"], "beta": m["beta"],
            "max_num_seqs": m["max_num_seqs"], "length_scale": "×".join(f"{x:g}" for x in m.get("length_scale", (1, 1))),
            "cost_steps": cost_steps, "command": " ".join(["python", f"benchmarks/{script}"] + sys.argv[1:]),
            "wall_s": time.perf_counter() - t0}
    res = {"meta": meta, "rows": rows}
    write_result(args.out, res, report(res, title))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap, "sim_starvation")
    ap.add_argument("--limits", default="5,15,30,0", help="starvation limits in s (0: off)")
    args = ap.parse_args()
    run_study(args, starvation_variants([float(x) for x in args.limits.split(",")]), "sim_starvation.py",
              "Starvation limit under overload, simulated")


if __name__ == "__main__":
    main()
