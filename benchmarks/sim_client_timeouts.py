"""Clients that give up: goodput when every request is cancelled at a deadline, with and without the
policy knowing the deadlines, simulated on one GPU run's measured steps.

The gateway cancels a request at its client's gRPC deadline and passes that deadline to the engine,
where the inlaid policy ranks a waiting request that can no longer finish by it after those that can
(InlaidScheduler.is_late). This replays a bench_serve_gpu run's workload (sim_vs_fp16's cost models
and traces) with every client giving up T seconds after arrival (SimConfig.client_timeout_s) and
compares, on the same traces: inlaid told the deadlines, inlaid not told them (the same
cancellations), and fifo on the same 4-bit engine. Goodput is the fraction of requests that finish
before their client gives up; wasted is the share of computed output tokens spent on requests that
were then cancelled. Writes <out>.json and <out>.md. CPU only.

  python benchmarks/sim_client_timeouts.py \\
      --run benchmarks/results/serve_gpu_24gib_long_drain30_tokens_kvfp8_default_92d7531:tokens --timeouts 2,5,10
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

from results_io import read_steps, write_result  # noqa: E402
from sim_inlaid_grid import parse_run  # noqa: E402
from sim_vs_fp16 import RunWorkload, engines  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.simulator.simulator import Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (label, policy, the policy is told the deadlines)
ARMS = (("inlaid, told the deadlines", "inlaid", True), ("inlaid, not told", "inlaid", False),
        ("fifo", "fifo", True))


def replay(policy: str, told: bool, timeout_s: float, eng: dict, trace: list) -> dict:
    """Goodput, wasted work and the finished requests' mean JCT of one replay with client timeouts."""
    cost, sim = eng["4-bit"]
    sim = dataclasses.replace(sim, client_timeout_s=timeout_s, deadline_to_policy=told)
    res = Simulator(POLICIES[policy], eng["sched"], cost, sim).run(trace)
    done_tokens = sum(r.num_output_tokens for r in res.requests)
    lost_tokens = sum(n for _, n in res.cancelled)
    return {"goodput": len(res.requests) / len(trace), "cancelled": len(res.cancelled),
            "wasted": lost_tokens / max(1, done_tokens + lost_tokens),
            "jct_avg_s": res.metrics.get("jct_avg_s", float("nan"))}


def simulate(stem: str, unit: str, fracs: list[float], timeouts: list[float], seeds: list[int],
             window_s: float) -> dict:
    run = json.loads(Path(stem + ".json").read_text())
    eng = engines(run, read_steps(stem + ".steps.csv"))
    workload = RunWorkload.of(run)
    rows = []
    for frac in fracs:
        traces = [workload.trace(frac, seed, window_s, unit)[1] for seed in seeds]
        for timeout_s in timeouts:
            row = {"load_frac": frac, "timeout_s": timeout_s, "requests": sum(len(t) for t in traces)}
            for label, policy, told in ARMS:
                per_seed = [replay(policy, told, timeout_s, eng, trace) for trace in traces]
                row[label] = {k: statistics.fmean(m[k] for m in per_seed) for k in per_seed[0]}
                row[label]["goodput_per_seed"] = [m["goodput"] for m in per_seed]
            rows.append(row)
            print(f"{frac:g} x C, timeout {timeout_s:g} s: " + " | ".join(
                f"{label} goodput {row[label]['goodput']:.3f} wasted {row[label]['wasted']:.3f}"
                for label, _, _ in ARMS), flush=True)
    return {"stem": stem, "load_unit": unit, "run_commit": run["meta"]["git_commit"],
            "run_device": run["meta"].get("device", "GPU"), "capacity": run["calibration"]["fifo_capacity_req_s"],
            "rows": rows}


def report(res: dict) -> str:
    meta, r = res["meta"], res["run"]
    told, blind, fifo = (label for label, _, _ in ARMS)
    lines = [f"# Clients that give up: goodput with and without deadline-aware ranking, simulated (commit "
             f"{meta['commit']})", "",
             f"Device: this CPU, simulated; step times from cost models fitted to the steps of `{r['stem']}.json` "
             f"({r['run_device']}, commit {r['run_commit']}); nothing here ran on a GPU. Command: "
             f"`{meta['command']}` ({meta['wall_s']:.0f} s).", "",
             f"Workload: that run's generator, {meta['window_s']:g} s of Poisson arrivals at each rate (fractions of "
             f"its C = {r['capacity']:.1f} req/s, load in {r['load_unit']}), seeds {meta['seeds'][0]}–"
             f"{meta['seeds'][-1]} ({len(meta['seeds'])}), on the 4-bit engine (its KV cache and cost model). Every "
             "client gives up the timeout after its request arrives; a request not finished by then is cancelled "
             "(its computed tokens are wasted). Goodput: requests finished before their client gave up, over all "
             "requests; wasted: output tokens computed for requests later cancelled, over all output tokens "
             "computed; means over the seeds. \"Told\" is the engine's behaviour (the gateway passes each client's "
             "deadline on); \"not told\" replays the same cancellations with inlaid ranking blind to them.", "",
             f"| load | timeout s | goodput: {told} | {blind} | {fifo} | told / not told | told / fifo "
             f"| wasted: told | not told | fifo | finished JCT s: told | not told |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        a, b, c = row[told], row[blind], row[fifo]
        lines.append(f"| {row['load_frac']:g} × C | {row['timeout_s']:g} | {a['goodput']:.3f} | {b['goodput']:.3f} | "
                     f"{c['goodput']:.3f} | {a['goodput'] / b['goodput']:.2f} | {a['goodput'] / c['goodput']:.2f} | "
                     f"{a['wasted']:.3f} | {b['wasted']:.3f} | {c['wasted']:.3f} | {a['jct_avg_s']:.2f} | "
                     f"{b['jct_avg_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="STEM[:requests|tokens]: a bench_serve_gpu run (STEM.json, STEM.steps.csv)")
    ap.add_argument("--rates", default="1.6,3.2", help="fractions of the run's FIFO capacity C")
    ap.add_argument("--timeouts", default="2,5,10", help="seconds each client waits")
    ap.add_argument("--seeds", type=int, default=10, help="traces per rate (seeds 100, 101, ...)")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sim_client_timeouts"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    stem, unit = parse_run(args.run)
    try:
        fracs = [float(x) for x in args.rates.split(",")]
        timeouts = [float(x) for x in args.timeouts.split(",")]
    except ValueError:
        raise SystemExit("--rates and --timeouts take comma-separated numbers") from None
    if any(t <= 0 for t in timeouts) or any(f <= 0 for f in fracs):
        raise SystemExit("--rates and --timeouts must be > 0")
    seeds = list(range(100, 100 + args.seeds))
    run = simulate(stem, unit, fracs, timeouts, seeds, args.window_s)
    meta = {"commit": args.commit, "seeds": seeds, "window_s": args.window_s,
            "command": " ".join(["python", "benchmarks/sim_client_timeouts.py"] + sys.argv[1:]),
            "wall_s": time.perf_counter() - t0}
    res = {"meta": meta, "run": run, "rows": run["rows"]}
    write_result(args.out, res, report(res))


if __name__ == "__main__":
    main()
