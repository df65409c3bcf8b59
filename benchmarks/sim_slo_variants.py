"""Inlaid policy variants aimed at SLO attainment, simulated on one GPU run's measured steps.

Replays the run's workload on many seeds, drained, as sim_vs_fp16.py does (the 4-bit engine's cost
model refitted to the run's steps, SLO judged against the run's measured solo-latency fit), with
inlaid as configured, each variant, and fifo for reference. Variants:
  - missed-last: a waiting request whose SLO deadline (arrival + slo_scale x the solo fit of its prompt
    and predicted output) has passed ranks after every waiting request that can still meet its own;
  - missed-cap=N: missed-last, and while N or more run, no waiting request past its deadline is admitted;
  - streak2: a decode streak of 2 instead of 4 (prefills twice as often);
  - any SchedulerConfig field as name=value (e.g. inlaid_overload_min_free=0).
Writes <out>.json and <out>.md. CPU only.

  python benchmarks/sim_slo_variants.py --run serve_gpu_24gib_long_drain30_repeat_285f137 --load-unit tokens
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
from serve_gpu_ratios import geomean  # noqa: E402
from serve_gpu_workload import LOAD_UNITS  # noqa: E402
from sim_vs_fp16 import RunWorkload, engines  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.policies.inlaid import InlaidScheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MISSED_PENALTY = 10 ** 6    # added to a missed request's SRTF key: after every request still on time


def deadline_of(solo_s, slo_scale: float):
    """A waiting request's SLO deadline: arrival + slo_scale x the solo fit of its prompt and predicted output."""
    return lambda seq: seq.arrival_s + slo_scale * solo_s(seq.num_prompt_tokens, seq.predicted_output_tokens or 1)


def missed_last(solo_s, slo_scale: float) -> type:
    """InlaidScheduler that ranks waiting requests past their SLO deadline after all others."""
    deadline = deadline_of(solo_s, slo_scale)

    class MissedLast(InlaidScheduler):
        def _prefill(self, now_s: float, decode_rows: int):
            for seq in self.waiting:
                state = seq.sched_state
                if state.get("missed"):
                    continue
                if now_s > deadline(seq):
                    state["missed"] = True
                    state["waiting_remaining"] = seq.predicted_remaining_tokens + MISSED_PENALTY
            return super()._prefill(now_s, decode_rows)

    return MissedLast


def missed_capped(solo_s, slo_scale: float, cap: int) -> type:
    """missed_last, and while `cap` or more requests run, a waiting request past its deadline is not
    admitted at all (it waits for the running set to shrink below the cap): under deep overload the
    requests that can still meet their SLO then run in smaller, faster steps, while at lighter load,
    where few have missed, the running set still grows as before."""
    base = missed_last(solo_s, slo_scale)
    deadline = deadline_of(solo_s, slo_scale)

    class MissedCapped(base):
        def _prefill(self, now_s: float, decode_rows: int):
            super_prefill = super()._prefill
            held = [s for s in self.waiting if now_s > deadline(s)] if len(self.running) >= cap else []
            if not held:
                return super_prefill(now_s, decode_rows)
            ids = {id(s) for s in held}
            self.waiting = [s for s in self.waiting if id(s) not in ids]
            try:
                return super_prefill(now_s, decode_rows)
            finally:
                self.waiting = self.waiting + held

    return MissedCapped


def variant(name: str, sched, solo_s, slo_scale: float):
    """(policy class, SchedulerConfig) of a variant name."""
    if name == "missed-last":
        return missed_last(solo_s, slo_scale), sched
    if name.startswith("missed-cap="):
        return missed_capped(solo_s, slo_scale, int(name.split("=")[1])), sched
    if name == "streak2":
        return POLICIES["inlaid"], dataclasses.replace(sched, max_decode_streak=2)
    field, _, value = name.partition("=")
    if not value or not hasattr(sched, field):
        raise SystemExit(f"unknown variant {name!r}: missed-last, streak2 or a SchedulerConfig field=value")
    return POLICIES["inlaid"], dataclasses.replace(sched, **{field: type(getattr(sched, field))(value)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="stem of a bench_serve_gpu result in benchmarks/results "
                                                 "(its .json with an fp16 section and its .steps.csv)")
    ap.add_argument("--variants", default="missed-last,streak2")
    ap.add_argument("--rate", type=float, default=3.2, help="fraction of the run's C")
    ap.add_argument("--load-unit", choices=LOAD_UNITS, default="tokens")
    ap.add_argument("--seeds", type=int, default=20, help="traces (seeds 100, 101, ...)")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(RESULTS / "sim_slo_variants"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = json.loads((RESULTS / f"{args.run}.json").read_text())
    eng = engines(run, read_steps(RESULTS / f"{args.run}.steps.csv"))
    meta = run["meta"]
    slo_scale = meta["slo_scale"]
    workload = RunWorkload.of(run)
    policies = {"inlaid": (POLICIES["inlaid"], eng["sched"]), "fifo": (POLICIES["fifo"], eng["sched"])}
    for name in args.variants.split(","):
        policies[f"inlaid, {name}"] = variant(name, eng["sched"], workload.solo_s, slo_scale)
    rows = []
    for seed in range(100, 100 + args.seeds):
        _, trace = workload.trace(args.rate, seed, args.window_s, args.load_unit)
        row = {"seed": seed, "requests": len(trace)}
        for label, (cls, sched) in policies.items():
            m = workload.replay(cls, sched, *eng["4-bit"], trace)
            row[label] = {"slo_attainment": m["slo_attainment"], "jct_avg_s": m["jct_avg_s"],
                          "throughput_req_s": m["throughput_req_s"]}
        rows.append(row)
        print(f"seed {seed}: " + " | ".join(f"{k} SLO {row[k]['slo_attainment']:.3f} JCT {row[k]['jct_avg_s']:.2f}"
                                          for k in policies), flush=True)
    res = {"meta": {"commit": args.commit, "run": args.run, "run_commit": meta["git_commit"], "rate": args.rate,
                    "load_unit": args.load_unit, "seeds": args.seeds, "window_s": args.window_s,
                    "command": " ".join(["python", "benchmarks/sim_slo_variants.py"] + sys.argv[1:]),
                    "wall_s": time.perf_counter() - t0},
           "rows": rows}
    lines = [f"# Inlaid variants for SLO attainment, simulated (commit {args.commit})", "",
             f"Device: this CPU, simulated on the 4-bit cost model refitted to `{args.run}` (commit "
             f"{meta['git_commit']}); nothing here ran on a GPU. Command: `{res['meta']['command']}` "
             f"({res['meta']['wall_s']:.0f} s). {args.seeds} traces (seeds 100–{99 + args.seeds}) of "
             f"{args.window_s:g} s at {args.rate:g} × C, load in {args.load_unit}, drained; SLO: JCT ≤ "
             f"{slo_scale:g} × the run's solo fit.", "",
             "| policy | SLO attainment, geo. mean | min | max | JCT s, geo. mean | throughput req/s, geo. mean |",
             "|---|---|---|---|---|---|"]
    for label in policies:
        slo = [r[label]["slo_attainment"] for r in rows]
        lines.append(f"| {label} | {geomean(slo):.3f} | {min(slo):.3f} | {max(slo):.3f} | "
                     f"{geomean([r[label]['jct_avg_s'] for r in rows]):.2f} | "
                     f"{geomean([r[label]['throughput_req_s'] for r in rows]):.2f} |")
    write_result(args.out, res, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
