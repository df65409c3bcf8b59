"""Simulated side-by-side comparison of scheduling policies (inlaid, fifo, mlfq, wfq + ablations).

Replays synthetic multi-task traces (Poisson arrivals, Zipf task popularity,
short/medium/long tasks) through the engine's real policy classes on a
virtual clock whose step times come from a linear cost model (assumed
coefficients unless --cost-model points at measured steps to fit).

    .venv/bin/python benchmarks/bench_sim.py                 # full run, writes results/sim.{md,json,png}
    .venv/bin/python benchmarks/bench_sim.py --quick         # smaller traces
    .venv/bin/python benchmarks/bench_sim.py --cost-model benchmarks/results/serve_steps.csv
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import git_commit  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.scheduler import SchedulerConfig  # noqa: E402
from services.engine.simulator.cost_model import CostModel  # noqa: E402
from services.engine.simulator.metrics import summarize  # noqa: E402
from services.engine.simulator.simulator import SimConfig, Simulator  # noqa: E402
from services.engine.simulator.trace import TraceRequest, write_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Task classes: (output mean, output log-sd, prompt mean). They differ ~30x in output length.
TASK_CLASSES = {"short": (12, 0.5, 120), "medium": (100, 0.5, 250), "long": (400, 0.4, 400)}


# ---- synthetic workload ---------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    output_mean: float
    output_sigma: float
    prompt_mean: float


def make_tasks(num_tasks: int, rng: random.Random, kinds: tuple[str, ...] = tuple(TASK_CLASSES)) -> list[TaskSpec]:
    """Tasks cycle through `kinds` (short/medium/long); each gets its own mean (±30 %) within its class."""
    tasks = []
    for i in range(num_tasks):
        kind = kinds[i % len(kinds)]
        out_mean, sigma, prompt_mean = TASK_CLASSES[kind]
        jitter = rng.uniform(0.7, 1.3)
        tasks.append(TaskSpec(f"task{i:04d}-{kind}", kind, out_mean * jitter, sigma, prompt_mean * jitter))
    return tasks


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def generate_trace(num_requests: int, rate: float, tasks: list[TaskSpec], *, zipf_s: float = 1.0,
                   predictor_sigma: float = 0.35, seed: int = 0, max_output: int = 2000,
                   task_weights: list[float] | None = None) -> list[TraceRequest]:
    """Poisson arrivals; task by Zipf popularity (or task_weights); log-normal lengths.

    predicted_output_tokens imitates the length predictor: the true length
    times log-normal noise of sd predictor_sigma (0.35 ≈ ±40 %).
    """
    rng = random.Random(seed)
    weights = task_weights or zipf_weights(len(tasks), zipf_s)
    # Shuffle popularity so that the popular tasks are not all of one kind.
    order = list(range(len(tasks)))
    rng.shuffle(order)
    picks = rng.choices([tasks[i] for i in order], weights=weights, k=num_requests)
    out, t = [], 0.0
    for i, task in enumerate(picks):
        t += rng.expovariate(rate)
        mu = math.log(task.output_mean) - task.output_sigma ** 2 / 2
        output = min(max_output, max(1, round(rng.lognormvariate(mu, task.output_sigma))))
        prompt = max(8, round(rng.lognormvariate(math.log(task.prompt_mean), 0.3)))
        predicted = max(1, round(output * rng.lognormvariate(0.0, predictor_sigma)))
        out.append(TraceRequest(arrival_s=t, task=task.name, prompt_tokens=prompt, output_tokens=output,
                                predicted_output_tokens=predicted, request_id=f"r{i}"))
    return out


def with_predictions(trace: list[TraceRequest], mode: str) -> list[TraceRequest]:
    """mode: 'predictor' (as generated), 'oracle' (true length), 'task-mean' (no per-request prediction)."""
    if mode == "predictor":
        return trace
    if mode == "oracle":
        return [dataclasses.replace(r, predicted_output_tokens=r.output_tokens) for r in trace]
    if mode == "task-mean":
        sums: dict[str, list[int]] = {}
        for r in trace:
            sums.setdefault(r.task, []).append(r.output_tokens)
        mean = {t: max(1, round(sum(v) / len(v))) for t, v in sums.items()}
        return [dataclasses.replace(r, predicted_output_tokens=mean[r.task]) for r in trace]
    raise ValueError(f"unknown prediction mode {mode!r}")


# ---- variants ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    label: str
    policy: str
    prediction: str = "predictor"
    beta: int | None = None          # None = the shared default


MAIN = [Variant("inlaid", "inlaid"), Variant("fifo (S-LoRA)", "fifo"),
        Variant("mlfq (FastServe)", "mlfq"), Variant("wfq", "wfq")]
ABLATIONS = [Variant("inlaid, no prediction (task mean)", "inlaid", prediction="task-mean"),
             Variant("inlaid, beta=inf", "inlaid", beta=0),
             Variant("inlaid, oracle lengths", "inlaid", prediction="oracle")]


def run_variant(v: Variant, trace: list[TraceRequest], base: SchedulerConfig, cost: CostModel,
                sim_cfg: SimConfig) -> tuple[dict, object]:
    cfg = base if v.beta is None else dataclasses.replace(base, max_adapters_per_batch=v.beta)
    t0 = time.perf_counter()
    result = Simulator(POLICIES[v.policy], cfg, cost, sim_cfg).run(with_predictions(trace, v.prediction))
    metrics = dict(result.metrics, variant=v.label, sim_wall_s=time.perf_counter() - t0)
    return metrics, result


def find_capacity(tasks, base, cost, sim_cfg, n: int, seed: int, task_weights=None) -> float:
    """Saturated throughput (req/s) of FIFO on an overloaded trace: the rates below are fractions of it."""
    trace = generate_trace(n, 1e4, tasks, seed=seed, task_weights=task_weights)
    metrics, _ = run_variant(MAIN[1], trace, base, cost, sim_cfg)
    return metrics["throughput_req_s"]


# ---- scenarios ------------------------------------------------------------------------
def scenario_rates(tasks, capacity, fractions, n, base, cost, sim_cfg, seed) -> list[dict]:
    rows = []
    for frac in fractions:
        rate = frac * capacity
        trace = generate_trace(n, rate, tasks, seed=seed)
        for v in MAIN + ABLATIONS:
            m, _ = run_variant(v, trace, base, cost, sim_cfg)
            rows.append(dict(m, rate_req_s=rate, load_frac=frac, num_tasks=len(tasks)))
            print(f"rate {rate:6.2f} ({frac:.0%}) {v.label:36s} {fmt_row(m)}", flush=True)
    return rows


def scenario_tasks(task_counts, rate, n, base, cost, sim_cfg, seed) -> list[dict]:
    rows = []
    for count in task_counts:
        tasks = make_tasks(count, random.Random(seed))
        trace = generate_trace(n, rate, tasks, seed=seed)
        for v in MAIN + [ABLATIONS[1]]:
            m, _ = run_variant(v, trace, base, cost, sim_cfg)
            rows.append(dict(m, rate_req_s=rate, num_tasks=count))
            print(f"tasks {count:5d} {v.label:36s} {fmt_row(m)}", flush=True)
    return rows


def scenario_hog(n, base, cost, sim_cfg, seed, overload: float = 1.5) -> list[dict]:
    """Ten medium tasks; one sends 10x the rate of each other, pushing total load to `overload`.

    All tasks share one length class so that the hog is heavy by rate alone
    (with WFQ's token accounting, a long task at 1x rate weighs about as much
    as a medium one at 10x).

    Load is relative to FIFO's saturated throughput on this same task mix, so
    the other nine tasks alone are at 9/19 x overload (71 %) of capacity: under
    a fair policy they should keep their service while the hog absorbs the
    overload. The no-hog baseline is the same trace with the hog's requests
    removed, so the other tasks' arrivals are identical in both runs.
    """
    tasks = make_tasks(10, random.Random(seed), kinds=("medium",))
    weights = [10.0] + [1.0] * 9
    capacity = find_capacity(tasks, base, cost, sim_cfg, n, seed, task_weights=weights)
    rate = overload * capacity
    trace = generate_trace(n, rate, tasks, seed=seed, task_weights=weights)
    # generate_trace shuffles popularity: find which task received the 10x weight.
    counts: dict[str, int] = {}
    for r in trace:
        counts[r.task] = counts.get(r.task, 0) + 1
    hog = max(counts, key=counts.get)
    no_hog = [r for r in trace if r.task != hog]
    rows = []
    for v in (MAIN[3], MAIN[1], MAIN[0]):
        _, res_hog = run_variant(v, trace, base, cost, sim_cfg)
        _, res_base = run_variant(v, no_hog, base, cost, sim_cfg)
        others_hog = summarize([r for r in res_hog.requests if r.task != hog], slo_scale=sim_cfg.slo_scale)
        others_base = summarize(res_base.requests, slo_scale=sim_cfg.slo_scale)
        hog_only = summarize([r for r in res_hog.requests if r.task == hog], slo_scale=sim_cfg.slo_scale)
        row = {"variant": v.label, "hog_task": hog, "rate_req_s": rate, "capacity_req_s": capacity,
               "hog_share": counts[hog] / len(trace),
               "others_ttft_p99_no_hog_s": others_base["ttft_p99_s"],
               "others_ttft_p99_with_hog_s": others_hog["ttft_p99_s"],
               "others_latency_p99_no_hog_s_per_token": others_base["latency_p99_s_per_token"],
               "others_latency_p99_with_hog_s_per_token": others_hog["latency_p99_s_per_token"],
               "others_jct_p99_no_hog_s": others_base["jct_p99_s"],
               "others_jct_p99_with_hog_s": others_hog["jct_p99_s"],
               "others_p99_ratio": others_hog["jct_p99_s"] / others_base["jct_p99_s"],
               "others_jct_avg_no_hog_s": others_base["jct_avg_s"],
               "others_jct_avg_with_hog_s": others_hog["jct_avg_s"],
               "hog_jct_p99_s": hog_only["jct_p99_s"],
               "hog_throughput_tok_s": hog_only["throughput_tok_s"]}
        rows.append(row)
        print(f"hog {v.label:20s} others p99 {row['others_jct_p99_no_hog_s']:.2f}s -> "
              f"{row['others_jct_p99_with_hog_s']:.2f}s (x{row['others_p99_ratio']:.2f}); TTFT p99 "
              f"{row['others_ttft_p99_no_hog_s']:.2f}s -> {row['others_ttft_p99_with_hog_s']:.2f}s; "
              f"hog p99 {row['hog_jct_p99_s']:.1f}s", flush=True)
    return rows


# ---- reporting ------------------------------------------------------------------------
def fmt_row(m: dict) -> str:
    return (f"thr {m['throughput_req_s']:6.2f} req/s {m['throughput_tok_s']:7.0f} tok/s | "
            f"lat {m['latency_avg_s_per_token'] * 1e3:7.1f} ms/tok | JCT avg {m['jct_avg_s']:7.2f} "
            f"p99 {m['jct_p99_s']:7.2f} s | TTFT {m['ttft_avg_s']:6.2f} s | SLO {m['slo_attainment']:.3f} | "
            f"adapters/step {m['adapters_per_step_avg']:.1f}±{m['adapters_per_step_std']:.1f} | "
            f"preempt {m['num_preemptions']} | {m['sim_wall_s']:.1f}s")


def table(rows: list[dict], keys: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(k[1] for k in keys) + " |"
    sep = "|" + "|".join("---" for _ in keys) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k[0]], k[2]) if k[2] else str(r[k[0]]) for k in keys) + " |")
    return "\n".join(lines)


METRIC_COLS = [("variant", "policy", ""), ("throughput_req_s", "req/s", ".2f"), ("throughput_tok_s", "tok/s", ".0f"),
               ("latency_avg_s_per_token", "latency s/tok", ".3f"), ("jct_avg_s", "JCT avg s", ".2f"),
               ("jct_p99_s", "JCT p99 s", ".2f"), ("ttft_avg_s", "TTFT avg s", ".2f"),
               ("ttft_p99_s", "TTFT p99 s", ".2f"), ("slo_attainment", "SLO", ".3f"),
               ("adapters_per_step_avg", "adapters/step", ".2f"), ("adapters_per_step_std", "± std", ".2f"),
               ("num_preemptions", "preempt", "d")]


def plot(path: Path, rate_rows: list[dict], task_rows: list[dict]) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = list(dict.fromkeys(r["variant"] for r in rate_rows))
    for label in labels:
        rows = [r for r in rate_rows if r["variant"] == label]
        x = [r["rate_req_s"] for r in rows]
        axes[0].plot(x, [r["slo_attainment"] for r in rows], marker="o", label=label)
        axes[1].plot(x, [r["jct_avg_s"] for r in rows], marker="o", label=label)
    axes[0].set(xlabel="request rate (req/s)", ylabel="SLO attainment", title="SLO attainment vs rate")
    axes[1].set(xlabel="request rate (req/s)", ylabel="mean JCT (s)", title="JCT vs rate", yscale="log")
    for label in dict.fromkeys(r["variant"] for r in task_rows):
        rows = [r for r in task_rows if r["variant"] == label]
        axes[2].plot([r["num_tasks"] for r in rows], [r["throughput_req_s"] for r in rows], marker="o", label=label)
    axes[2].set(xlabel="number of tasks", ylabel="throughput (req/s)", title="task-count scaling", xscale="log")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle("Simulated (cost model, see sim.md) — not measured on a GPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def repo_path(path: Path) -> str:
    """path relative to the repository root where it lies inside it (as result files cite it)."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller traces (for a fast look)")
    ap.add_argument("--requests", type=int, default=3000, help="requests per trace")
    ap.add_argument("--cost-model", help="CSV/JSON of measured steps to fit (default: assumed coefficients)")
    ap.add_argument("--num-tasks", type=int, default=20, help="tasks in the rate scenario")
    ap.add_argument("--kv-blocks", type=int, default=2048, help="simulated KV cache blocks (16 tokens each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "sim"), help="output path prefix")
    ap.add_argument("--write-trace", help="also write the 80%%-load trace as JSONL here")
    args = ap.parse_args()
    n = 800 if args.quick else args.requests
    cost = CostModel.fit_file(args.cost_model) if args.cost_model else CostModel.assumed_7b_4bit()
    base = SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=4096, max_adapters_per_batch=10,
                           max_decode_streak=2, starvation_limit_s=30.0)
    sim_cfg = SimConfig(num_kv_blocks=args.kv_blocks, block_size=16, max_tokens=2048, slo_scale=5.0)
    print(f"cost model: {cost.source}: {cost.to_dict()}")
    t0 = time.perf_counter()
    tasks = make_tasks(args.num_tasks, random.Random(args.seed))
    capacity = find_capacity(tasks, base, cost, sim_cfg, n, args.seed)
    print(f"FIFO saturated throughput: {capacity:.2f} req/s")
    fractions = [0.5, 0.8, 1.0]
    if args.write_trace:
        write_trace(args.write_trace, generate_trace(n, 0.8 * capacity, tasks, seed=args.seed))
    rate_rows = scenario_rates(tasks, capacity, fractions, n, base, cost, sim_cfg, args.seed)
    task_rows = scenario_tasks([2, 10, 100, 1000], 0.8 * capacity, n, base, cost, sim_cfg, args.seed)
    hog_rows = scenario_hog(n, base, cost, sim_cfg, args.seed)
    wall = time.perf_counter() - t0
    write_results(Path(args.out), args, cost, base, sim_cfg, capacity, rate_rows, task_rows, hog_rows, wall, n)


def write_results(out: Path, args, cost, base, sim_cfg, capacity, rate_rows, task_rows, hog_rows,
                  wall_s: float, n: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "bench_sim (simulated serving; policies are the engine's real classes)",
        "device": "simulated: step times from the cost model below, computed on the CPU",
        "git_commit": git_commit(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "cost_model": cost.to_dict(),
        "scheduler_config": dataclasses.asdict(base),
        "sim_config": dataclasses.asdict(sim_cfg),
        "requests_per_trace": n,
        "task_classes": TASK_CLASSES,
        "fifo_saturated_req_s": capacity,
        "wall_s": wall_s,
    }
    data = {"meta": meta, "rates": rate_rows, "task_scaling": task_rows, "wfq_hog": hog_rows}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    has_plot = plot(out.with_suffix(".png"), rate_rows, task_rows)
    md = [f"# Simulated scheduling comparison ({meta['date_utc']}, commit {meta['git_commit']})", "",
          f"Command: `{meta['command']}` — {n} requests per trace, {wall_s:.0f} s wall.", "",
          f"**Cost model: {cost.source}.** t_step = {cost.a_s:.2e} + {cost.b_s_per_prefill_token:.2e}·prefill_tokens"
          f" + {cost.c_s_per_decode_seq:.2e}·decode_seqs + {cost.d_s_per_adapter:.2e}·adapters"
          f" + {cost.e_s_per_kv_token:.2e}·kv_tokens_read (s). These are simulated numbers, not"
          " measurements on a GPU; rankings depend on the coefficients (in particular the per-adapter cost d).", "",
          f"Workload: Poisson arrivals, Zipf(1.0) task popularity, tasks cycling short/medium/long "
          f"(output means {', '.join(f'{k} {v[0]}' for k, v in TASK_CLASSES.items())} tokens, log-normal); "
          "predictor = true length × log-normal noise (sd 0.35). KV cache "
          f"{sim_cfg.num_kv_blocks}×{sim_cfg.block_size} tokens; β = {base.max_adapters_per_batch}; "
          f"max {base.max_num_seqs} running. Rates are fractions of FIFO's saturated throughput "
          f"({capacity:.2f} req/s).", "",
          "Definitions: JCT = finish − arrival; latency = JCT / output tokens; TTFT = first token − arrival; "
          f"SLO attained when JCT ≤ {sim_cfg.slo_scale:g} × the request's latency served alone (same cost model); "
          "adapters/step = distinct adapters per executed step (mean ± std).", ""]
    for frac in dict.fromkeys(r["load_frac"] for r in rate_rows):
        rows = [r for r in rate_rows if r["load_frac"] == frac]
        md += [f"## Rate {rows[0]['rate_req_s']:.2f} req/s ({frac:.0%} of FIFO saturation), "
               f"{rows[0]['num_tasks']} tasks", "", table(rows, METRIC_COLS), ""]
    md += [f"## Task-count scaling at {task_rows[0]['rate_req_s']:.2f} req/s "
           "(80 % of the 20-task FIFO saturation; the 100- and 1000-task mixes saturate below it)", "",
           table(task_rows, [("num_tasks", "tasks", "d")] + METRIC_COLS), ""]
    md += ["## WFQ hog: ten medium tasks, one at 10× each other's rate (total 1.5× FIFO saturation on this mix)", "",
           "Others' p99 JCT with the hog vs the same arrivals without it (target for wfq: ratio ≤ 2).", "",
           table(hog_rows, [("variant", "policy", ""), ("others_jct_p99_no_hog_s", "others p99 no hog s", ".2f"),
                            ("others_jct_p99_with_hog_s", "others p99 with hog s", ".2f"),
                            ("others_p99_ratio", "ratio", ".2f"),
                            ("others_ttft_p99_no_hog_s", "others TTFT p99 no hog s", ".2f"),
                            ("others_ttft_p99_with_hog_s", "others TTFT p99 with hog s", ".2f"),
                            ("hog_jct_p99_s", "hog p99 s", ".1f"),
                            ("hog_throughput_tok_s", "hog tok/s", ".0f")]), ""]
    if has_plot:
        md += [f"![plot]({out.with_suffix('.png').name})", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out.with_suffix('.md')} and .json" + (" and .png" if has_plot else ""))


if __name__ == "__main__":
    main()
