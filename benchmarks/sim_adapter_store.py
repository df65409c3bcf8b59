"""Task-count scaling with the adapter store on the simulator's clock (slot loads, host packs, the
background packer), replaying a GPU run's scale section on its fitted cost model.

The fitted cost model prices adapters only through a per-adapter term fitted at ≤ 32 tasks, so the
simulator put the 1000-task replay of serve_gpu_24gib_scale256_d2add64 at 119 req/s where the
engine served 86. This reruns that run's scale traces (same generator, rate, window, seed) with
services/engine/simulator/adapter_store.py: slot loads at the run's measured copy time, host packs
made in the step at --pack-ms each unless the background packer (--prefetch) made them first.
Writes <out>.json and <out>.md. CPU only.

  python benchmarks/sim_adapter_store.py --run benchmarks/results/serve_gpu_24gib_scale256_d2add64
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
from serve_gpu_fit import replay_setup  # noqa: E402
from serve_gpu_workload import make_trace, task_names  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.simulator.adapter_store import AdapterStoreConfig  # noqa: E402
from services.engine.simulator.simulator import Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def simulate(run: dict, steps: list[dict], counts: list[int], pack_ms: list[float], prefetch: list[int],
             host_packs: int) -> list[dict]:
    meta = run["meta"]
    cost, sched, sim_cfg, lengths = replay_setup(run, steps)
    families = list(lengths)
    real = {r["num_tasks"]: r for r in run["scale"]["real"] if r["policy"] == "inlaid"}
    load_s = run["scale"]["slot_load"]["done_ms_median"] / 1e3
    rows = []
    for count in counts:
        rate = real[count]["rate_req_s"]
        trace = make_trace(task_names(count, families), lengths, rate, meta["scale_window_s"], 20, zipf_a=meta["zipf_a"],
                           pred_sigma=meta["pred_sigma"], prefix=f"s{count}-", pooled=True)
        variants = [("no adapter store (the fitted model only)", None)] + [
            (f"store, pack {p:g} ms, prefetch {pf}",
             AdapterStoreConfig(meta["adapter_slots"], host_packs, load_s, p / 1e3, pf))
            for p in pack_ms for pf in prefetch]
        for label, store in variants:
            sim = Simulator(POLICIES["inlaid"], sched, cost, dataclasses.replace(sim_cfg, adapter_store=store))
            m = sim.run(trace).metrics
            st = sim.adapter_store
            rows.append({"num_tasks": count, "variant": label, "throughput_req_s": m["throughput_req_s"],
                         "jct_avg_s": m["jct_avg_s"], "loads": st.num_loads if st else None,
                         "packs_in_step": st.num_packs_in_step if st else None,
                         "packs_in_background": st.num_packs_in_background if st else None,
                         "real_throughput_req_s": real[count]["throughput_req_s"],
                         "real_loads": real[count].get("adapter_loads"),
                         "real_unfinished": real[count]["num_unfinished"]})
            print(f"{count:5d} tasks {label:40s} {m['throughput_req_s']:7.1f} req/s (real "
                  f"{real[count]['throughput_req_s']:.1f})", flush=True)
    return rows


def report(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Task scaling with the adapter store simulated (commit {m['commit']})", "",
             f"Device: this CPU, simulated on the cost model fitted to the calibration steps of `{m['run']}` (H100, "
             f"commit {m['run_commit']}); nothing here ran on a GPU. Command: `{m['command']}` ({m['wall_s']:.0f} s).",
             "", f"The run's scale traces (inlaid, {m['rate']:.1f} req/s, {m['window_s']:g} s of arrivals; the real replay "
             f"was cut {m['drain_s']:g} s later, the simulator runs to the last request). Store: {m['slots']} device "
             f"slots, {m['host_packs']} host packs, slot load {m['load_ms']:.2f} ms (the run's measured copy); "
             "the pack time on the GPU host was not measured (this 2-core CPU: 8.5–11.4 ms per 33.5 MB row, "
             "lora_prefetch_cpu.md), hence several.", "",
             "| tasks | variant | sim req/s | real req/s | sim loads | real loads | packs in the step | "
             "packs in the background | sim JCT s |", "|---|---|---|---|---|---|---|---|---|"]
    reading = []
    for count in dict.fromkeys(r["num_tasks"] for r in res["rows"]):
        sims = [r for r in res["rows"] if r["num_tasks"] == count and r["loads"] is not None]
        real_loads = sims[0]["real_loads"] if sims else None
        if real_loads:
            lo, hi = min(r["loads"] for r in sims) / real_loads, max(r["loads"] for r in sims) / real_loads
            reading.append(f"{count} tasks: the simulated store loads {lo:.1f}–{hi:.1f}× the adapters the engine loaded")
    if reading:
        lines[-2:-2] = ["Reading: " + "; ".join(reading) + ". Where that ratio is far from 1 the per-load costs are not "
                        "calibrated (the simulated steps, batches and task mix differ from the engine's), so read the "
                        "prefetch columns as a direction, not a forecast.", ""]
    for r in res["rows"]:
        dash = "–"
        lines.append(f"| {r['num_tasks']} | {r['variant']} | {r['throughput_req_s']:.1f} | "
                     f"{r['real_throughput_req_s']:.1f} | {r['loads'] if r['loads'] is not None else dash} | "
                     f"{r['real_loads']} | {r['packs_in_step'] if r['packs_in_step'] is not None else dash} | "
                     f"{r['packs_in_background'] if r['packs_in_background'] is not None else dash} | "
                     f"{r['jct_avg_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a bench_serve_gpu result stem with a scale section (.json, .steps.csv)")
    ap.add_argument("--counts", default="100,1000")
    ap.add_argument("--pack-ms", default="5,10,20")
    ap.add_argument("--prefetch", default="0,8,32")
    ap.add_argument("--host-packs", type=int, default=128, help="the engine's default: 4 GiB of 33.5 MB frames")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sim_adapter_store"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = json.loads(Path(f"{args.run}.json").read_text())
    steps = read_steps(f"{args.run}.steps.csv")
    rows = simulate(run, steps, [int(x) for x in args.counts.split(",")], [float(x) for x in args.pack_ms.split(",")],
                    [int(x) for x in args.prefetch.split(",")], args.host_packs)
    m = run["meta"]
    real = next(r for r in run["scale"]["real"] if r["policy"] == "inlaid")
    meta = {"commit": args.commit, "run": args.run, "run_commit": m["git_commit"], "rate": real["rate_req_s"],
            "window_s": m["scale_window_s"], "drain_s": m.get("drain_s", 0), "slots": m["adapter_slots"],
            "host_packs": args.host_packs, "load_ms": run["scale"]["slot_load"]["done_ms_median"],
            "command": " ".join(["python", "benchmarks/sim_adapter_store.py"] + sys.argv[1:]),
            "wall_s": time.perf_counter() - t0}
    res = {"meta": meta, "rows": rows}
    write_result(args.out, res, report(res))


if __name__ == "__main__":
    main()
