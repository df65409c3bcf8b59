"""Simulated 4-bit vs fp16 base under one memory budget, with longer requests than the demo trace (CPU).

The 24 GiB GPU run (results/serve_gpu_24gib.*) measured both bases on short requests (~60 prompt +
30 output tokens), where even the fp16 base's small KV cache holds ~100 sequences, so its memory
disadvantage hardly shows. This replays bench_serve_gpu's trace construction with prompt and output
lengths scaled, through the simulator, each base with its own step-cost model (fitted to that run's
measured replay steps of that base: the 4-bit replays, the fp16 replays) and its own KV cache (the
run's block counts). It is a projection to choose the next GPU run, not a measurement:

    .venv/bin/python benchmarks/bench_sim_memory.py --out benchmarks/results/sim_memory

Rates are fractions of the 4-bit fifo engine's simulated burst capacity in each scenario.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sim import git_commit, repo_path  # noqa: E402
from serve_gpu_fit import run_settings, scale_variant  # noqa: E402
from serve_gpu_workload import family_lengths, make_trace, scaled, task_names  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.simulator.cost_model import CostModel  # noqa: E402
from services.engine.simulator.simulator import Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("throughput_req_s", "throughput_tok_s", "latency_avg_s_per_token", "jct_avg_s", "ttft_p99_s",
        "slo_attainment")


def base_models(path: Path) -> dict:
    """{"4-bit"|"fp16": (cost model, KV blocks)} and the run's meta, from a --gpu-gib run with an fp16 section."""
    data = json.loads(path.read_text())
    if not data.get("fp16_meta"):
        raise SystemExit(f"{path}: no fp16 section (run bench_serve_gpu with --sections ...,fp16)")
    with path.with_name(path.stem + ".steps.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if not r["run"].startswith("calib")]
    fp16 = [r for r in rows if "fp16" in r["run"]]
    four = [r for r in rows if "fp16" not in r["run"]]
    meta = data["meta"]
    return meta, {
        "4-bit": (CostModel.fit(four, f"{path.name}: the 4-bit replays' steps"), meta["num_kv_blocks"]),
        "fp16": (CostModel.fit(fp16, f"{path.name}: the fp16 replays' steps"), data["fp16_meta"]["num_kv_blocks"]),
    }


def simulate(variant: str, base: str, models: dict, sched_cfg, sim_cfg, trace) -> dict:
    """One replay of `variant` (a policy, or a bench_sim_scale variant name) on `base`."""
    policy, overrides, _ = scale_variant(variant)
    sched_cfg = dataclasses.replace(sched_cfg, **overrides)
    cost, blocks = models[base]
    cfg = dataclasses.replace(sim_cfg, num_kv_blocks=blocks,
                              max_tokens=max(sim_cfg.max_tokens, max(r.output_tokens for r in trace)))
    return Simulator(POLICIES[policy], sched_cfg, cost, cfg).run(trace).metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", default=str(RESULTS / "serve_gpu_24gib.json"))
    ap.add_argument("--scenarios", default="1x1,1x4,4x1,4x4", help="prompt x output length multipliers")
    ap.add_argument("--rates", default="0.8,1.3", help="fractions of the 4-bit fifo capacity per scenario")
    ap.add_argument("--seeds", default="20,21")
    ap.add_argument("--window-s", type=float, default=20.0)
    ap.add_argument("--variants", default="inlaid,fifo", help="policies or bench_sim_scale variant names, "
                    "each run on both bases")
    ap.add_argument("--out", default=str(RESULTS / "sim_memory"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = Path(args.measured)
    meta, models = base_models(path)
    sched_cfg, sim_cfg = run_settings(meta)
    lengths = family_lengths(ROOT / "data" / "lengths.jsonl")
    tasks = task_names(meta["num_tasks"], list(lengths))
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    variants = [(v, base) for base in ("4-bit", "fp16") for v in names]
    rows = []
    for scen in args.scenarios.split(","):
        px, ox = (float(v) for v in scen.split("x"))
        lens = scaled(lengths, px, ox)
        burst = make_trace(tasks, lens, 1.0, 0.0, 7, burst=3000, zipf_a=meta["zipf_a"], pred_sigma=meta["pred_sigma"])
        capacity = simulate("fifo", "4-bit", models, sched_cfg, sim_cfg, burst)["throughput_req_s"]
        for frac in (float(r) for r in args.rates.split(",")):
            for policy, base in variants:
                runs = [simulate(policy, base, models, sched_cfg, sim_cfg,
                                 make_trace(tasks, lens, frac * capacity, args.window_s, s, zipf_a=meta["zipf_a"],
                                            pred_sigma=meta["pred_sigma"], prefix=f"{scen}-{frac}-"))
                        for s in seeds]
                row = {"scenario": scen, "prompt_x": px, "output_x": ox, "load_frac": frac,
                       "capacity_4bit_fifo_req_s": capacity, "policy": policy, "base": base,
                       **{k: statistics.fmean(r[k] for r in runs) for k in KEYS}}
                rows.append(row)
                print(f"{scen:5s} {frac:.1f} C={capacity:6.1f} {policy:12s} {base:5s} thr {row['throughput_req_s']:7.2f} "
                      f"req/s | JCT {row['jct_avg_s']:6.2f} s | SLO {row['slo_attainment']:.3f}", flush=True)
    result = {"meta": {"benchmark": "bench_sim_memory (simulated; measured step costs of both bases)",
                       "device": "this CPU, simulated; step costs from the GPU run below",
                       "git_commit": git_commit(), "measured": repo_path(path),
                       "gpu_run": meta["git_commit"], "gpu_device": meta["device"],
                       "command": " ".join(["python", "benchmarks/bench_sim_memory.py"] + sys.argv[1:]),
                       "cost_models": {b: m.to_dict() for b, (m, _) in models.items()},
                       "kv_blocks": {b: k for b, (_, k) in models.items()}, "seeds": seeds,
                       "window_s": args.window_s, "wall_s": time.perf_counter() - t0},
              "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(report(result))
    print(f"wrote {out.with_suffix('.md')} in {time.perf_counter() - t0:.0f} s")


def report(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Simulated: 4-bit vs fp16 base in one memory budget, longer requests (commit {m['git_commit']})\n",
             f"Device: {m['device']} ({m['gpu_device']}, commit {m['gpu_run']}, `{m['measured']}`). "
             f"Command: `{m['command']}` ({m['wall_s']:.0f} s). Nothing here ran on a GPU: each base's step "
             "times come from a least-squares fit to its own measured replay steps in that run, and its KV cache "
             f"is that run's: {m['kv_blocks']['4-bit']} blocks (4-bit) and {m['kv_blocks']['fp16']} (fp16) of 16 "
             "tokens. Scenario PxO = prompt lengths ×P and output lengths ×O of the demo trace (≈ 60 + 30 tokens "
             f"at 1x1). Rates are fractions of the simulated 4-bit fifo burst capacity C of each scenario; "
             f"{m['window_s']:.0f} s of arrivals, mean of seeds {m['seeds']}.\n"]
    for base, cm in m["cost_models"].items():
        lines.append(f"- {base}: {cm['source']}: t = {cm['a_s'] * 1e3:.2f} ms + "
                     f"{cm['b_s_per_prefill_token'] * 1e6:.1f} µs/prompt token + "
                     f"{cm['c_s_per_decode_seq'] * 1e6:.1f} µs/decode row + {cm['d_s_per_adapter'] * 1e6:.0f} µs/adapter"
                     f" + {cm['g_s_per_prefill_step'] * 1e3:.2f} ms per prefill step")
    lines += ["", "| scenario | load | C req/s | policy | base | req/s | tok/s | latency s/tok | JCT s | TTFT p99 s | SLO |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['scenario']} | {r['load_frac']:.1f} | {r['capacity_4bit_fifo_req_s']:.1f} | {r['policy']} | "
                     f"{r['base']} | {r['throughput_req_s']:.2f} | {r['throughput_tok_s']:.0f} | "
                     f"{r['latency_avg_s_per_token']:.4f} | {r['jct_avg_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                     f"{r['slo_attainment']:.3f} |")
    lines += ["", "## inlaid on 4-bit against fifo on fp16 (S-LoRA's configuration)", "",
              "| scenario | load | variant | throughput | JCT lower | latency lower | SLO |", "|---|---|---|---|---|---|---|"]
    by = {(r["scenario"], r["load_frac"], r["policy"], r["base"]): r for r in res["rows"]}
    for (scen, frac, policy, base), r in by.items():
        if not policy.startswith("inlaid") or base != "4-bit" or (scen, frac, "fifo", "fp16") not in by:
            continue
        f = by[(scen, frac, "fifo", "fp16")]
        slo = f"{r['slo_attainment'] / f['slo_attainment']:.2f}×" if f["slo_attainment"] else "∞"
        lines.append(f"| {scen} | {frac:.1f} | {policy} | {r['throughput_req_s'] / f['throughput_req_s']:.2f}× | "
                     f"{f['jct_avg_s'] / r['jct_avg_s']:.2f}× | "
                     f"{f['latency_avg_s_per_token'] / r['latency_avg_s_per_token']:.2f}× | {slo} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
