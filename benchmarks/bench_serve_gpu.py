"""GPU serving benchmark: every scheduling policy on one loaded engine, in one process.

Random weights in the exact Llama-2-7B shapes (no model hub on the GPU machine),
4-bit RTN base (EngineConfig(quant_bits=4)), synthetic rank-8/16 LoRA adapters made
in memory (q/k/v/o, timing only), output lengths from the workload kit's measured
distributions (data/lengths.jsonl; EOS ignored, a request ends at its trace length).
The runner is loaded once; each replay builds a fresh LLMEngine (policy, β) around it.

Sections (each skippable, each printed with a time estimate, results written after each):
  calib    warm-up grid on the runner (GEMM tuning, CUDA-graph capture), an unmeasured FIFO
           warm-up burst, a FIFO burst (saturated throughput C), a half-load replay; the
           simulator's cost model is fitted to those engine steps (error on held-out steps),
           solo latencies measured
  main     3 rates (fractions of C) × inlaid/fifo/mlfq/wfq, same trace per rate
  ablate   inlaid at the highest rate: per-task mean prediction, β = ∞, oracle lengths, strict β cap,
           no overload prefill rule
  wfq      one task at 10× the others' rate: others' p99 with vs without the hog
  scale    2/10/100/1000 tasks at a fixed rate: real engine (the --scale-policies variants, by default
           inlaid and inlaid with the strict β cap, same trace) + simulator (fitted model)
  fp16     frees the 4-bit runner, loads an fp16 base (S-LoRA's configuration), fifo + inlaid

    python benchmarks/bench_serve_gpu.py --out $OUT --commit <sha>          # GPU, ≈ 450 s
    python benchmarks/bench_serve_gpu.py --tiny --out /tmp/sg --replay-s 3   # CPU smoke test
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import random
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_gpu_engine import (device_name, load_runner, make_engine, measure, replay, runner_grid,  # noqa: E402
                              set_memory_cap)
from serve_gpu_fit import fit_cost, fit_error, refit, scale_variant  # noqa: E402
from serve_gpu_workload import (  # noqa: E402
    family_lengths, make_adapters, make_trace, scaled, task_names)
from bench_serve_gpu_report import write_report  # noqa: E402
from serve_gpu_sections import TIMEOUT_ARMS, ExtraSections  # noqa: E402
from serve_gpu_args import ABLATIONS, parse_args  # noqa: E402
from bench_sim import with_predictions  # noqa: E402
from results_io import cpu_name, python_loop_ms  # noqa: E402
from services.engine.kernels import attention  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.simulator.simulator import SimConfig, Simulator  # noqa: E402
from services.engine.simulator.cost_model import FEATURES, CostModel  # noqa: E402
from services.engine.simulator.simulator import solo_latency_s  # noqa: E402
from services.engine.simulator.trace import TraceRequest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIM_CAPACITY_GAP = 1.5        # simulated burst drain over C beyond which the report warns
MIN_BURST_COMPLETIONS = 100   # fewer completions in the burst's steady-state window: C is a transient
# ---- the run -----------------------------------------------------------------------------
class OutOfTime(Exception):
    """The next replay would not end inside --budget-s; the section keeps what it measured."""


class Bench(ExtraSections):
    """Holds the run's state; each section method appends to `data` and the report is rewritten."""

    def __init__(self, args) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lengths = scaled(family_lengths(ROOT / "data" / "lengths.jsonl"), *args.length_scale)
        longest = max(p + o for rows in self.lengths.values() for p, o in rows)
        if longest > args.max_model_len:
            raise SystemExit(f"--length-scale {args.length_scale}: a request of {longest} tokens exceeds "
                             f"--max-model-len {args.max_model_len}")
        # requests end at their trace length: the cap only has to let the longest one through
        args.max_tokens = max(args.max_tokens, max(o for rows in self.lengths.values() for _, o in rows))
        self.families = list(self.lengths)
        self.tasks = task_names(args.num_tasks, self.families)
        self.all_steps: list[dict] = []
        self.data: dict = {"meta": {}, "sections": {}}
        self.runner = None
        self.runner_label = ""
        self.cost: CostModel | None = None
        self.capacity: float | None = None
        self.solo_s = lambda req: solo_latency_s(self.cost, req)   # replaced by the measured fit

    # -- helpers --
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def save(self) -> None:
        meta = self.data["meta"]
        meta["wall_s"] = self.elapsed()
        if self.runner is not None:
            self.note_peak(self.runner_label)
        path = self.out / "serve_gpu.json"
        path.write_text(json.dumps(_public(self.data), indent=1, default=str))
        with (self.out / "serve_gpu.steps.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*FEATURES, "step_s", "schedule_s", "run"], restval=0.0)
            w.writeheader()
            w.writerows(self.all_steps)
        try:
            write_report(_public(self.data), self.out / "serve_gpu.md", self.out / "serve_gpu.png")
        except Exception as exc:  # noqa: BLE001 — the JSON is already written; the report can be redone
            print(f"report failed: {type(exc).__name__}: {exc}", flush=True)

    def load(self, cfg, names: list[str], label: str) -> tuple[float, float]:
        """self.runner from cfg, with the adapters of `names` registered: (load s, adapters s).
        With --gpu-gib the KV cache gets what the budget leaves: a probe load with a tiny cache
        measures the weights plus the adapter slots, --act-reserve-gib stays free for activations,
        CUDA graphs and workspaces, and the rest becomes KV blocks (the same rule for both bases,
        so the smaller base gets the larger cache, as on a real card of that size). --kv-max-blocks caps
        the run's base's cache (not the fp16 section's)."""
        import torch
        a = self.args
        mem = self.data["meta"].setdefault("memory", {})

        def add_adapters(runner) -> None:
            for adapter in make_adapters(runner.shape.dims(), names, a.adapter_sets, a.seed):
                runner.add_adapter(adapter)

        cap = a.kv_max_blocks if label != "fp16" else 0
        if a.gpu_gib and a.device.startswith("cuda"):
            probe, _ = load_runner(dataclasses.replace(cfg, num_kv_blocks=16))
            add_adapters(probe)
            torch.cuda.synchronize()
            per_block = probe.kv_bytes_per_block
            fixed = torch.cuda.memory_allocated() - 16 * per_block
            del probe
            gc.collect()
            torch.cuda.empty_cache()
            kv = int((a.gpu_gib - a.act_reserve_gib) * 2**30) - fixed
            if kv <= 0:
                raise RuntimeError(f"{label}: weights and adapter slots take {fixed / 2**30:.2f} GiB; "
                                   f"with {a.act_reserve_gib} GiB reserved, --gpu-gib {a.gpu_gib} leaves no KV cache")
            if cap:
                kv = min(kv, cap * per_block)
            cfg = dataclasses.replace(cfg, num_kv_blocks=0, kv_cache_bytes=kv)
            mem[label] = {"weights_and_adapters_gib": fixed / 2**30, "kv_gib": kv / 2**30}
        elif cap:
            cfg = dataclasses.replace(cfg, num_kv_blocks=min(cap, cfg.num_kv_blocks or cap))
        self.runner, load_s = load_runner(cfg)
        t0 = time.perf_counter()
        add_adapters(self.runner)
        adapters_s = time.perf_counter() - t0
        if self.runner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.runner_label = label
        mem.setdefault(label, {})["num_kv_blocks"] = self.runner.num_kv_blocks
        mem[label]["kv_cache_dtype"] = str(self.runner.kv_dtype).removeprefix("torch.")
        mem[label]["kv_tokens"] = self.runner.num_kv_blocks * self.runner.block_size
        mem[label]["kv_v_layout"] = self.runner.kv_v_layout
        print(f"  {label} runner: {self.runner.num_kv_blocks} KV blocks "
              f"({self.runner.num_kv_blocks * self.runner.block_size} tokens)"
              + (f", {mem[label]['weights_and_adapters_gib']:.2f} GiB weights + adapter slots, "
                 f"{a.gpu_gib} GiB budget" if "kv_gib" in mem[label] else ""), flush=True)
        return load_s, adapters_s

    def note_peak(self, label: str) -> None:
        """Peak allocated memory since this runner was loaded (the budget held if it is below)."""
        import torch
        if torch.cuda.is_available():
            self.data["meta"].setdefault("memory", {}).setdefault(label, {})["peak_gib"] = (
                torch.cuda.max_memory_allocated() / 2**30)

    def run_replay(self, engine_args: tuple, trace, label: str, window_s: float, cfg_overrides=None,
                   **extra) -> dict:
        policy, beta = engine_args
        worst = window_s + max(self.args.drain_s, 0.5 * window_s) + 1.0
        if self.elapsed() + worst > self.args.budget_s:
            raise OutOfTime(f"{label}: {worst:.0f} s needed, {self.args.budget_s - self.elapsed():.0f} s left")
        engine = make_engine(self.runner, self.base_cfg, policy, beta, **(cfg_overrides or {}))
        deadline = window_s + max(self.args.drain_s, 0.5 * window_s)
        m, steps = measure(engine, trace, self.solo_s, self.args, label, deadline, policy=policy,
                           beta=beta, **extra)
        self.all_steps += steps
        del engine
        return m

    def section(self, name: str, est_s: float, fn, required: bool = False) -> None:
        info = self.data["sections"].setdefault(name, {})
        info["estimate_s"] = est_s
        left = self.args.budget_s - self.elapsed()
        if name not in self.args.sections:
            info["status"] = "skipped (flag)"
            return
        if est_s > left and not required:
            info["status"] = f"skipped: estimate {est_s:.0f} s > {left:.0f} s left of the budget"
            print(f"== {name}: {info['status']}", flush=True)
            self.save()
            return
        print(f"== {name}: estimate {est_s:.0f} s ({self.elapsed():.0f} s elapsed, {left:.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            fn()
            info["status"] = "done"
        except OutOfTime as exc:
            info["status"] = f"truncated (out of time before {exc})"
        except Exception as exc:  # noqa: BLE001 — record it, keep the other sections' results
            traceback.print_exc()
            info["status"] = f"failed: {type(exc).__name__}: {exc}"
        info["wall_s"] = time.perf_counter() - t0
        print(f"== {name}: {info['status']} in {info['wall_s']:.0f} s", flush=True)
        self.save()

    def replay_est(self, n: int, window_s: float) -> float:
        return n * (window_s + 0.4 * max(self.args.drain_s, 0.5 * window_s) + 1.0)

    # -- sections --
    def setup(self) -> None:
        args = self.args
        from services.engine.config import EngineConfig
        self.base_cfg = EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, quant_bits=args.quant_bits,
            cuda_graphs=True, gemm_tune_cache=False,  # every run tunes afresh: no choices from earlier runs
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
            max_adapters=args.slots, max_adapters_per_batch=args.beta, max_model_len=args.max_model_len,
            max_decode_streak=args.max_decode_streak, starvation_limit_s=args.starvation_s,
            num_kv_blocks=args.num_kv_blocks, kv_cache_bytes=int(args.kv_gib * 2**30), policy="fifo",
            kv_cache_dtype=args.kv_cache_dtype, kv_v_layout=args.kv_v_layout,
            inlaid_step_time_ratio=args.inlaid_step_time_ratio, inlaid_slo_scale=args.inlaid_slo_scale)
        if args.gpu_gib:
            set_memory_cap(args.gpu_gib, args.device)
        n_names = max([args.num_tasks, 10, *args.scale_tasks])
        self.names = task_names(n_names, self.families)
        load_s, adapters_s = self.load(self.base_cfg, self.names, "4-bit" if args.quant_bits else "base")
        self.data["meta"].update(self.meta(load_s, adapters_s, n_names))
        print(f"loaded {args.model} ({self.data['meta']['device']}) in {load_s:.1f} s, "
              f"{self.runner.num_kv_blocks} KV blocks; {n_names} adapters in {adapters_s:.1f} s", flush=True)

    def meta(self, load_s: float, adapters_s: float, n_names: int) -> dict:
        a = self.args
        return {
            "benchmark": "bench_serve_gpu (real engine, real-time replays, one process)",
            "device": device_name(a.device), "git_commit": a.commit,
            "host_cpu": cpu_name(), "host_cores": os.cpu_count(), "host_python_loop_ms": python_loop_ms(),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/bench_serve_gpu.py"] + sys.argv[1:]),
            "model": a.model + " (random weights, exact shapes)", "quant_bits": a.quant_bits,
            "load_s": load_s, "num_kv_blocks": self.runner.num_kv_blocks, "block_size": self.runner.block_size,
            "kv_cache_dtype": a.kv_cache_dtype, "kv_max_blocks": a.kv_max_blocks or None,
            "kv_v_layout": self.runner.kv_v_layout, "decode_launch": attention.launch_settings(),
            "num_adapters_registered": n_names, "adapter_slots": a.slots, "adapter_sets": a.adapter_sets,
            "adapter_make_s": adapters_s, "beta": a.beta, "max_num_seqs": a.max_num_seqs,
            "max_batched_tokens": a.max_batched_tokens, "max_decode_streak": a.max_decode_streak,
            "starvation_limit_s": a.starvation_s, "inlaid_beta_fill": self.base_cfg.inlaid_beta_fill,
            "inlaid_full_batch_streak_factor": self.base_cfg.inlaid_full_batch_streak_factor,
            "inlaid_overload_min_free": self.base_cfg.inlaid_overload_min_free,
            "inlaid_step_time_ratio": self.base_cfg.inlaid_step_time_ratio,
            "inlaid_slo_scale": self.base_cfg.inlaid_slo_scale,
            "inlaid_overload_streak_factor": self.base_cfg.inlaid_overload_streak_factor,
            "piggyback_decode": self.base_cfg.piggyback_decode,
            "admission_reserve_fraction": self.base_cfg.admission_reserve_fraction,
            "slo_scale": a.slo_scale, "num_tasks": a.num_tasks,
            "gpu_gib": a.gpu_gib or None, "act_reserve_gib": a.act_reserve_gib if a.gpu_gib else None,
            "replay_window_s": a.replay_s, "drain_s": a.drain_s, "scale_window_s": a.scale_s,
            "scale_variants": {v: scale_variant(v)[2] for v in a.scale_policies}, "pred_sigma": a.pred_sigma,
            "zipf_a": a.zipf_a, "rate_fractions": a.rates, "load_unit": a.load_unit, "seed": a.seed,
            "lengths": "data/lengths.jsonl (test split)"
            + ("" if a.length_scale == (1.0, 1.0) else
               f", prompts ×{a.length_scale[0]:g} and outputs ×{a.length_scale[1]:g}"),
            "length_scale": list(a.length_scale),
            "families": {f: {"n": len(v), "mean_output": statistics.fmean(o for _, o in v),
                             "mean_prompt": statistics.fmean(p for p, _ in v)} for f, v in self.lengths.items()},
        }

    def sec_calib(self) -> None:
        a = self.args
        cal: dict = {}
        self.data["calibration"] = cal
        t0 = time.perf_counter()
        grid = runner_grid(self.runner, self.names[:10], a.grid_reps)
        cal["grid_wall_s"] = time.perf_counter() - t0
        cal["grid_rows"] = grid
        print(f"  runner grid: {len(grid)} configs in {cal['grid_wall_s']:.1f} s (warm-up included)", flush=True)
        # Provisional model from the grid, only to stamp SLO references of the calibration runs.
        self.cost = fit_cost(grid, "runner grid")
        # Warm-up burst, not measured: mixed prefill + decode steps compile kernel variants and tune
        # GEMM shapes that the grid's pure steps do not (run ce90b7a: 0.52 s and 0.84 s steps inside
        # the measured burst, which biased C low).
        if a.warm_burst_s > 0:
            cal["warm_burst_wall_s"] = self.fifo_burst(a.seed + 3, "w", a.warm_burst_s)[1][3]
            print(f"  warm-up burst (not measured): {cal['warm_burst_wall_s']:.1f} s", flush=True)
        # Saturated FIFO throughput: a burst of requests all at t=0, cut at burst_s.
        burst, (records, steps, unfinished, wall) = self.fifo_burst(a.seed + 1, "b", a.burst_s)
        # Steady state: completions after the first quarter (the start is all prefills).
        t_lo = 0.25 * wall
        late = [r for r in records if r.finished_s >= t_lo]
        self.capacity = len(late) / max(1e-9, wall - t_lo) if unfinished else len(records) / wall
        if unfinished and len(late) < MIN_BURST_COMPLETIONS:
            # a transient, not a steady state: every rate below would be a fraction of a wrong C
            print(f"  WARNING: only {len(late)} requests finished in the burst's last 3/4; C = {self.capacity:.1f} "
                  f"req/s is not a steady state (raise --burst-s)", flush=True)
            cal["capacity_warning"] = f"{len(late)} completions in the steady-state window"
        cal["measured_capacity_req_s"] = self.capacity
        if a.capacity_req_s > 0:   # a fixed C: the rates below no longer follow this burst's noise
            self.capacity = a.capacity_req_s
            cal["capacity_given"] = True
        cal.update(burst_requests=len(burst), burst_finished=len(records), burst_wall_s=wall,
                   fifo_capacity_req_s=self.capacity,
                   fifo_capacity_tok_s=sum(r.num_output_tokens for r in late) / max(1e-9, wall - t_lo))
        burst_steps = [dict(dataclasses.asdict(s), run="calib burst fifo") for s in steps]
        print(f"  FIFO burst: {len(records)}/{len(burst)} finished in {wall:.1f} s → capacity "
              f"{cal['measured_capacity_req_s']:.1f} req/s"
              + (f" (C given: {self.capacity:.1f} req/s)" if cal.get("capacity_given") else ""), flush=True)
        half = make_trace(self.tasks, self.lengths, 0.5 * self.capacity, a.calib_half_s, a.seed + 2,
                          zipf_a=a.zipf_a, pred_sigma=a.pred_sigma, prefix="h")
        engine = make_engine(self.runner, self.base_cfg, "inlaid", a.beta)
        _, steps, _, _ = replay(engine, half, a.max_tokens, a.calib_half_s + a.drain_s, a.seed)
        del engine
        half_steps = [dict(dataclasses.asdict(s), run="calib half-load inlaid") for s in steps]
        rows = burst_steps + half_steps
        self.all_steps += rows
        rng = random.Random(a.seed)
        idx = list(range(len(rows)))
        rng.shuffle(idx)
        cut = int(0.7 * len(rows))
        train, test = [rows[i] for i in idx[:cut]], [rows[i] for i in idx[cut:]]
        split_fit = fit_cost(train, "70 % of calibration engine steps")
        cal["fit_70_30"] = {"cost_model": split_fit.to_dict(), "heldout": fit_error(split_fit, test),
                            "train": fit_error(split_fit, train)}
        self.cost = fit_cost(rows, "calibration engine steps (FIFO burst + half-load inlaid replay)")
        cal["cost_model"] = self.cost.to_dict()
        cal["cost_model_on_calib_steps"] = fit_error(self.cost, rows)
        cal["grid_fit"] = {"cost_model": fit_cost(grid, "runner grid").to_dict(),
                           "on_engine_steps": fit_error(fit_cost(grid, "runner grid"), rows)}
        print(f"  cost model: {self.cost.source}; held-out (30 %): "
              f"{cal['fit_70_30']['heldout'].get('median_abs_rel_err', float('nan')):.1%} median |rel err|",
              flush=True)
        self.simulated_capacity(burst, cal)

    def sim_config(self) -> SimConfig:
        """The simulated engine of this run: the runner's KV cache, the run's length cap (setup
        raised it to the longest trace output) and SLO scale."""
        return SimConfig(num_kv_blocks=self.runner.num_kv_blocks, block_size=self.runner.block_size,
                         max_tokens=self.args.max_tokens, slo_scale=self.args.slo_scale)

    def simulated_capacity(self, burst: list, cal: dict) -> None:
        """The same burst drained on the fitted cost model, beside C: with long requests the cut
        burst is a transient (626f90e, 4x4 lengths: C = 16.3 req/s, yet every 4-bit replay at
        26 req/s finished in full), and a large gap says the rates may sit below saturation."""
        res = Simulator(POLICIES["fifo"], self.base_cfg.scheduler_config(), self.cost, self.sim_config()).run(burst)
        cal["sim_fifo_drain_req_s"] = sim_c = res.metrics["throughput_req_s"]
        print(f"  the burst drained on the cost model: {sim_c:.1f} req/s (C {self.capacity:.1f})", flush=True)
        if sim_c > SIM_CAPACITY_GAP * self.capacity:
            warning = f"simulated drain {sim_c:.1f} req/s > {SIM_CAPACITY_GAP:g} x C"
            cal["capacity_warning"] = "; ".join(filter(None, (cal.get("capacity_warning"), warning)))
            print(f"  WARNING: simulated drain {sim_c:.1f} req/s is over {SIM_CAPACITY_GAP:g} x C: the highest rate "
                  "may not saturate every policy", flush=True)
        cal["solo"] = self.solo_latencies()

    def solo_latencies(self) -> dict:
        """Requests served alone (each family at its p10/p50/p90 output length), measured on the
        engine; a linear fit in (prompt, output tokens) of those JCTs is the SLO reference."""
        import numpy as np
        rows = []
        for fam in self.families:
            pool = sorted(self.lengths[fam], key=lambda po: po[1])
            for q in (0.1, 0.5, 0.9):
                prompt, output = pool[int(q * (len(pool) - 1))]
                req = TraceRequest(arrival_s=0.0, task=fam, prompt_tokens=prompt, output_tokens=output,
                                   predicted_output_tokens=output, request_id=f"solo-{fam}-{q}")
                # Twice, keeping the faster: a first run can pay for a GEMM shape's tuning or a
                # kernel compile (one such outlier, 0.97 s for a 0.18 s request, wrecked the fit).
                jcts = []
                for _ in range(2):
                    engine = make_engine(self.runner, self.base_cfg, "inlaid", self.args.beta)
                    recs, _, _, _ = replay(engine, [req], self.args.max_tokens, 30.0, self.args.seed)
                    del engine
                    jcts.append(recs[0].jct_s)
                rows.append({"task": fam, "prompt_tokens": prompt, "output_tokens": output,
                             "measured_s": min(jcts), "measured_runs_s": jcts,
                             "cost_model_s": solo_latency_s(self.cost, req)})
        x = np.array([[1.0, r["prompt_tokens"], r["output_tokens"]] for r in rows])
        y = np.array([r["measured_s"] for r in rows])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        coef = np.maximum(coef, 0.0)
        for r, fit in zip(rows, x @ coef):
            r["fit_s"] = float(fit)
        c0, c_prompt, c_out = (float(c) for c in coef)
        self.solo_s = lambda req: c0 + c_prompt * req.prompt_tokens + c_out * req.output_tokens
        rel = [abs(r["fit_s"] - r["measured_s"]) / r["measured_s"] for r in rows]
        print(f"  solo latency fit: {c0 * 1e3:.2f} ms + {c_prompt * 1e6:.1f} µs/prompt tok + "
              f"{c_out * 1e3:.2f} ms/output tok (median |rel err| {statistics.median(rel):.1%})", flush=True)
        return {"rows": rows, "fit": {"intercept_s": c0, "s_per_prompt_token": c_prompt,
                                      "s_per_output_token": c_out, "median_abs_rel_err": statistics.median(rel)}}

    def sec_main(self) -> None:
        a = self.args
        rows = []
        self.data["main"] = rows
        for frac in a.rates:
            rate, trace = self.rate_at(frac), self.trace_at(frac)
            print(f" rate {rate:.1f} req/s ({frac:.0%} of FIFO capacity), {len(trace)} requests", flush=True)
            for policy in a.policies:
                m = self.run_replay((policy, a.beta), trace, policy, a.replay_s, rate_req_s=rate, load_frac=frac)
                if frac != a.rates[-1]:
                    m.pop("_jct")
                rows.append(m)
                self.save()
        main_steps = [s for s in self.all_steps if not s["run"].startswith("calib")]
        self.data["calibration"]["cost_model_on_main_steps"] = fit_error(self.cost, main_steps)

    def fifo_burst(self, seed: int, prefix: str, deadline_s: float) -> tuple:
        """(trace, replay result) of a FIFO engine given burst_requests requests at t = 0, cut at deadline_s."""
        a = self.args
        trace = make_trace(self.tasks, self.lengths, 1.0, 0.0, seed, burst=a.burst_requests,
                           zipf_a=a.zipf_a, pred_sigma=a.pred_sigma, prefix=prefix)
        engine = make_engine(self.runner, self.base_cfg, "fifo", a.beta)
        return trace, replay(engine, trace, a.max_tokens, deadline_s, a.seed)

    def ablations(self) -> list[tuple]:
        """(label, prediction mode, β, config overrides) of each inlaid ablation --ablations selects."""
        return [(label, mode, self.args.beta if beta is None else beta, overrides)
                for label, mode, beta, overrides in (ABLATIONS[k] for k in self.args.ablations or ABLATIONS)]

    def sec_ablate(self) -> None:
        a = self.args
        rows = []
        self.data["ablations"] = rows
        rate, trace = self.rate_at(a.rates[-1]), self.trace_at(a.rates[-1])
        for label, mode, beta, overrides in self.ablations():
            rows.append(self.run_replay(("inlaid", beta), with_predictions(trace, mode), label, a.replay_s,
                                        overrides, rate_req_s=rate, load_frac=a.rates[-1]))
            self.save()


def _public(obj):
    """The data without in-memory-only entries (keys starting with "_records")."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_records")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    return obj


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--refit":
        ap = argparse.ArgumentParser()
        ap.add_argument("--refit", required=True, help="directory with serve_gpu.json + serve_gpu.steps.csv")
        ap.add_argument("--sim-s", type=float, default=60.0)
        ap.add_argument("--sim-rates", default="0.5,0.8,1.1,1.5")
        ap.add_argument("--seed", type=int, default=0)
        a = ap.parse_args()
        refit(Path(a.refit), a.sim_s, [float(x) for x in a.sim_rates.split(",")], a.seed)
        return
    args = parse_args(argv)
    import torch
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    bench = Bench(args)
    bench.setup()
    n_main = len(args.rates) * len(args.policies)
    n_scale = len(args.scale_tasks) * len(args.scale_policies)
    calib_est = 60 + args.warm_burst_s + args.burst_s + args.calib_half_s + args.drain_s + 10
    bench.section("calib", calib_est, bench.sec_calib, required=True)
    if bench.capacity is None:
        print("no calibration: the other sections need its capacity and cost model", flush=True)
        return
    bench.section("main", bench.replay_est(n_main, args.replay_s), bench.sec_main)
    if args.trace_repeats > 1:
        n_repeat = (args.trace_repeats - 1) * len(args.repeat_policies)
        bench.section("repeat", bench.replay_est(n_repeat, args.replay_s), bench.sec_repeat)
    bench.section("ablate", bench.replay_est(len(bench.ablations()), args.replay_s), bench.sec_ablate)
    bench.section("timeouts", bench.replay_est(len(TIMEOUT_ARMS), args.replay_s), bench.sec_timeouts)
    bench.section("wfq", bench.replay_est(2 * len(args.hog_policies), args.hog_s), bench.sec_wfq)
    bench.section("scale", bench.replay_est(n_scale, args.scale_s) + 10, bench.sec_scale)
    # Last: it frees the 4-bit runner.
    n_fp16 = len(args.fp16_policies) * args.trace_repeats
    bench.section("fp16", 25 + args.warm_burst_s + bench.replay_est(n_fp16, args.replay_s),
                  bench.sec_fp16)
    print(f"done in {bench.elapsed():.0f} s", flush=True)


if __name__ == "__main__":
    main()
