"""Where inlaid misses its SLOs under overload, simulated on one GPU run's measured steps.

Replays the run's workload (sim_vs_fp16's RunWorkload: same generator, lengths, rates, solo-latency
fit) on a few seeds with inlaid on the 4-bit engine and fifo on fp16, and breaks SLO attainment down
by output length: each bucket's deadline (slo_scale x the solo latency), its mean wait for the first
token and its mean decode pace (seconds per output token after the first), so a miss can be told
apart as queueing or as decoding in too large a pool. Then it sweeps a fixed cap on inlaid's running
pool (max_num_seqs) against the run's own, ratios against fifo on fp16 as in sim_vs_fp16. Writes
<out>.json and <out>.md. CPU only.

  python benchmarks/sim_slo_breakdown.py \\
      --run-json benchmarks/results/serve_gpu_24gib_long_drain30_tokens_kvfp8_default_92d7531.json \\
      --steps-csv benchmarks/results/serve_gpu_24gib_long_drain30_tokens_kvfp8_default_92d7531.steps.csv
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
from serve_gpu_ratios import HEADLINE, geomean, ratios  # noqa: E402
from serve_gpu_workload import LOAD_UNITS  # noqa: E402
from sim_vs_fp16 import RunWorkload, engines  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.simulator.metrics import summarize  # noqa: E402
from services.engine.simulator.simulator import Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = ((1, 16), (16, 64), (64, 128), (128, 256), (256, 100000))


def records(workload: RunWorkload, policy: str, sched, cost, sim_cfg, trace: list) -> tuple[list, list]:
    """(request records with the run's solo latency, step records) of one drained simulated replay."""
    res = Simulator(POLICIES[policy], sched, cost, sim_cfg).run(trace)
    return ([dataclasses.replace(r, solo_latency_s=workload.solo_s(r.num_prompt_tokens, r.num_output_tokens))
             for r in res.requests], res.steps)


def buckets(recs: list, slo_scale: float) -> list[dict]:
    """Per output-length bucket: count, SLO attainment, mean deadline, wait for the first token, decode pace."""
    rows = []
    for lo, hi in BUCKETS:
        b = [r for r in recs if lo <= r.num_output_tokens < hi]
        if not b:
            continue
        pace = [(r.finished_s - r.first_token_s) / (r.num_output_tokens - 1) for r in b if r.num_output_tokens > 1]
        rows.append({"tokens": f"{lo}-{hi - 1}" if hi < 100000 else f"{lo}+", "requests": len(b),
                     "slo": sum(r.jct_s <= slo_scale * r.solo_latency_s for r in b) / len(b),
                     "deadline_s": statistics.mean(slo_scale * r.solo_latency_s for r in b),
                     "ttft_s": statistics.mean(r.ttft_s for r in b), "jct_s": statistics.mean(r.jct_s for r in b),
                     "decode_s_per_token": statistics.mean(pace) if pace else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-json", required=True, help="a bench_serve_gpu result with an fp16 section")
    ap.add_argument("--steps-csv", required=True, help="its measured steps (serve_gpu*.steps.csv)")
    ap.add_argument("--rate", type=float, default=3.2, help="a fraction of the run's FIFO capacity C")
    ap.add_argument("--seeds", type=int, default=6, help="traces (seeds 100, 101, ...)")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--load-unit", choices=LOAD_UNITS, default="tokens")
    ap.add_argument("--caps", default="64,48,32", help="inlaid's max_num_seqs to sweep (the run's own comes first)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sim_slo_breakdown"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = json.loads(Path(args.run_json).read_text())
    eng = engines(run, read_steps(args.steps_csv))
    workload = RunWorkload.of(run)
    slo_scale = run["meta"]["slo_scale"]
    traces = [workload.trace(args.rate, seed, args.window_s, args.load_unit)[1]
              for seed in range(100, 100 + args.seeds)]
    fifo16 = [records(workload, "fifo", eng["sched"], *eng["fp16"], t) for t in traces]
    inlaid = [records(workload, "inlaid", eng["sched"], *eng["4-bit"], t) for t in traces]
    breakdown = {"inlaid, 4-bit": buckets([r for recs, _ in inlaid for r in recs], slo_scale),
                 "fifo, fp16": buckets([r for recs, _ in fifo16 for r in recs], slo_scale)}
    base = [summarize(recs, steps, slo_scale) for recs, steps in fifo16]
    caps = [eng["sched"].max_num_seqs] + [int(c) for c in args.caps.split(",") if c]
    sweep = []
    for cap in caps:
        sched = dataclasses.replace(eng["sched"], max_num_seqs=cap)
        ms = [summarize(*records(workload, "inlaid", sched, *eng["4-bit"], t), slo_scale) for t in traces]
        # every request finishes (drained), so attainment over the trace is the benchmark's "_all"
        rs = [ratios({**m, "slo_attainment_all": m["slo_attainment"]}, {**b, "slo_attainment_all": b["slo_attainment"]})
              for m, b in zip(ms, base)]
        sweep.append({"max_num_seqs": cap, **{k: geomean([r[k] for r in rs]) for k, _ in HEADLINE},
                      "inlaid_slo": statistics.mean(m["slo_attainment"] for m in ms)})
        print(f"max_num_seqs {cap}: " + ", ".join(f"{k} {v:.2f}" for k, v in sweep[-1].items() if k != "max_num_seqs"),
              flush=True)
    m = run["meta"]
    meta = {"commit": args.commit, "run_json": args.run_json, "run_commit": m["git_commit"],
            "run_device": m.get("device", "GPU"), "rate": args.rate, "seeds": args.seeds, "slo_scale": slo_scale,
            "load_unit": args.load_unit, "command": " ".join(["python", "benchmarks/sim_slo_breakdown.py"] + sys.argv[1:]),
            "wall_s": time.perf_counter() - t0}
    res = {"meta": meta, "breakdown": breakdown, "cap_sweep": sweep}
    write_result(args.out, res, report(res))


def report(res: dict) -> str:
    meta = res["meta"]
    lines = [f"# Where inlaid misses its SLOs, simulated (commit {meta['commit']})", "",
             f"Device: this CPU, simulated; step times from cost models fitted to the steps of `{meta['run_json']}` "
             f"({meta['run_device']}, commit {meta['run_commit']}); nothing here ran on a GPU. Command: "
             f"`{meta['command']}` ({meta['wall_s']:.0f} s). {meta['rate']:g} × C, load in {meta['load_unit']}, "
             f"seeds 100–{99 + meta['seeds']}, drained; SLO: JCT ≤ {meta['slo_scale']:g} × the run's solo-latency fit.",
             "", "## SLO attainment by output length (all seeds pooled)", "",
             "Deadline: the SLO's bound on JCT; wait: time to the first token; pace: seconds per output token "
             "after the first.", "",
             "| engine | output tokens | requests | SLO | deadline s | wait s | JCT s | pace ms/token |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rows in res["breakdown"].items():
        for r in rows:
            pace = "–" if r["decode_s_per_token"] is None else f"{1e3 * r['decode_s_per_token']:.1f}"
            lines.append(f"| {label} | {r['tokens']} | {r['requests']} | {r['slo']:.2f} | {r['deadline_s']:.2f} | "
                         f"{r['ttft_s']:.2f} | {r['jct_s']:.2f} | {pace} |")
    lines += ["", "## A fixed cap on inlaid's running pool", "",
              "Inlaid on 4 bits with max_num_seqs capped (the first row: the run's own), ratios against fifo on "
              "fp16 on the same seeds (geometric means, > 1: inlaid better).", "",
              "| max_num_seqs | throughput × | avg latency × | JCT × | SLO × | inlaid's SLO attainment |",
              "|---|---|---|---|---|---|"]
    for r in res["cap_sweep"]:
        lines.append(f"| {r['max_num_seqs']} | {r['throughput']:.2f} | {r['avg_latency']:.2f} | {r['jct']:.2f} | "
                     f"{r['slo']:.2f} | {r['inlaid_slo']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
