"""Simulated task-count scaling of the inlaid policy with the H100 cost model (CPU, virtual clock).

Replays bench_serve_gpu's workloads through the engine's policy classes on the simulator, with
the step-time model fitted on the H100 (serve_gpu.json, `scale._meta.cost_model`) and its
measured FIFO capacity C:

  repro  the real scaling run's traces (5 s of arrivals, seed 20): sim vs measured steps
  scale  2/10/100/1000 tasks at 1.3 × C, lengths pooled over all families, longer traces, seeds
  main   21 tasks with per-family lengths at 0.5/0.8/1.1 × C (the GPU main section's workload)

Variants: inlaid (current), inlaid-old (inlaid_full_batch_streak_factor=1), fifo, and the
β-aware admission candidate (measured here, not adopted; see AdmitWithinBeta).

    .venv/bin/python benchmarks/bench_sim_scale.py            # writes results/sim_scale.{md,json}
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sim import git_commit, table  # noqa: E402
from serve_gpu_fit import SCALE_VARIANTS  # noqa: E402
from serve_gpu_workload import family_lengths, make_trace, task_names  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.policies.inlaid import InlaidScheduler  # noqa: E402
from services.engine.simulator.cost_model import CostModel  # noqa: E402
from services.engine.simulator.simulator import SimConfig, Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class AdmitWithinBeta(InlaidScheduler):
    """The issue's candidate: the running pool's tasks count against β, and a task new to the pool
    is admitted only into a free slot (hungry requests excepted), so decode can run the whole pool.
    Measured in this benchmark and not adopted (sim_scale.md says why); kept to reproduce that."""

    def _prefill(self, now_s: float):
        running = {s.task for s in self.running}
        free = self.config.max_adapters_per_batch - len(running - {""})
        best: dict[str, int] = {}
        for seq in self.waiting:
            best[seq.task] = min(best.get(seq.task, seq.predicted_remaining_tokens), seq.predicted_remaining_tokens)
        switch = self.config.inlaid_task_switch_tokens
        new = sorted((t for t in best if t and t not in running),
                     key=lambda t: best[t] + (0 if t in self.last_step_tasks else switch))[:max(0, free)]
        eligible = running | set(new) | {""}
        hidden = [s for s in self.waiting if s.task not in eligible and not self.is_hungry(s, now_s)]
        hidden_ids = {id(s) for s in hidden}
        self.waiting = [s for s in self.waiting if id(s) not in hidden_ids]
        try:
            return super()._prefill(now_s)
        finally:
            self.waiting += hidden


def variant(name: str, base):
    """(scheduler class, SchedulerConfig, label) of a variant name."""
    if name == "inlaid-admit-beta":
        return AdmitWithinBeta, dataclasses.replace(base, inlaid_full_batch_streak_factor=1), \
            "inlaid-old + β-aware admission (candidate)"
    policy, overrides, label = SCALE_VARIANTS.get(name, (name, {}, name))
    return POLICIES[policy], dataclasses.replace(base, **overrides), label


def recording(cls, pools: list[tuple[int, int]]):
    """cls whose decode steps append (running sequences, running tasks) to `pools`: what stalls."""
    class Recording(cls):
        def _decode(self, now_s: float):
            pools.append((len(self.running), len({s.task for s in self.running})))
            return super()._decode(now_s)
    return Recording


def run(name: str, trace, base, cost, sim_cfg, **extra) -> dict:
    cls, cfg, label = variant(name, base)
    t0 = time.perf_counter()
    pools: list[tuple[int, int]] = []
    res = Simulator(recording(cls, pools), cfg, cost, sim_cfg).run(trace)
    dec = [s for s in res.steps if s.num_prefill_tokens == 0]
    pre = [s for s in res.steps if s.num_prefill_tokens > 0]
    end_s = trace[-1].arrival_s
    row = dict(res.metrics, variant=name, label=label, num_trace_requests=len(trace),
               offered_rate_req_s=len(trace) / end_s, busy_s=sum(s.step_s for s in res.steps),
               # finished while requests still arrive: capacity without the drain after the last arrival
               window_throughput_req_s=sum(r.finished_s <= end_s for r in res.requests) / end_s,
               pool_seqs_at_decode=statistics.fmean(p[0] for p in pools) if pools else math.nan,
               pool_tasks_at_decode=statistics.fmean(p[1] for p in pools) if pools else math.nan,
               decode_steps=len(dec), decode_batch=statistics.fmean(s.num_decode_seqs for s in dec),
               decode_adapters=statistics.fmean(s.num_adapters for s in dec), prefill_steps=len(pre),
               prefill_tokens=statistics.fmean(s.num_prefill_tokens for s in pre),
               sim_wall_s=time.perf_counter() - t0, **extra)
    print(f"  {str(extra):48s} {name:18s} thr {row['throughput_req_s']:6.2f} req/s | decode {len(dec):5d} x "
          f"{row['decode_batch']:5.1f} | prefill {len(pre):4d} | JCT {row['jct_avg_s']:.2f} s | TTFT p99 "
          f"{row['ttft_p99_s']:.2f} s | SLO {row['slo_attainment']:.3f}", flush=True)
    return row


MEAN_KEYS = ("throughput_req_s", "window_throughput_req_s", "throughput_tok_s", "offered_rate_req_s",
             "latency_avg_s_per_token",
             "jct_avg_s", "jct_p99_s", "ttft_avg_s", "ttft_p99_s", "slo_attainment", "busy_s", "decode_steps",
             "decode_batch", "decode_adapters", "pool_seqs_at_decode", "pool_tasks_at_decode", "prefill_steps",
             "prefill_tokens", "num_preemptions")


def mean_rows(rows: list[dict], group: tuple[str, ...]) -> list[dict]:
    """Mean (and sd of throughput) over seeds of the rows sharing the `group` keys."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in group), []).append(r)
    means = []
    for key, rs in out.items():
        m = {k: statistics.fmean(r[k] for r in rs) for k in MEAN_KEYS}
        m["throughput_sd"] = statistics.stdev(r["throughput_req_s"] for r in rs) if len(rs) > 1 else 0.0
        means.append(dict(zip(group, key), label=rs[0]["label"], num_seeds=len(rs), **m))
    return means


def losses(rows: list[dict], lo: int = 2, hi: int = 100) -> dict[str, list[float]]:
    """Per variant, per seed: 1 - throughput(hi tasks) / throughput(lo tasks) on the same seed."""
    thr = {(r["variant"], r["num_tasks"], r["seed"]): r["throughput_req_s"] for r in rows}
    out: dict[str, list[float]] = {}
    for (v, n, seed), t in thr.items():
        if n == hi and (v, lo, seed) in thr:
            out.setdefault(v, []).append(1.0 - t / thr[(v, lo, seed)])
    return out


SCALE_COLS = [("num_tasks", "tasks", "d"), ("label", "variant", ""), ("throughput_req_s", "req/s", ".2f"),
              ("throughput_sd", "± sd", ".2f"), ("window_throughput_req_s", "req/s in window", ".2f"),
              ("decode_steps", "decode steps", ".0f"), ("decode_batch", "decode batch", ".1f"),
              ("pool_seqs_at_decode", "running seqs", ".1f"), ("pool_tasks_at_decode", "running tasks", ".1f"),
              ("prefill_steps", "prefill steps", ".0f"), ("busy_s", "busy s", ".1f"), ("jct_avg_s", "JCT avg s", ".2f"),
              ("ttft_p99_s", "TTFT p99 s", ".2f"), ("slo_attainment", "SLO", ".3f")]
MAIN_COLS = [("load_frac", "load", ".1f"), ("label", "variant", ""), ("throughput_req_s", "req/s", ".2f"),
             ("latency_avg_s_per_token", "latency s/tok", ".4f"), ("jct_avg_s", "JCT avg s", ".3f"),
             ("jct_p99_s", "JCT p99 s", ".2f"), ("ttft_p99_s", "TTFT p99 s", ".2f"),
             ("slo_attainment", "SLO", ".3f"), ("decode_steps", "decode steps", ".0f"),
             ("prefill_steps", "prefill steps", ".0f")]


def _pct(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):+.1%} (seeds: {', '.join(f'{x:+.1%}' for x in xs)})"


def _reading(res: dict, repro: list[dict], sm: list[dict]) -> list[str]:
    def at(v, n):
        return next(r for r in sm if r["variant"] == v and r["num_tasks"] == n)
    if len(repro) < 3 or not all(any(r["variant"] == v and r["num_tasks"] == 100 for r in sm)
                                 for v in ("inlaid", "inlaid-old", "inlaid-admit-beta")):
        return []
    r100, old, new, adm = repro[2], at("inlaid-old", 100), at("inlaid", 100), at("inlaid-admit-beta", 100)
    return ["## Reading", "",
            f"- The simulator reproduces the GPU run's decode-batch shrink on its own traces (100 tasks: "
            f"{r100['old_dec']} decode steps of {r100['old_batch']:.1f} vs {r100['real_dec']} of "
            f"{r100['real_batch']:.1f} measured) and its loss. The serve_gpu.md simulator rows lost only a few % "
            "because they replayed 60 s of arrivals: a 5 s replay is dominated by the drain after the last "
            "arrival, when the backlog of rare tasks' requests (about one request per task) is served at most "
            "β tasks per step in small batches ('req/s in window' vs 'req/s').",
            f"- Stalled sequences are not what costs: on those traces the running pool at a decode step held "
            f"{r100['old_pool']:.1f} sequences for a batch of {r100['old_batch']:.1f}; with 25 s traces "
            f"{old['pool_seqs_at_decode']:.1f} for {old['decode_batch']:.1f}. The β-aware admission candidate "
            f"removes the stalls ({adm['pool_seqs_at_decode']:.1f} running, batch {adm['decode_batch']:.1f}) "
            f"and changes nothing else ({adm['throughput_req_s']:.2f} vs {old['throughput_req_s']:.2f} req/s, "
            f"{adm['decode_steps']:.0f} vs {old['decode_steps']:.0f} decode steps) while its latency and SLO get "
            "worse: a stalled sequence costs no step time, and it is ready when a task slot frees, where the "
            "candidate leaves the slot empty until the next prefill.",
            "- What costs is slot-bound decoding plus prefill steps: with 100 tasks every decode step has its β "
            "slots taken (about 4 of 10 by a task with a single running request), and a prefill step costs ~35 ms (the "
            "[prefill step] term: no CUDA graph) ≈ 4 decode steps, taken every `max_decode_streak` decode steps "
            "while requests wait. Admitting then mostly moves requests of tasks without a slot into the pool.",
            f"- The change: while the running pool holds β tasks, prefill waits "
            f"`inlaid_full_batch_streak_factor` × the streak. At 100 tasks prefill steps fall from "
            f"{old['prefill_steps']:.0f} to {new['prefill_steps']:.0f}, busy time from {old['busy_s']:.1f} to "
            f"{new['busy_s']:.1f} s, JCT from {old['jct_avg_s']:.2f} to {new['jct_avg_s']:.2f} s and SLO rises "
            f"from {old['slo_attainment']:.3f} to {new['slo_attainment']:.3f}; the decode batch is smaller "
            f"({new['decode_batch']:.1f}) because fewer requests wait in the pool. With 2 tasks the pool never "
            "holds β tasks, so nothing changes; with 10 it seldom does. TTFT p99 stays at the starvation "
            "limit: under overload the requests of rare "
            "tasks still wait for the guard.", ""]


def report(res: dict) -> str:
    m, c = res["meta"], res["meta"]["cost_model"]
    real = {r["num_tasks"]: r for r in res["real_scale"] if r["variant"].startswith("inlaid,")}
    stats = {s["run"]: s for s in res["real_step_stats"]}
    repro = []
    for n in sorted(real):
        st = stats.get(f"inlaid, {n} tasks", {})
        old, new = (next(r for r in res["repro"] if r["num_tasks"] == n and r["variant"] == v)
                    for v in ("inlaid-old", "inlaid"))
        repro.append({"n": n, "real": real[n]["throughput_req_s"], "real_dec": st.get("decode_steps"),
                      "real_batch": st.get("decode_batch"), "real_pre": st.get("prefill_steps"),
                      "old": old["throughput_req_s"], "old_dec": old["decode_steps"], "old_batch": old["decode_batch"],
                      "old_pool": old["pool_seqs_at_decode"], "old_pre": old["prefill_steps"],
                      "new": new["throughput_req_s"], "new_dec": new["decode_steps"],
                      "new_batch": new["decode_batch"], "new_pre": new["prefill_steps"]})
    sm = sorted(res["scale_mean"], key=lambda r: (r["num_tasks"], r["variant"] != "inlaid"))
    mm = sorted(res["main_mean"], key=lambda r: (r["load_frac"], r["variant"] != "inlaid"))
    md = [f"# Simulated task-count scaling of the inlaid policy (commit {m['git_commit']})", "",
          f"Device: {m['device']}; nothing here ran on a GPU. Command: `{m['command']}` ({m['wall_s']:.0f} s).",
          f"Cost model ({m['cost_model_from']}; {c['source']}): t = {c['a_s']:.3g} + "
          f"{c['b_s_per_prefill_token']:.3g}·prefill_tokens + {c['c_s_per_decode_seq']:.3g}·decode_seqs + "
          f"{c['d_s_per_adapter']:.3g}·adapters + {c['g_s_per_prefill_step']:.3g}·[prefill step] s.",
          f"Engine as in the GPU run: {m['sim_config']['num_kv_blocks']} KV blocks of {m['sim_config']['block_size']} "
          f"tokens, max {m['scheduler_config']['max_num_seqs']} running, "
          f"{m['scheduler_config']['max_num_batched_tokens']} tokens/step, β = "
          f"{m['scheduler_config']['max_adapters_per_batch']}, decode streak "
          f"{m['scheduler_config']['max_decode_streak']}, starvation "
          f"{m['scheduler_config']['starvation_limit_s']:g} s. "
          f"C = {m['fifo_capacity_req_s']:.2f} req/s (FIFO capacity measured in that run); scaling rate "
          f"{m['scale_rate_req_s']:.2f} req/s = 1.3 × C. Workloads from benchmarks/serve_gpu_workload.py "
          "(bench_serve_gpu's generator): scale = lengths pooled over all families whatever the task, Zipf(1.0) "
          "popularity, Poisson arrivals; main = 21 tasks, per-family lengths. Variants: **inlaid** (this commit: "
          "while the running pool holds β tasks, prefill waits `inlaid_full_batch_streak_factor` = "
          f"{m['scheduler_config']['inlaid_full_batch_streak_factor']} × the decode streak), **inlaid-old** "
          "(factor 1, the previous rule), the issue's **β-aware admission** candidate (on the old rule), fifo.",
          "Throughput = finished requests / (last finish − first arrival), as in the GPU bench; 'req/s in window' "
          "counts only requests finished before the last arrival (no drain). running seqs/tasks = the running pool "
          "at decode steps (decode batch < running seqs: sequences held their KV and stalled).", "",
          "## The GPU run's traces (5 s of arrivals, seed 20): real engine vs simulator", "",
          table(repro, [("n", "tasks", "d"), ("real", "real req/s", ".2f"), ("real_dec", "real decode steps", "d"),
                        ("real_batch", "real batch", ".1f"), ("real_pre", "real prefill steps", "d"),
                        ("old", "sim old req/s", ".2f"), ("old_dec", "decode steps", "d"),
                        ("old_batch", "batch", ".1f"), ("old_pool", "running seqs", ".1f"),
                        ("old_pre", "prefill steps", "d"), ("new", "sim new req/s", ".2f"),
                        ("new_dec", "decode steps", "d"), ("new_batch", "batch", ".1f"),
                        ("new_pre", "prefill steps", "d")]), "",
          f"Loss 2 → 100 tasks: real {1 - repro[2]['real'] / repro[0]['real']:+.1%}, sim old "
          f"{1 - repro[2]['old'] / repro[0]['old']:+.1%}, sim new {1 - repro[2]['new'] / repro[0]['new']:+.1%}."
          if len(repro) > 2 else "", "",
          f"## Scaling at 1.3 × C, {m['window_s']:g} s of arrivals, mean of seeds {m['seeds']}", "",
          table(sm, SCALE_COLS), ""]
    md += [f"- throughput loss 2 → 100 tasks, {v}: {_pct(ls)}" for v, ls in res["scale_loss_2_to_100"].items()]
    md += ["", "(running seqs/tasks: nan for fifo, which has no decode-time task choice.)", "",
           f"With {m['gpu_window_s']:g} s of arrivals (bench_serve_gpu's scale default now), same seeds:"]
    md += [f"- throughput loss 2 → 100 tasks, {v}: {_pct(ls)}" for v, ls in res["gpu_window_loss_2_to_100"].items()]
    md += [""] + _reading(res, repro, sm)
    md += ["", f"## Main workload (21 tasks) at 0.5 / 0.8 / 1.1 × C, {m['window_s']:g} s of arrivals, mean of "
           f"seeds {[s - 10 for s in m['seeds']]}", "", table(mm, MAIN_COLS), ""]
    for frac in dict.fromkeys(r["load_frac"] for r in mm):
        new, old, fifo = (next((r for r in mm if r["load_frac"] == frac and r["variant"] == v), None)
                          for v in ("inlaid", "inlaid-old", "fifo"))
        if new and old and fifo:
            md.append(f"- {frac:.1f} × C: inlaid / inlaid-old throughput "
                      f"{new['throughput_req_s'] / old['throughput_req_s']:.3f}, "
                      f"latency {new['latency_avg_s_per_token'] / old['latency_avg_s_per_token']:.3f}, JCT "
                      f"{new['jct_avg_s'] / old['jct_avg_s']:.3f}, SLO {new['slo_attainment']:.3f} vs "
                      f"{old['slo_attainment']:.3f}; vs fifo: JCT {fifo['jct_avg_s'] / new['jct_avg_s']:.2f}× lower, "
                      f"SLO {new['slo_attainment']:.3f} vs {fifo['slo_attainment']:.3f}")
    return "\n".join(md + [""])


def setup(path: Path):
    data = json.loads(path.read_text())
    meta, sc = data["meta"], data["scale"]["_meta"]
    cost = CostModel.from_dict(sc["cost_model"])
    base = EngineConfig(max_num_seqs=meta["max_num_seqs"], max_num_batched_tokens=meta["max_batched_tokens"],
                        max_adapters=meta["adapter_slots"], max_adapters_per_batch=meta["beta"],
                        max_decode_streak=meta["max_decode_streak"],
                        starvation_limit_s=meta["starvation_limit_s"]).scheduler_config()
    sim_cfg = SimConfig(num_kv_blocks=meta["num_kv_blocks"], block_size=meta["block_size"], max_tokens=512,
                        slo_scale=meta["slo_scale"])
    return data, cost, sc["fifo_capacity_req_s"], base, sim_cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", default=str(RESULTS / "serve_gpu.json"), help="GPU run: cost model, C, config")
    ap.add_argument("--window-s", type=float, default=25.0, help="arrival window of the scale and main traces")
    ap.add_argument("--gpu-window-s", type=float, default=12.0, help="also 2 vs 100 tasks at this window")
    ap.add_argument("--seeds", default="20,21,22", help="trace seeds (20 = the GPU run's scale seed)")
    ap.add_argument("--scale-tasks", default="2,10,100,1000")
    ap.add_argument("--scale-frac", type=float, default=1.3)
    ap.add_argument("--rates", default="0.5,0.8,1.1", help="main workload rates, fractions of C")
    ap.add_argument("--variants", default="inlaid,inlaid-old,inlaid-admit-beta,fifo")
    ap.add_argument("--out", default=str(RESULTS / "sim_scale"))
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    counts = [int(x) for x in args.scale_tasks.split(",")]
    names = args.variants.split(",")
    data, cost, capacity, base, sim_cfg = setup(Path(args.measured))
    meta = data["meta"]
    lengths = family_lengths(ROOT / "data" / "lengths.jsonl")
    families = list(lengths)
    rate = args.scale_frac * capacity
    t0 = time.perf_counter()

    def trace(count, window_s, seed, pooled, r=rate, prefix="s"):
        return make_trace(task_names(count, families), lengths, r, window_s, seed, zipf_a=meta["zipf_a"],
                          pred_sigma=meta["pred_sigma"], prefix=f"{prefix}{count}-", pooled=pooled)

    print(f"cost model: {cost.source}; C = {capacity:.2f} req/s; scale rate {rate:.2f} req/s", flush=True)
    print("repro: the GPU run's scaling traces (5 s of arrivals, seed 20)", flush=True)
    repro = [run(v, trace(n, 5.0, 20, True), base, cost, sim_cfg, num_tasks=n, seed=20)
             for n in counts for v in ("inlaid-old", "inlaid")]
    print(f"scale: {args.window_s:g} s of arrivals, seeds {seeds}", flush=True)
    scale = [run(v, tr, base, cost, sim_cfg, num_tasks=n, seed=s)
             for n in counts for s in seeds for tr in [trace(n, args.window_s, s, True)] for v in names]
    print(f"gpu window: {args.gpu_window_s:g} s of arrivals (bench_serve_gpu's scale default)", flush=True)
    gpu_window = [run(v, tr, base, cost, sim_cfg, num_tasks=n, seed=s)
                  for n in (2, 100) for s in seeds for tr in [trace(n, args.gpu_window_s, s, True)]
                  for v in ("inlaid", "inlaid-old")]
    print("main: 21 tasks, per-family lengths", flush=True)
    # The GPU main section's traces use seed + 10 (scale: seed + 20): seeds 20.. map to 10..
    main_rows = [run(v, tr, base, cost, sim_cfg, load_frac=f, seed=s - 10)
                 for f in (float(x) for x in args.rates.split(",")) for s in seeds
                 for tr in [trace(meta["num_tasks"], args.window_s, s - 10, False, f * capacity, f"m{f}-")]
                 for v in names]
    result = {
        "meta": {"benchmark": "bench_sim_scale (simulated; the engine's policy classes on a virtual clock)",
                 "device": "this CPU, simulated: step times from the H100 cost model below",
                 "git_commit": git_commit() + ("+uncommitted" if subprocess.run(
                     ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                     cwd=ROOT).stdout.strip() else ""), "command": " ".join(["python", "benchmarks/bench_sim_scale.py"]
                                                               + sys.argv[1:]),
                 "cost_model": cost.to_dict(),
                 "cost_model_from": f"{Path(args.measured).resolve().relative_to(ROOT)}: scale._meta.cost_model "
                                    f"(GPU run {data['scale']['_meta']['git_commit']})",
                 "fifo_capacity_req_s": capacity, "scale_rate_req_s": rate, "window_s": args.window_s,
                 "gpu_window_s": args.gpu_window_s,
                 "seeds": seeds, "scheduler_config": dataclasses.asdict(base),
                 "sim_config": dataclasses.asdict(sim_cfg), "wall_s": time.perf_counter() - t0},
        "real_scale": [{k: r.get(k) for k in ("variant", "num_tasks", "throughput_req_s", "ttft_p99_s")}
                       for r in data["scale"]["real"]],
        "real_step_stats": data["scale"].get("step_stats", []),
        "repro": repro, "scale": scale, "scale_mean": mean_rows(scale, ("variant", "num_tasks")),
        "scale_loss_2_to_100": losses(scale), "gpu_window": gpu_window,
        "gpu_window_loss_2_to_100": losses(gpu_window), "main": main_rows,
        "main_mean": mean_rows(main_rows, ("variant", "load_frac")),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(report(result))
    for v, ls in result["scale_loss_2_to_100"].items():
        print(f"loss 2 -> 100 tasks, {v}: {statistics.fmean(ls):+.1%} (per seed {', '.join(f'{x:+.1%}' for x in ls)})")
    print(f"wrote {out.with_suffix('.md')} and .json in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
