"""Simulated task-count scaling of the inlaid policy with measured H100 cost models (CPU, virtual clock).

Replays bench_serve_gpu's workloads through the engine's policy classes on the simulator, once per GPU
run given with --measured (its fitted step-time model, its FIFO capacity C, its engine settings):

  repro  that run's own scaling traces (its arrival window, seed 20, cut at its replay deadline):
         real engine vs simulator, decode steps and batch
  scale  2/10/100/1000 tasks at 1.3 × C, lengths pooled over all families, several seeds
  main   21 tasks with per-family lengths at 0.5/0.8/1.1 × C (the GPU main section's workload)

A GPU run's JSON is read in either layout: `scale._meta.{cost_model, fifo_capacity_req_s}` (the
calib+scale re-run stored in results/serve_gpu.json, 5 s scaling window) or
`calibration.{cost_model, fifo_capacity_req_s}` with `meta.scale_window_s` (bench_serve_gpu now).

Variants: inlaid (default config), inlaid-per-seq (inlaid_decode_task_rank = "srtf_per_seq"),
inlaid-old (inlaid_full_batch_streak_factor = 1), inlaid-beta-inf (β = ∞: what the task cap costs),
fifo; inlaid-admit-beta (β-aware admission, measured earlier and not adopted) on request.

    .venv/bin/python benchmarks/bench_sim_scale.py \\
        --measured benchmarks/results/serve_gpu.json,/work/.device/8/serve_gpu.json
"""
from __future__ import annotations

import argparse
import csv
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

from bench_sim import git_commit, repo_path, table  # noqa: E402
from serve_gpu_fit import run_settings, scale_variant  # noqa: E402
from serve_gpu_workload import family_lengths, make_trace, task_names  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.policies.batching import group_by_task  # noqa: E402
from services.engine.scheduler import SchedulerConfig  # noqa: E402
from services.engine.policies.inlaid import InlaidScheduler  # noqa: E402
from services.engine.simulator.cost_model import FEATURES, CostModel, StepFeatures  # noqa: E402
from services.engine.simulator.metrics import summarize  # noqa: E402
from services.engine.simulator.simulator import Simulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class AdmitWithinBeta(InlaidScheduler):
    """The issue's candidate: the running pool's tasks count against β, and a task new to the pool
    is admitted only into a free slot (hungry requests excepted), so decode can run the whole pool.
    Measured here earlier and not adopted (it changed nothing but latency); kept to reproduce that."""

    def _prefill(self, now_s: float, decode_rows: int):
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
            return super()._prefill(now_s, decode_rows)
        finally:
            self.waiting += hidden


def variant(name: str, base):
    """(scheduler class, SchedulerConfig, label) of a variant name."""
    if name == "inlaid-admit-beta":
        return AdmitWithinBeta, dataclasses.replace(base, inlaid_full_batch_streak_factor=1), \
            "inlaid-old + β-aware admission (candidate)"
    if name == "inlaid-beta-inf":
        return POLICIES["inlaid"], dataclasses.replace(base, max_adapters_per_batch=0), "inlaid, β = ∞ (bound)"
    policy, overrides, label = scale_variant(name)
    return POLICIES[policy], dataclasses.replace(base, **overrides), label


def recording(cls, pools: list[tuple[int, int, int]], starts: list[float]):
    """cls that records, per decode step, (running sequences, running tasks, tasks decoded with a
    single sequence), and the start time of every non-empty step (for a deadline cut)."""
    class Recording(cls):
        def schedule(self):
            out = super().schedule()
            if not out.is_empty:
                starts.append(self.clock())
            return out

        def _decode(self, now_s: float, among=None, allowed=None, protected=()):
            running, tasks = len(self.running), len({s.task for s in self.running})
            decode, preempted = super()._decode(now_s, among, allowed, protected)
            if among is None:   # a decode-only step (a decode joining prefills is not one)
                pools.append((running, tasks, sum(len(g) == 1 for t, g in group_by_task(decode).items() if t)))
            return decode, preempted
    return Recording


def run(name: str, trace, m: dict, deadline_s: float = math.inf, **extra) -> dict:
    """One simulated replay → one row; with deadline_s, only what finished (steps, requests) before
    it counts, as in bench_serve_gpu's replays, which stop there."""
    cls, cfg, label = variant(name, m["base"])
    t0 = time.perf_counter()
    pools: list[tuple[int, int, int]] = []
    starts: list[float] = []
    res = Simulator(recording(cls, pools, starts), cfg, m["cost"], m["sim_cfg"]).run(trace)
    steps = [s for s, t in zip(res.steps, starts) if t + s.step_s <= deadline_s]
    records = [r for r in res.requests if r.finished_s <= deadline_s]
    pools = pools[:sum(s.num_prefill_tokens == 0 for s in steps)]
    metrics = summarize(records, steps, m["sim_cfg"].slo_scale) if deadline_s < math.inf else res.metrics
    dec = [s for s in steps if s.num_prefill_tokens == 0]
    pre = [s for s in steps if s.num_prefill_tokens > 0]
    end_s = trace[-1].arrival_s

    def mean(xs):
        return statistics.fmean(xs) if xs else math.nan
    row = dict(metrics, variant=name, label=label, num_trace_requests=len(trace),
               num_unfinished=len(trace) - len(records), offered_rate_req_s=len(trace) / end_s,
               busy_s=sum(s.step_s for s in steps),
               # finished while requests still arrive: capacity without the drain after the last arrival
               window_throughput_req_s=sum(r.finished_s <= end_s for r in records) / end_s,
               pool_seqs_at_decode=mean([p[0] for p in pools]), pool_tasks_at_decode=mean([p[1] for p in pools]),
               decode_single_tasks=mean([p[2] for p in pools]),
               decode_steps=len(dec), decode_batch=mean([s.num_decode_seqs for s in dec]),
               decode_adapters=mean([s.num_adapters for s in dec]), prefill_steps=len(pre),
               prefill_tokens=mean([s.num_prefill_tokens for s in pre]),
               sim_wall_s=time.perf_counter() - t0, **extra)
    print(f"  {m['label']:8s} {str(extra):40s} {name:16s} thr {row['throughput_req_s']:6.2f} req/s | decode "
          f"{len(dec):5d} x {row['decode_batch']:5.1f} | prefill {len(pre):4d} | JCT {row['jct_avg_s']:.2f} s | "
          f"TTFT p99 {row['ttft_p99_s']:.2f} s | SLO {row['slo_attainment']:.3f}", flush=True)
    return row


MEAN_KEYS = ("throughput_req_s", "window_throughput_req_s", "throughput_tok_s", "offered_rate_req_s",
             "latency_avg_s_per_token", "jct_avg_s", "jct_p99_s", "ttft_avg_s", "ttft_p99_s", "slo_attainment",
             "busy_s", "decode_steps", "decode_batch", "decode_adapters", "decode_single_tasks",
             "pool_seqs_at_decode", "pool_tasks_at_decode", "prefill_steps", "prefill_tokens", "num_preemptions")


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
              ("decode_single_tasks", "1-seq tasks/decode", ".1f"), ("pool_seqs_at_decode", "running seqs", ".1f"),
              ("pool_tasks_at_decode", "running tasks", ".1f"), ("prefill_steps", "prefill steps", ".0f"),
              ("busy_s", "busy s", ".1f"), ("jct_avg_s", "JCT avg s", ".2f"), ("ttft_p99_s", "TTFT p99 s", ".2f"),
              ("slo_attainment", "SLO", ".3f")]
MAIN_COLS = [("load_frac", "load", ".1f"), ("label", "variant", ""), ("throughput_req_s", "req/s", ".2f"),
             ("latency_avg_s_per_token", "latency s/tok", ".4f"), ("jct_avg_s", "JCT avg s", ".3f"),
             ("jct_p99_s", "JCT p99 s", ".2f"), ("ttft_p99_s", "TTFT p99 s", ".2f"),
             ("slo_attainment", "SLO", ".3f"), ("decode_steps", "decode steps", ".0f"),
             ("prefill_steps", "prefill steps", ".0f")]
REPRO_COLS = [("n", "tasks", "d"), ("variant", "variant", ""), ("real", "real req/s", ".2f"),
              ("real_dec", "real decode steps", "d"), ("real_batch", "real batch", ".1f"),
              ("real_pre", "real prefill steps", "d"), ("real_busy", "real busy s", ".1f"),
              ("sim", "sim req/s", ".2f"), ("sim_dec", "sim decode steps", "d"), ("sim_batch", "sim batch", ".1f"),
              ("sim_pre", "sim prefill steps", "d"), ("sim_busy", "sim busy s", ".1f"),
              ("sim_single", "1-seq tasks/decode", ".1f"), ("new", "per-seq sim req/s", ".2f"),
              ("new_dec", "per-seq decode steps", "d"), ("new_batch", "per-seq batch", ".1f")]
COST_COLS = [("n", "tasks", "d"), ("variant", "variant", ""),
             ("model_dec", "calib model / real: decode time", ".2f"), ("model_pre", "prefill time", ".2f"),
             ("fit_dec", "replay-fit model / real: decode time", ".2f"), ("fit_pre", "prefill time", ".2f"),
             ("real", "real req/s", ".2f"), ("fit", "sim (replay fit) req/s", ".2f"),
             ("real_dec", "real decode steps", "d"), ("fit_dec_steps", "sim decode steps", "d"),
             ("real_batch", "real batch", ".1f"), ("fit_batch", "sim batch", ".1f"),
             ("real_pre", "real prefill steps", "d"), ("fit_pre_steps", "sim prefill steps", "d")]


def _pct(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):+.1%} (seeds: {', '.join(f'{x:+.1%}' for x in xs)})"


def repro_rows(model: dict) -> list[dict]:
    """The real scaling rows of a GPU run beside the simulator's on the same traces."""
    stats = {s["run"]: s for s in model["real_step_stats"]}
    sims = {(r["variant"], r["num_tasks"]): r for r in model["repro"]}
    ratios, fit_ratios = model.get("cost_on_real_steps", {}), model.get("fit_on_real_steps", {})
    fits = {(r["variant"], r["num_tasks"]): r for r in model.get("repro_fit", [])}
    rows = []
    for real in model["real_scale"]:
        v, n = real["policy"], real["num_tasks"]
        st, sim = stats.get(real["variant"], {}), sims.get((v, n))
        new = sims.get(("inlaid-per-seq", n))
        if sim is None or new is None:
            continue
        ratio, fit_ratio, fit = ratios.get(real["variant"], {}), fit_ratios.get(real["variant"], {}), fits.get((v, n))
        rows.append({"n": n, "variant": v, "real": real["throughput_req_s"], "real_dec": st.get("decode_steps", 0),
                     "real_batch": st.get("decode_batch", math.nan), "real_pre": st.get("prefill_steps", 0),
                     "real_busy": st.get("busy_s", math.nan), "sim": sim["throughput_req_s"],
                     "sim_dec": sim["decode_steps"], "sim_batch": sim["decode_batch"], "sim_pre": sim["prefill_steps"],
                     "sim_busy": sim["busy_s"], "sim_single": sim["decode_single_tasks"],
                     "new": new["throughput_req_s"], "new_dec": new["decode_steps"], "new_batch": new["decode_batch"],
                     "model_dec": ratio.get("decode", math.nan), "model_pre": ratio.get("prefill", math.nan),
                     "fit_dec": fit_ratio.get("decode", math.nan), "fit_pre": fit_ratio.get("prefill", math.nan),
                     "fit": fit["throughput_req_s"] if fit else math.nan,
                     "fit_dec_steps": fit["decode_steps"] if fit else 0,
                     "fit_batch": fit["decode_batch"] if fit else math.nan,
                     "fit_pre_steps": fit["prefill_steps"] if fit else 0})
    return rows


def repro_loss(rows: list[dict], key: str, v: str) -> float | None:
    by_n = {r["n"]: r[key] for r in rows if r["variant"] == v}
    return 1.0 - by_n[100] / by_n[2] if 2 in by_n and 100 in by_n else None


def model_report(m: dict, meta: dict) -> list[str]:
    c = m["cost_model"]
    rr = repro_rows(m)
    md = [f"## Cost model of GPU run {m['gpu_commit']} ({m['source_file']})", "",
          f"t = {c['a_s']:.4g} + {c['b_s_per_prefill_token']:.4g}·prefill_tokens + "
          f"{c['c_s_per_decode_seq']:.4g}·decode_seqs + {c['d_s_per_adapter']:.4g}·adapters + "
          f"{c['e_s_per_kv_token']:.3g}·kv_tokens + {c['g_s_per_prefill_step']:.4g}·[prefill step] s "
          f"({c['source']}). C = {m['fifo_capacity_req_s']:.2f} req/s (FIFO capacity measured in that run); "
          f"scaling rate {m['scale_rate_req_s']:.2f} req/s = {meta['scale_frac']:g} × C.", "",
          f"### That run's own scaling traces ({m['repro_window_s']:g} s of arrivals, seed 20, cut at "
          f"{m['repro_deadline_s']:g} s like the replay): real engine vs simulator", "",
          table(rr, REPRO_COLS), ""]
    for v in dict.fromkeys(r["variant"] for r in rr):
        real, sim = repro_loss(rr, "real", v), repro_loss(rr, "sim", v)
        if real is not None:
            md.append(f"- loss 2 → 100 tasks, {v}: real {real:+.1%}, sim {sim:+.1%}")
    if m.get("replay_fit"):
        f = m["replay_fit"]
        md += ["", "Step times: the calibration model and a model fitted to this run's scaling replays of "
               f"≤ 100 tasks (t = {f['a_s']:.4g} + {f['b_s_per_prefill_token']:.4g}·prefill_tokens + "
               f"{f['c_s_per_decode_seq']:.4g}·decode_seqs + {f['d_s_per_adapter']:.4g}·adapters + "
               f"{f['e_s_per_kv_token']:.3g}·kv_tokens + {f['g_s_per_prefill_step']:.4g}·[prefill step] s; "
               f"{f['source']}), each applied to the measured steps (model time / measured time), and the "
               "simulator rerun on the same traces with the replay fit:", "", table(rr, COST_COLS)]
        for v in dict.fromkeys(r["variant"] for r in rr):
            fit = repro_loss(rr, "fit", v)
            if fit is not None:
                md.append(f"- loss 2 → 100 tasks, {v}: sim with the replay fit {fit:+.1%}")
    sm = sorted(m["scale_mean"], key=lambda r: (r["num_tasks"], meta["scale_variants"].index(r["variant"])))
    md += ["", f"### Scaling at {meta['scale_frac']:g} × C, {meta['window_s']:g} s of arrivals, mean of seeds "
           f"{meta['seeds']}", "", table(sm, SCALE_COLS), ""]
    md += [f"- throughput loss 2 → 100 tasks, {v}: {_pct(ls)}" for v, ls in m["scale_loss_2_to_100"].items()]
    md += [f"- throughput loss 2 → 1000 tasks, {v}: {_pct(ls)}" for v, ls in m["scale_loss_2_to_1000"].items()]
    mm = sorted(m["main_mean"], key=lambda r: (r["load_frac"], meta["main_variants"].index(r["variant"])))
    md += ["", f"### Main workload ({meta['num_tasks']} tasks) at {meta['rates']} × C, {meta['window_s']:g} s of "
           f"arrivals, mean of seeds {[s - 10 for s in meta['seeds']]}", "", table(mm, MAIN_COLS), ""]
    for frac in dict.fromkeys(r["load_frac"] for r in mm):
        new, cur = (next((r for r in mm if r["load_frac"] == frac and r["variant"] == v), None)
                    for v in ("inlaid-per-seq", "inlaid"))
        if new and cur:
            md.append(f"- {frac:.1f} × C, inlaid-per-seq / inlaid: throughput "
                      f"{new['throughput_req_s'] / cur['throughput_req_s']:.3f}, "
                      f"JCT {new['jct_avg_s'] / cur['jct_avg_s']:.3f}, "
                      f"TTFT p99 {new['ttft_p99_s'] / cur['ttft_p99_s']:.3f}, SLO {new['slo_attainment']:.3f} vs "
                      f"{cur['slo_attainment']:.3f}")
    return md + [""]


def report(res: dict) -> str:
    meta = res["meta"]
    names = list(dict.fromkeys([*meta["scale_variants"], *meta.get("main_variants", [])]))
    labels = ", ".join(f"**{v}**: {variant(v, SchedulerConfig())[2]}" for v in names)
    md = [f"# Simulated task-count scaling of the inlaid policy (commit {meta['git_commit']})", "",
          f"Device: {meta['device']}; nothing here ran on a GPU. Command: `{meta['command']}` "
          f"({meta['wall_s']:.0f} s).",
          f"Engine as in the GPU runs: {meta['sim_config']['num_kv_blocks']} KV blocks of "
          f"{meta['sim_config']['block_size']} tokens, max {meta['scheduler_config']['max_num_seqs']} running, "
          f"{meta['scheduler_config']['max_num_batched_tokens']} tokens/step, β = "
          f"{meta['scheduler_config']['max_adapters_per_batch']}, decode streak "
          f"{meta['scheduler_config']['max_decode_streak']}, full-batch streak factor "
          f"{meta['scheduler_config']['inlaid_full_batch_streak_factor']}, starvation "
          f"{meta['scheduler_config']['starvation_limit_s']:g} s. Workloads from benchmarks/serve_gpu_workload.py "
          "(bench_serve_gpu's generator, same seeds and trace construction): scale = lengths pooled over all "
          "families whatever the task, Zipf(1.0) popularity, Poisson arrivals; main = 21 tasks, per-family lengths.",
          f"Variants ({labels}); **inlaid** runs each GPU run's own inlaid settings (inlaid_beta_fill = "
          f"{meta['scheduler_config'].get('inlaid_beta_fill', 0.0):g} here: the strict cap unless the run recorded "
          "the fill rule).",
          "Throughput = finished requests / (last finish − first arrival), as in the GPU bench; 'req/s in window' "
          "counts only requests finished before the last arrival (no drain); '1-seq tasks/decode' = tasks in a "
          "decode batch with a single sequence; running seqs/tasks = the running pool at decode steps.", ""]
    md += res.get("reading", [])
    for m in res["models"]:
        md += model_report(m, meta)
    return "\n".join(md + [""])


def cost_on_real_steps(cost: CostModel, steps: list[dict]) -> dict[str, dict[str, float]]:
    """Per replay of the GPU run: the cost model's total time for its measured decode and prefill
    steps over their measured total (1 = exact), i.e. where the simulator's clock runs fast or slow."""
    sums: dict[str, dict[str, list[float]]] = {}
    for r in steps:
        kind = "prefill" if int(float(r["num_prefill_tokens"])) else "decode"
        pred = cost.step_time_s(StepFeatures(*(int(float(r[k])) for k in FEATURES)))
        acc = sums.setdefault(r["run"], {}).setdefault(kind, [0.0, 0.0])
        acc[0] += pred
        acc[1] += float(r["step_s"])
    return {run: {kind: p / m for kind, (p, m) in kinds.items() if m > 0} for run, kinds in sums.items()}


def load_measured(path: Path) -> dict:
    """Cost model, C, engine settings and real scaling rows of one bench_serve_gpu JSON (either layout)."""
    data = json.loads(path.read_text())
    meta, sc = data["meta"], data.get("scale", {})
    if "_meta" in sc:            # calib+scale re-run merged into an older JSON (5 s scaling window)
        src, commit, window = sc["_meta"], sc["_meta"]["git_commit"], 5.0
    else:
        src, commit, window = data["calibration"], meta["git_commit"], meta["scale_window_s"]
    base, sim_cfg = run_settings(meta)
    cost = CostModel.from_dict(src["cost_model"])
    # The measured steps of the scaling replays (the merged re-run keeps its own file; serve_gpu.steps.csv
    # there is another run's). A model fitted to the replays of <= 100 tasks tells the calibration model's
    # step-time error from scheduling differences (what is left with the replay fit).
    steps_csv = path.with_name(path.stem + (".scale_rerun.steps.csv" if "_meta" in sc else ".steps.csv"))
    ratios, fit, fit_ratios = {}, None, {}
    if steps_csv.exists():
        with steps_csv.open() as f:
            steps = list(csv.DictReader(f))
        few = {r["variant"] for r in sc.get("real", []) if r["num_tasks"] <= 100}
        ratios = cost_on_real_steps(cost, steps)
        if few:   # a run without a scale section has no scaling replays to fit
            fit = CostModel.fit([r for r in steps if r["run"] in few], "this run's scaling replays of <= 100 tasks")
            fit_ratios = cost_on_real_steps(fit, steps)
    return {"label": commit, "gpu_commit": commit, "source_file": repo_path(path), "meta": meta,
            "cost": cost, "capacity": src["fifo_capacity_req_s"], "cost_on_real_steps": ratios,
            "replay_fit": fit, "fit_on_real_steps": fit_ratios,
            "base": base, "sim_cfg": sim_cfg, "repro_window_s": window,
            # bench_serve_gpu stops a replay at window + max(drain, window / 2)
            "repro_deadline_s": window + max(meta.get("drain_s", 3.0), window / 2),
            "real_scale": [{k: r.get(k) for k in ("variant", "policy", "num_tasks", "throughput_req_s", "ttft_p99_s",
                                                   "num_unfinished")} for r in sc.get("real", [])],
            "real_step_stats": sc.get("step_stats", []),
            # the GPU bench's own simulator rows (longer traces, same rate and seed)
            "gpu_sim_rows": [{k: r.get(k) for k in ("policy", "num_tasks", "num_requests", "throughput_req_s")}
                             for r in sc.get("sim", []) if r.get("policy") != "fifo"]}


def simulate(m: dict, args, lengths) -> dict:
    families, meta = list(lengths), m["meta"]
    rate = args.scale_frac * m["capacity"]

    def trace(count, window_s, seed, pooled, r=rate, prefix="s"):
        return make_trace(task_names(count, families), lengths, r, window_s, seed, zipf_a=meta["zipf_a"],
                          pred_sigma=meta["pred_sigma"], prefix=f"{prefix}{count}-", pooled=pooled)

    print(f"{m['label']}: {m['cost'].source}; C = {m['capacity']:.2f} req/s; scale rate {rate:.2f} req/s", flush=True)
    counts = sorted({r["num_tasks"] for r in m["real_scale"]}) or args.scale_tasks
    for r in m["real_scale"]:
        r["policy"] = r["policy"] or "inlaid"
    real_variants = list(dict.fromkeys(r["policy"] for r in m["real_scale"]))
    repro = [run(v, tr, m, m["repro_deadline_s"], num_tasks=n, seed=20)
             for n in counts for tr in [trace(n, m["repro_window_s"], 20, True)]
             for v in dict.fromkeys((*real_variants, "inlaid-per-seq"))]
    fit_model = dict(m, cost=m["replay_fit"], label=f"{m['label']} fit")
    repro_fit = [run(v, tr, fit_model, m["repro_deadline_s"], num_tasks=n, seed=20)
                 for n in counts for tr in [trace(n, m["repro_window_s"], 20, True)]
                 for v in real_variants] if m["replay_fit"] else []
    scale = [run(v, tr, m, num_tasks=n, seed=s)
             for n in args.scale_tasks for s in args.seeds for tr in [trace(n, args.window_s, s, True)]
             for v in args.scale_variants]
    # The GPU main section's traces use seed + 10 (scale: seed + 20): seeds 20.. map to 10..
    main_rows = [run(v, tr, m, load_frac=f, seed=s - 10)
                 for f in args.rates for s in args.seeds
                 for tr in [trace(meta["num_tasks"], args.window_s, s - 10, False, f * m["capacity"], f"m{f}-")]
                 for v in args.main_variants]
    return {"label": m["label"], "gpu_commit": m["gpu_commit"], "source_file": m["source_file"],
            "cost_model": m["cost"].to_dict(), "fifo_capacity_req_s": m["capacity"], "scale_rate_req_s": rate,
            "repro_window_s": m["repro_window_s"], "repro_deadline_s": m["repro_deadline_s"],
            "real_scale": m["real_scale"], "real_step_stats": m["real_step_stats"],
            "cost_on_real_steps": m["cost_on_real_steps"], "gpu_sim_rows": m["gpu_sim_rows"], "repro": repro,
            "replay_fit": m["replay_fit"].to_dict() if m["replay_fit"] else None,
            "fit_on_real_steps": m["fit_on_real_steps"], "repro_fit": repro_fit,
            "scale": scale, "scale_mean": mean_rows(scale, ("variant", "num_tasks")),
            "scale_loss_2_to_100": losses(scale), "scale_loss_2_to_1000": losses(scale, hi=1000),
            "main": main_rows, "main_mean": mean_rows(main_rows, ("variant", "load_frac"))}


def reading(models: list[dict]) -> list[str]:
    """The findings, with this run's numbers (each claim names the rows it rests on)."""
    out = ["## Reading", ""]
    for m in models:
        rr = repro_rows(m)
        sm = {(r["variant"], r["num_tasks"]): r for r in m["scale_mean"]}
        ls = {v: statistics.fmean(x) for v, x in m["scale_loss_2_to_100"].items()}
        cur, new = sm.get(("inlaid", 100)), sm.get(("inlaid-per-seq", 100))
        line = f"- **Run {m['gpu_commit']}.** "
        real, sim = repro_loss(rr, "real", "inlaid"), repro_loss(rr, "sim", "inlaid")
        if real is not None:
            line += (f"On its own {m['repro_window_s']:g} s traces the simulator loses {sim:+.1%} 2 → 100 tasks "
                     f"where the engine lost {real:+.1%}")
            gpu_sim = {r["num_tasks"]: r for r in m["gpu_sim_rows"] if r["policy"] == "inlaid"}
            if 2 in gpu_sim and 100 in gpu_sim:
                window = gpu_sim[2]["num_requests"] / m["scale_rate_req_s"]
                line += (f"; the GPU bench's own simulator rows lost "
                         f"{1 - gpu_sim[100]['throughput_req_s'] / gpu_sim[2]['throughput_req_s']:+.1%} because they "
                         f"replay ~{window:.0f} s of arrivals (the drain, where the rare tasks' backlog is served "
                         "β tasks per step, weighs less)")
            r2, r100 = (next((r for r in rr if r["variant"] == "inlaid" and r["n"] == n), None) for n in (2, 100))
            r1000 = next((r for r in rr if r["variant"] == "inlaid" and r["n"] == 1000), None)
            if r2 and r100 and not math.isnan(r100["fit_pre"]):
                line += (f". Applied to the measured steps, its calibration cost model gives {r2['model_dec']:.2f} / "
                         f"{r100['model_dec']:.2f} of the real decode time and {r2['model_pre']:.2f} / "
                         f"{r100['model_pre']:.2f} of the real prefill time at 2 / 100 tasks, so the simulator "
                         f"picks another step mix (100 tasks: {r100['sim_dec']} decode steps of "
                         f"{r100['sim_batch']:.1f} and {r100['sim_pre']} prefills vs {r100['real_dec']} of "
                         f"{r100['real_batch']:.1f} and {r100['real_pre']}). A model fitted to the replays of "
                         f"≤ 100 tasks reproduces the mix ({r100['fit_dec_steps']} of {r100['fit_batch']:.1f}, "
                         f"{r100['fit_pre_steps']} prefills) yet loses only {repro_loss(rr, 'fit', 'inlaid'):+.1%}: it "
                         f"prices the real prefill steps at {r2['fit_pre']:.2f} / {r100['fit_pre']:.2f}"
                         + (f" / {r1000['fit_pre']:.2f}" if r1000 else "") + " of their time at 2 / 100"
                         + (" / 1000" if r1000 else "") + " tasks")
                if r100["fit_pre"] < r2["fit_pre"] - 0.05:
                    line += (". Prefill steps get dearer with the task count than any term of the linear model "
                             "says (adapter slot loads, scheduler time over a larger waiting pool, past the 128 host "
                             "packs repacking on load; not separated here): that is the missing part of the 100-task "
                             "loss and most of the 1000-task gap, and the calibration model's too-dear prefills "
                             "offset some of it")
            line += ". "
        if "inlaid-fill" in ls:
            line += (f"Over seeds {sorted({r['seed'] for r in m['scale']})}: loss {ls['inlaid-fill']:+.1%} with the "
                     f"work-conserving β (fill 0.75, the default now) vs {ls['inlaid']:+.1%} with that run's own "
                     "setting (strict cap)")
        if cur and new:
            line += (f"Over seeds {sorted({r['seed'] for r in m['scale']})} at {m['scale_rate_req_s']:.1f} req/s: loss "
                     f"{ls['inlaid']:+.1%} (inlaid) vs {ls['inlaid-per-seq']:+.1%} (per-seq); at 100 tasks decode "
                     f"batch {cur['decode_batch']:.1f} vs {new['decode_batch']:.1f}, single-sequence tasks per decode "
                     f"{cur['decode_single_tasks']:.1f} vs {new['decode_single_tasks']:.1f}, running pool "
                     f"{cur['pool_seqs_at_decode']:.1f} vs {new['pool_seqs_at_decode']:.1f} sequences over "
                     f"{cur['pool_tasks_at_decode']:.1f} vs {new['pool_tasks_at_decode']:.1f} tasks")
        if "inlaid-beta-inf" in ls:
            line += f"; without the β cap the loss is {ls['inlaid-beta-inf']:+.1%}."
        out.append(line)
    for m in models:
        stats = {(r["policy"], r["num_tasks"]): r["variant"] for r in m["real_scale"]}
        steps = {s["run"]: s for s in m["real_step_stats"]}
        a, b = (steps.get(stats.get((v, 2))) for v in ("inlaid", "inlaid-old"))
        if a and b:
            out.append(f"- GPU noise, run {m['gpu_commit']}: at 2 tasks inlaid and inlaid-old are the same policy "
                       "(the pool never holds β tasks; the simulator gives identical rows), yet the engine measured "
                       f"{a['decode_steps']} vs {b['decode_steps']} decode steps of {a['decode_batch']:.1f} vs "
                       f"{b['decode_batch']:.1f} and {a['prefill_ms']:.0f} vs {b['prefill_ms']:.0f} ms prefills: "
                       "step-count differences of this size between real replays are not policy effects.")
    if any("inlaid-per-seq" in m["scale_loss_2_to_100"] for m in models):
        out += ["- Why the decode rank cannot help here: with 100 tasks of Zipf(1.0) popularity, 44 % of the requests "
            "go to the 90 tasks outside the top 10, which seldom have two requests running at once, and each such "
            "request holds one of the β slots for its "
            "whole output, whichever order the slots are granted in. Ranking by sequences per slot only reorders "
            "who waits (the decode batch and the running pool hardly move); the slot-steps the workload needs are "
            "the same, and β = ∞ removes the loss. What moves capacity is fewer prefill steps (the full-batch "
            "streak rule) or more slots."]
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", default=str(RESULTS / "serve_gpu.json"),
                    help="comma-separated bench_serve_gpu JSONs: cost model, C, config, real scaling rows")
    ap.add_argument("--window-s", type=float, default=20.0, help="arrival window of the scale and main traces")
    ap.add_argument("--seeds", default="20,21,22,23,24", help="trace seeds (20 = the GPU runs' scale seed)")
    ap.add_argument("--scale-tasks", default="2,10,100,1000")
    ap.add_argument("--scale-frac", type=float, default=1.3)
    ap.add_argument("--rates", default="0.5,0.8,1.1", help="main workload rates, fractions of C")
    ap.add_argument("--scale-variants", default="inlaid,inlaid-per-seq,inlaid-old,inlaid-beta-inf,fifo")
    ap.add_argument("--main-variants", default="inlaid,inlaid-per-seq,inlaid-old,fifo")
    ap.add_argument("--out", default=str(RESULTS / "sim_scale"))
    args = ap.parse_args()
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.scale_tasks = [int(x) for x in args.scale_tasks.split(",")]
    args.rates = [float(x) for x in args.rates.split(",")]
    args.scale_variants, args.main_variants = args.scale_variants.split(","), args.main_variants.split(",")
    lengths = family_lengths(ROOT / "data" / "lengths.jsonl")
    t0 = time.perf_counter()
    measured = [load_measured(Path(p)) for p in args.measured.split(",")]
    models = [simulate(m, args, lengths) for m in measured]
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    result = {
        "meta": {"benchmark": "bench_sim_scale (simulated; the engine's policy classes on a virtual clock)",
                 "device": "this CPU, simulated: step times from the GPU runs' cost models below",
                 "git_commit": git_commit() + ("+uncommitted" if dirty else ""),
                 "command": " ".join(["python", "benchmarks/bench_sim_scale.py"] + sys.argv[1:]),
                 "window_s": args.window_s, "seeds": args.seeds, "scale_frac": args.scale_frac,
                 "rates": args.rates, "num_tasks": measured[0]["meta"]["num_tasks"],
                 "scale_variants": args.scale_variants, "main_variants": args.main_variants,
                 "scheduler_config": dataclasses.asdict(measured[0]["base"]),
                 "sim_config": dataclasses.asdict(measured[0]["sim_cfg"]), "wall_s": time.perf_counter() - t0},
        "reading": reading(models), "models": models,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(report(result))
    for m in models:
        for v, ls in m["scale_loss_2_to_100"].items():
            print(f"{m['label']}: loss 2 -> 100 tasks, {v}: {_pct(ls)}")
    print(f"wrote {out.with_suffix('.md')} and .json in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
