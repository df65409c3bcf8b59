"""Cost-model fitting of the GPU serving benchmark, and the after-the-run refit on any machine."""
from __future__ import annotations

import dataclasses
import json
import random
import statistics
import sys
from pathlib import Path

from bench_serve_gpu_report import write_report
from results_io import read_steps
from bench_sim import with_predictions
from serve_gpu_workload import family_lengths, make_trace, scaled, task_names
from services.engine.policies import POLICIES
from services.engine.simulator.cost_model import FEATURES, CostModel, StepFeatures
from services.engine.simulator.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parents[1]


def fit_error(cost: CostModel, rows: list[dict]) -> dict:
    """How well `cost` predicts measured steps: median/mean |rel err| and the error of their sum."""
    if not rows:
        return {}
    pred = [cost.step_time_s(StepFeatures(*(int(float(r[k])) for k in FEATURES))) for r in rows]
    meas = [float(r["step_s"]) for r in rows]
    rel = [abs(p - m) / max(m, 1e-9) for p, m in zip(pred, meas)]
    return {"num_steps": len(rows), "median_abs_rel_err": statistics.median(rel),
            "mean_abs_rel_err": statistics.fmean(rel),
            "p90_abs_rel_err": sorted(rel)[int(0.9 * (len(rel) - 1))],
            "total_time_rel_err": sum(pred) / sum(meas) - 1.0}


def fit_cost(rows: list[dict], source: str) -> CostModel:
    return CostModel.fit([{k: r[k] for k in (*FEATURES, "step_s")} for r in rows], source=source)


def pooled_4bit_cost(steps: list[dict]) -> tuple[CostModel, list[dict]]:
    """The cost model refitted to a run's calibration steps and every 4-bit replay (none of its fp16
    replays), and those steps."""
    rows = [r for r in steps if "fp16" not in r["run"]]
    return fit_cost(rows, "calibration + 4-bit replay steps"), rows


MAIN_POLICIES = ("inlaid", "fifo", "mlfq", "wfq")
SIM_VARIANTS = [("inlaid", "inlaid", "predictor", None), ("fifo", "fifo", "predictor", None),
                ("mlfq", "mlfq", "predictor", None), ("wfq", "wfq", "predictor", None),
                ("inlaid, no prediction (task mean)", "inlaid", "task-mean", None),
                ("inlaid, beta=inf", "inlaid", "predictor", 0),
                ("inlaid, oracle lengths", "inlaid", "oracle", None)]


# Variants of the scale section: name -> (engine policy, EngineConfig/SchedulerConfig overrides, label).
# "inlaid-old" is inlaid before the full-batch prefill rule (prefill after max_decode_streak decode steps
# even when the running pool already holds β tasks), kept to compare both on one machine and trace.
# "inlaid-per-seq" ranks tasks for the β decode slots by shortest remaining per running sequence
# (inlaid_decode_task_rank, off by default; simulated neutral, results/sim_scale.md).
# "inlaid-overload" / "inlaid-no-overload" pin both of today's defaults on or the overload rule off, so
# runs recorded before either rule compare like for like (results/sim_overload.md).
SCALE_VARIANTS = {"inlaid": ("inlaid", {}, "inlaid"),
                  "inlaid-old": ("inlaid", {"inlaid_full_batch_streak_factor": 1}, "inlaid (old prefill rule)"),
                  "inlaid-per-seq": ("inlaid", {"inlaid_decode_task_rank": "srtf_per_seq"},
                                     "inlaid (decode rank per running seq)"),
                  "inlaid-streak4": ("inlaid", {"inlaid_full_batch_streak_factor": 4},
                                     "inlaid (prefill waits 4x the decode streak at beta)"),
                  "inlaid-strict": ("inlaid", {"inlaid_beta_fill": 0.0},
                                    "inlaid (strict beta cap, no fill)"),
                  "inlaid-fill": ("inlaid", {"inlaid_beta_fill": 0.75},
                                  "inlaid (work-conserving beta, fill 0.75: the default from 58605d6 to c7661fc)"),
                  "inlaid-overload": ("inlaid", {"inlaid_beta_fill": 0.75, "inlaid_overload_min_free": 0.25},
                                      "inlaid (fill 0.75 + overload prefill rule 0.25: the defaults until c7661fc)"),
                  "inlaid-no-overload": ("inlaid", {"inlaid_beta_fill": 0.75, "inlaid_overload_min_free": 0.0},
                                         "inlaid (fill 0.75, no overload prefill rule)"),
                  "inlaid-fill1": ("inlaid", {"inlaid_beta_fill": 1.0},
                                   "inlaid (β binds only once its tasks fill the whole batch)"),
                  "inlaid-separate": ("inlaid", {"piggyback_decode": False},
                                      "inlaid (prefill-only steps: the running pool stalls during a prefill)"),
                  "inlaid-piggyback": ("inlaid", {"piggyback_decode": True},
                                       "inlaid (a prefill step also decodes the running pool)"),
                  "inlaid-r1": ("inlaid", {"admission_reserve_fraction": 1.0},
                                "inlaid (admission reserves the whole predicted output)"),
                  "inlaid-r05": ("inlaid", {"admission_reserve_fraction": 0.5},
                                 "inlaid (admission reserves half the predicted output)"),
                  "inlaid-r025": ("inlaid", {"admission_reserve_fraction": 0.25},
                                  "inlaid (admission reserves a quarter of the predicted output)"),
                  "inlaid-r0": ("inlaid", {"admission_reserve_fraction": 0.0},
                                "inlaid (admission reserves the prompt and one token)"),
                  "inlaid-streak2": ("inlaid", {"max_decode_streak": 2}, "inlaid (prefill considered every 2 decode steps)"),
                  "inlaid-streak8": ("inlaid", {"max_decode_streak": 8}, "inlaid (prefill considered every 8 decode steps)"),
                  "inlaid-prefetch": ("inlaid", {"lora_prefetch": 32},
                                      "inlaid (the next 32 waiting tasks' adapter packs made on a background thread)")}


def scale_variant(name: str) -> tuple[str, dict, str]:
    """(engine policy, config overrides, label) of a scale variant; any other name is a plain policy."""
    return SCALE_VARIANTS.get(name, (name, {}, name))


def scheduler_overrides(sched, overrides: dict) -> dict:
    """A variant's overrides that the scheduler has (engine-only ones, e.g. lora_prefetch, dropped)."""
    return {k: v for k, v in overrides.items() if hasattr(sched, k)}


def step_stats(rows: list[dict], run: str) -> dict:
    """Decode vs prefill steps of one replay (from the measured step rows)."""
    rs = [r for r in rows if r["run"] == run]
    dec = [r for r in rs if r["num_prefill_tokens"] == 0]
    pre = [r for r in rs if r["num_prefill_tokens"] > 0]

    def mean(xs):
        return statistics.fmean(xs) if xs else float("nan")
    return {"run": run, "num_steps": len(rs), "busy_s": sum(r["step_s"] for r in rs),
            "decode_steps": len(dec), "decode_ms": 1e3 * mean([r["step_s"] for r in dec]),
            "decode_batch": mean([r["num_decode_seqs"] for r in dec]),
            "decode_adapters": mean([r["num_adapters"] for r in dec]),
            "prefill_steps": len(pre), "prefill_ms": 1e3 * mean([r["step_s"] for r in pre]),
            "prefill_tokens": mean([r["num_prefill_tokens"] for r in pre]),
            "prefill_adapters": mean([r["num_adapters"] for r in pre]),
            "prefill_busy_s": sum(r["step_s"] for r in pre)}


def run_lengths(meta: dict) -> dict:
    """The per-family lengths a bench_serve_gpu run drew from (its --length-scale; runs before the
    option: none)."""
    return scaled(family_lengths(ROOT / "data" / "lengths.jsonl"), *meta.get("length_scale", (1.0, 1.0)))


def replay_setup(run: dict, steps: list[dict]) -> tuple:
    """(cost model fitted to the run's calibration steps, SchedulerConfig, SimConfig, lengths):
    what a CPU study needs to replay a recorded run's workload on its own engine settings."""
    cost = fit_cost([r for r in steps if r["run"].startswith("calib")], "the run's calibration steps")
    sched, sim_cfg = run_settings(run["meta"])
    return cost, sched, sim_cfg, run_lengths(run["meta"])


def run_settings(meta: dict) -> tuple:
    """(SchedulerConfig, SimConfig) of a bench_serve_gpu run, from its JSON's meta."""
    from services.engine.config import EngineConfig
    sched = EngineConfig(max_num_seqs=meta["max_num_seqs"], max_num_batched_tokens=meta["max_batched_tokens"],
                         max_adapters=meta["adapter_slots"], max_adapters_per_batch=meta["beta"],
                         max_decode_streak=meta["max_decode_streak"],
                         starvation_limit_s=meta["starvation_limit_s"],
                         # runs before the fill rule (no key in their meta) had the strict β cap
                         inlaid_beta_fill=meta.get("inlaid_beta_fill", 0.0),
                         inlaid_full_batch_streak_factor=meta.get("inlaid_full_batch_streak_factor", 2),
                         # runs before the overload prefill rule (no key) had none
                         inlaid_overload_min_free=meta.get("inlaid_overload_min_free", 0.0),
                         inlaid_overload_streak_factor=meta.get("inlaid_overload_streak_factor", 4),
                         # runs before piggybacking (no key) had prefill-only steps
                         piggyback_decode=meta.get("piggyback_decode", False),
                         # runs before the reservation fraction (no key) reserved the whole prediction
                         admission_reserve_fraction=meta.get("admission_reserve_fraction", 1.0),
                         ).scheduler_config()
    sim_cfg = SimConfig(num_kv_blocks=meta["num_kv_blocks"], block_size=meta["block_size"], max_tokens=512,
                        slo_scale=meta["slo_scale"])
    return sched, sim_cfg


def refit(out_dir: Path, sim_s: float, sim_rates: list[float], seed: int) -> None:
    """After a run, on any machine: refit the cost model to the measured steps (serve_gpu.steps.csv)
    with the current CostModel.fit, evaluate it on held-out steps, and rerun the simulator sections
    (task scaling; policies at rates up to 1.5 C with long traces) with it. The on-device fit and
    its simulated rows stay in the JSON under *_ondevice keys."""
    path = out_dir / "serve_gpu.json"
    data = json.loads(path.read_text())
    rows = read_steps(out_dir / "serve_gpu.steps.csv")
    cal_rows = [r for r in rows if r["run"].startswith("calib")]
    main_rows = [r for r in rows if r["run"] in MAIN_POLICIES]
    replay_4bit = [r for r in rows if not r["run"].startswith("calib") and "fp16" not in r["run"]]
    rng = random.Random(seed)
    idx = list(range(len(cal_rows)))
    rng.shuffle(idx)
    cut = int(0.7 * len(cal_rows))
    train, test = [cal_rows[i] for i in idx[:cut]], [cal_rows[i] for i in idx[cut:]]
    split = fit_cost(train, "70 % of calibration engine steps")
    cost = fit_cost(cal_rows, "calibration engine steps (serve_gpu.steps.csv, refitted after the run)")
    data["refit"] = {
        "method": CostModel.fit.__doc__.split("\n")[0] + " + a per-step term for steps with a prefill",
        "cost_model": cost.to_dict(), "fit_70_30": {"cost_model": split.to_dict(), "heldout": fit_error(split, test)},
        "on_calib_steps": fit_error(cost, cal_rows), "on_main_steps": fit_error(cost, main_rows),
        "on_all_4bit_replay_steps": fit_error(cost, replay_4bit)}
    meta = data["meta"]
    sched, sim_cfg = run_settings(meta)
    lengths = run_lengths(meta)
    families = list(lengths)
    capacity = data["calibration"]["fifo_capacity_req_s"]
    sc = data.setdefault("scale", {})
    if "sim" in sc and "sim_ondevice_fit" not in sc:
        sc["sim_ondevice_fit"] = sc.pop("sim")
    real = sc.get("real") or []
    rate = real[0]["rate_req_s"] if real else 1.3 * capacity
    counts = sorted({r["num_tasks"] for r in real}) or [2, 10, 100, 1000]
    sim_rows = []
    for count in counts:
        trace = make_trace(task_names(count, families), lengths, rate, sim_s, seed + 20, zipf_a=meta["zipf_a"],
                           pred_sigma=meta["pred_sigma"], prefix=f"sim{count}-", pooled=True)
        for name in (*SCALE_VARIANTS, "fifo"):
            policy, overrides, desc = scale_variant(name)
            res = Simulator(POLICIES[policy], dataclasses.replace(sched, **scheduler_overrides(sched, overrides)),
                            cost, sim_cfg).run(trace)
            sim_rows.append(dict(res.metrics, variant=f"{desc}, {count} tasks (sim)", policy=name,
                                 num_tasks=count, rate_req_s=rate))
            print(f"sim {name:10s} {count:5d} tasks: {res.metrics['throughput_req_s']:.2f} req/s", flush=True)
    sc["sim"] = sim_rows
    sc["step_stats"] = [step_stats(rows, r["variant"]) for r in real]
    tasks = task_names(meta["num_tasks"], families)
    rate_rows = []
    for frac in sim_rates:
        trace = make_trace(tasks, lengths, frac * capacity, sim_s, seed + 10, zipf_a=meta["zipf_a"],
                           pred_sigma=meta["pred_sigma"], prefix=f"simr{frac}-")
        for label, policy, mode, beta in SIM_VARIANTS:
            cfg = sched if beta is None else dataclasses.replace(sched, max_adapters_per_batch=beta)
            res = Simulator(POLICIES[policy], cfg, cost, sim_cfg).run(with_predictions(trace, mode))
            m = dict(res.metrics, variant=label, policy=policy, load_frac=frac, rate_req_s=frac * capacity,
                     num_trace_requests=len(trace), slo_attainment_all=res.metrics.get("slo_attainment"),
                     offered_rate_req_s=len(trace) / trace[-1].arrival_s, num_unfinished=0)
            rate_rows.append(m)
            print(f"sim {frac:.1f} C {label:36s} JCT {m['jct_avg_s']:.2f} s SLO {m['slo_attainment']:.3f}", flush=True)
    data["sim_rates"] = rate_rows
    data["meta"]["refit_command"] = " ".join(["python", "benchmarks/bench_serve_gpu.py"] + sys.argv[1:])
    path.write_text(json.dumps(data, indent=1, default=str))
    write_report(data, out_dir / "serve_gpu.md", out_dir / "serve_gpu.png")
    print(f"refit: {cost.source}; wrote {path} and serve_gpu.md")
