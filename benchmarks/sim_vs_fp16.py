"""Inlaid on the 4-bit base against fifo on 4 bits and on fp16 (S-LoRA's configuration) over many
traces, simulated on one GPU run's measured steps.

A drained GPU run has one replay per cell, and four runs of one command spread as widely as the gaps
to issue 7's targets (docs/results.md, Scheduling margins). This replays the run's own workload
(same generator, lengths and rates) on many seeds, drained: inlaid and fifo on the 4-bit engine
(cost model refitted to the calibration steps and every 4-bit replay, the run's KV cache) and fifo on
the fp16 engine (a cost model fitted to the run's fp16 replays, the fp16 KV cache), every replay's
SLO judged against the run's measured solo-latency fit as the benchmark does. It reports each target
per seed: the geometric mean of the ratios and on how many seeds it is met. The fp16 model is fitted
to fifo's fp16 steps and checked on inlaid's (the report gives both errors). Writes <out>.json and
<out>.md. CPU only.

  python benchmarks/sim_vs_fp16.py --run-json benchmarks/results/serve_gpu_24gib_long_drain30_fixed_d5b34b3.json \\
      --steps-csv benchmarks/results/serve_gpu_24gib_long_drain30_fixed_d5b34b3.steps.csv
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
from serve_gpu_fit import fit_cost, fit_error, pooled_4bit_cost, run_lengths, run_settings  # noqa: E402
from serve_gpu_ratios import HEADLINE, TARGETS, geomean, ratios  # noqa: E402
from serve_gpu_workload import LOAD_UNITS, make_trace, task_names, trace_rate  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.simulator.metrics import summarize  # noqa: E402
from services.engine.simulator.simulator import Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def engines(run: dict, steps: list[dict], prefill_cut_ms: float = 0.0, kv_speedup: float = 1.0,
            kv_speedup_4bit: float = 1.0) -> dict:
    """{"4-bit" | "fp16": (cost model, SimConfig)} and the fits' errors, from the run's steps;
    what-ifs: prefill_cut_ms lowers the 4-bit model's fixed price of a step with a prefill by this;
    kv_speedup divides both models' price of a cached token read (the same attention kernel serves both);
    kv_speedup_4bit divides the 4-bit model's alone (an fp8 cache there, the KV cache's blocks unchanged)."""
    sched, sim4 = run_settings(run["meta"])
    fifo16 = [r for r in steps if r["run"] == "fifo, fp16 base"]
    other16 = [r for r in steps if "fp16" in r["run"] and r["run"] != "fifo, fp16 base"]
    if not fifo16:
        raise SystemExit("the run has no 'fifo, fp16 base' steps: run bench_serve_gpu with its fp16 section")
    cost4, four = pooled_4bit_cost(steps)
    if prefill_cut_ms:
        g = max(0.0, cost4.g_s_per_prefill_step - prefill_cut_ms / 1e3)
        cost4 = dataclasses.replace(cost4, g_s_per_prefill_step=g,
                                    source=f"{cost4.source}, prefill-step price cut by {prefill_cut_ms:g} ms")
    cost16 = fit_cost(fifo16, "fifo's fp16 replay steps")
    errors4, errors16 = fit_error(cost4, four), fit_error(cost16, fifo16)
    if kv_speedup != 1.0:
        cost4, cost16 = (dataclasses.replace(c, e_s_per_kv_token=c.e_s_per_kv_token / kv_speedup,
                                             source=f"{c.source}, KV-token read price / {kv_speedup:g}")
                         for c in (cost4, cost16))
    if kv_speedup_4bit != 1.0:
        cost4 = dataclasses.replace(cost4, e_s_per_kv_token=cost4.e_s_per_kv_token / kv_speedup_4bit,
                                    source=f"{cost4.source}, KV-token read price / {kv_speedup_4bit:g} (4-bit only)")
    sim16 = dataclasses.replace(sim4, num_kv_blocks=run["fp16_meta"]["num_kv_blocks"])
    errors = {"4-bit, own steps": errors4, "fp16, fifo's steps (fitted)": errors16,
              "fp16, inlaid's steps (held out)": fit_error(cost16, other16) if kv_speedup == 1.0 else None}
    return {"sched": sched, "4-bit": (cost4, sim4), "fp16": (cost16, sim16), "errors": errors}


@dataclasses.dataclass(frozen=True)
class RunWorkload:
    """A GPU run's workload as bench_serve_gpu drew it (tasks, per-family lengths, C, Zipf, predictor
    noise) and its measured solo-latency fit, to replay on new seeds in the simulator."""
    tasks: list[str]
    lengths: dict
    capacity: float
    zipf_a: float
    pred_sigma: float
    burst_seed: int      # bench_serve_gpu's capacity burst: the reference mix of a load in tokens
    solo_fit: dict

    @classmethod
    def of(cls, run: dict) -> RunWorkload:
        meta = run["meta"]
        lengths = run_lengths(meta)
        return cls(task_names(meta["num_tasks"], list(lengths)), lengths, run["calibration"]["fifo_capacity_req_s"],
                   meta["zipf_a"], meta["pred_sigma"], meta.get("seed", 0) + 1, run["calibration"]["solo"]["fit"])

    def solo_s(self, prompt_tokens: int, output_tokens: int) -> float:
        """A request's latency served alone, from the run's fit."""
        f = self.solo_fit
        return f["intercept_s"] + f["s_per_prompt_token"] * prompt_tokens + f["s_per_output_token"] * output_tokens

    def trace(self, frac: float, seed: int, window_s: float, load_unit: str) -> tuple[float, list]:
        """(request rate, trace) of seed at frac × C (load_unit as serve_gpu_workload.trace_rate)."""
        rate = trace_rate(frac * self.capacity, load_unit, self.tasks, self.lengths, seed, self.burst_seed,
                          self.zipf_a)
        return rate, make_trace(self.tasks, self.lengths, rate, window_s, seed, zipf_a=self.zipf_a,
                                pred_sigma=self.pred_sigma, prefix=f"v{seed}-")

    def replay(self, policy, sched, cost, sim_cfg, trace: list) -> dict:
        """summarize() of one drained simulated replay, SLO judged against the run's solo fit."""
        res = Simulator(policy, sched, cost, sim_cfg).run(trace)
        records = [dataclasses.replace(r, solo_latency_s=self.solo_s(r.num_prompt_tokens, r.num_output_tokens))
                   for r in res.requests]
        return summarize(records, res.steps, sim_cfg.slo_scale)


def headline_metrics(m: dict) -> dict:
    """The four target metrics of a drained replay's summarize() (every request finishes, so
    attainment over the trace is the benchmark's "_all")."""
    return {"throughput_req_s": m["throughput_req_s"], "jct_avg_s": m["jct_avg_s"],
            "latency_avg_s_per_token": m["latency_avg_s_per_token"], "slo_attainment_all": m["slo_attainment"]}


def simulate(run: dict, eng: dict, rates: list[float], seeds: list[int], window_s: float,
             load_unit: str = "requests", inlaid: dict | None = None) -> list[dict]:
    """Per (rate, seed): inlaid 4-bit, fifo 4-bit and fifo fp16 metrics, SLO against the run's solo fit.
    load_unit "tokens": each trace's request rate is scaled so it offers frac × C's output tokens per
    second at the capacity burst's task mix (serve_gpu_workload.trace_rate). inlaid: SchedulerConfig
    fields set for inlaid's replays alone (e.g. inlaid_step_time_ratio), the fifo runs keep the run's settings."""
    workload = RunWorkload.of(run)
    scheds = {"inlaid": dataclasses.replace(eng["sched"], **(inlaid or {})),
              "fifo": eng["sched"]}
    rows = []
    for frac in rates:
        for seed in seeds:
            rate, trace = workload.trace(frac, seed, window_s, load_unit)
            row = {"load_frac": frac, "seed": seed, "requests": len(trace), "rate_req_s": rate}
            for label, policy, base in (("inlaid", "inlaid", "4-bit"), ("fifo", "fifo", "4-bit"),
                                        ("fifo fp16", "fifo", "fp16")):
                row[label] = headline_metrics(workload.replay(POLICIES[policy], scheds[policy], *eng[base], trace))
            rows.append(row)
            print(f"{frac:.1f} C seed {seed}: " + " | ".join(
                f"{lab} JCT {row[lab]['jct_avg_s']:.2f} SLO {row[lab]['slo_attainment_all']:.3f}"
                for lab in ("inlaid", "fifo", "fifo fp16")), flush=True)
    return rows


def ratio(row: dict, base: str, key: str) -> float:
    """Inlaid 4-bit against `base` ("fifo" or "fifo fp16") on one seed, > 1: inlaid better."""
    return ratios(row["inlaid"], row[base])[key]


def report(res: dict) -> str:
    meta = res["meta"]
    lines = [f"# Inlaid 4-bit vs fifo 4-bit and fifo fp16 over many traces, simulated (commit {meta['commit']})", "",
             f"Device: this CPU, simulated; step times from cost models fitted to the steps of `{meta['run_json']}` "
             f"({meta['run_device']}, commit {meta['run_commit']}); nothing here ran on a GPU. Command: "
             f"`{meta['command']}` ({meta['wall_s']:.0f} s).", "",
             f"Workload: that run's generator and settings, {meta['window_s']:g} s of Poisson arrivals at each rate "
             f"(fractions of its C = {meta['capacity']:.1f} req/s), drained; seeds {meta['seeds'][0]}–{meta['seeds'][-1]} "
             f"({len(meta['seeds'])}). SLO: JCT ≤ {meta['slo_scale']:g} × the run's measured solo-latency fit, for "
             "every replay. Ratios > 1 mean inlaid on 4 bits is better.", ""]
    if meta.get("load_unit") == "tokens":
        lines += ["**Load in tokens:** each seed's request rate is scaled by the capacity burst's mean output "
                  "length over that seed's (the task mix's expectation), so every trace offers the same output "
                  "tokens per second: at a fixed req/s the seeds' Zipf orders put 63–149 output tokens on a "
                  "request of this workload.", ""]
    if meta.get("prefill_cut_ms"):
        lines += [f"**What-if:** the 4-bit engine's fitted fixed price of a step with a prefill is lowered by "
                  f"{meta['prefill_cut_ms']:g} ms ({meta['cost_4bit']}); the errors below are the fits'.", ""]
    if meta.get("kv_speedup_4bit", 1.0) != 1.0:
        lines += [f"**What-if:** the 4-bit engine's fitted price of a cached token read divided by "
                  f"{meta['kv_speedup_4bit']:g} (an fp8 KV cache there, same number of blocks; fifo on fp16 keeps "
                  "its fp16 cache); the errors below are the fits' before the change.", ""]
    if meta.get("inlaid_step_time_ratio"):
        lines += [f"**Inlaid with a latency target:** `inlaid_step_time_ratio` = {meta['inlaid_step_time_ratio']:g} "
                  "(its running pool capped so a decode-only step takes at most that many times the fastest one "
                  "seen); fifo keeps the run's settings.", ""]
    if meta.get("inlaid_slo_scale"):
        lines += [f"**Inlaid deadline-aware:** `inlaid_slo_scale` = {meta['inlaid_slo_scale']:g} (a waiting request "
                  "that can no longer finish within that many times its predicted latency served alone ranks after "
                  "every one that still can); fifo keeps the run's settings.", ""]
    if meta.get("kv_speedup", 1.0) != 1.0:
        lines += [f"**What-if:** both engines' fitted price of a cached token read divided by {meta['kv_speedup']:g} "
                  "(faster decode attention; the solo-latency fit that judges SLO is the run's, unchanged); the "
                  "errors below are the fits' before the change.", ""]
    lines += ["Cost-model errors (per step, and of the summed time):", "",
              "| model, evaluated on | steps | median abs rel err | error of summed time |", "|---|---|---|---|"]
    for name, e in meta["fit_errors"].items():
        if e:
            lines.append(f"| {name} | {e['num_steps']} | {e['median_abs_rel_err']:.1%} | {e['total_time_rel_err']:+.1%} |")
    lines.append("")
    for frac in meta["rates"]:
        rows = [r for r in res["rows"] if r["load_frac"] == frac]
        lines += [f"## {frac:g} × C", "", "| baseline | " + " | ".join(
            f"{name}: geo. mean × (met on)" for _, name in HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
        for base, label in (("fifo fp16", "fifo on fp16 (S-LoRA's configuration)"), ("fifo", "fifo on the same 4-bit base")):
            cells = []
            for key, _ in HEADLINE:
                vals = [ratio(r, base, key) for r in rows]
                geo = geomean(vals)
                met = sum(v >= TARGETS[key] for v in vals)
                cells.append(f"{geo:.2f} ({met} of {len(vals)})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        every = sum(all(ratio(r, "fifo fp16", k) >= TARGETS[k] for k, _ in HEADLINE) for r in rows)
        lines += ["", f"All four targets against fifo fp16 on the same seed: {every} of {len(rows)} seeds.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-json", required=True, help="a bench_serve_gpu result with an fp16 section")
    ap.add_argument("--steps-csv", required=True, help="its measured steps (serve_gpu*.steps.csv)")
    ap.add_argument("--rates", default="2.4,3.2", help="fractions of the run's FIFO capacity C")
    ap.add_argument("--seeds", type=int, default=20, help="traces per rate (seeds 100, 101, ...)")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--load-unit", choices=LOAD_UNITS, default="requests",
                    help="requests: every trace at frac x C req/s; tokens: each trace's req/s scaled so it offers "
                         "frac x C's output tokens per second at the capacity burst's task mix")
    ap.add_argument("--prefill-cut-ms", type=float, default=0.0,
                    help="what-if: lower the 4-bit engine's fitted fixed price of a step with a prefill (7-11 ms) "
                         "by this, e.g. 5.7, the dense path's dequantization per step in the eager profiles")
    ap.add_argument("--kv-speedup", type=float, default=1.0,
                    help="what-if: divide both engines' fitted price of a cached token read by this (faster attention)")
    ap.add_argument("--kv-speedup-4bit", type=float, default=1.0,
                    help="what-if: divide the 4-bit engine's price of a cached token read alone (an fp8 KV cache)")
    ap.add_argument("--inlaid-step-time-ratio", type=float, default=0.0,
                    help="inlaid's latency target (SchedulerConfig.inlaid_step_time_ratio; 0: off, the default)")
    ap.add_argument("--inlaid-slo-scale", type=float, default=0.0,
                    help="inlaid's deadline-aware admission (SchedulerConfig.inlaid_slo_scale; 0: off, the default)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sim_vs_fp16"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = json.loads(Path(args.run_json).read_text())
    if args.kv_speedup <= 0 or args.kv_speedup_4bit <= 0:
        raise SystemExit("--kv-speedup and --kv-speedup-4bit must be > 0")
    eng = engines(run, read_steps(args.steps_csv), args.prefill_cut_ms, args.kv_speedup, args.kv_speedup_4bit)
    rates = [float(x) for x in args.rates.split(",")]
    seeds = list(range(100, 100 + args.seeds))
    inlaid = {"inlaid_step_time_ratio": args.inlaid_step_time_ratio, "inlaid_slo_scale": args.inlaid_slo_scale}
    rows = simulate(run, eng, rates, seeds, args.window_s, args.load_unit, inlaid)
    m = run["meta"]
    meta = {"commit": args.commit, "run_json": args.run_json, "run_commit": m["git_commit"],
            "run_device": m.get("device", "GPU"), "rates": rates, "seeds": seeds, "window_s": args.window_s,
            "load_unit": args.load_unit,
            "capacity": run["calibration"]["fifo_capacity_req_s"], "slo_scale": m["slo_scale"],
            "fit_errors": eng["errors"], "prefill_cut_ms": args.prefill_cut_ms, "kv_speedup": args.kv_speedup,
            "kv_speedup_4bit": args.kv_speedup_4bit, "inlaid_step_time_ratio": args.inlaid_step_time_ratio,
            "inlaid_slo_scale": args.inlaid_slo_scale,
            "cost_4bit": eng["4-bit"][0].source,
            "command": " ".join(["python", "benchmarks/sim_vs_fp16.py"] + sys.argv[1:]),
            "wall_s": time.perf_counter() - t0}
    res = {"meta": meta, "rows": rows}
    write_result(args.out, res, report(res))


if __name__ == "__main__":
    main()
