"""Inlaid's optional settings as a grid, simulated on several GPU runs' measured steps at once.

sim_vs_fp16 answers one setting on one run; choosing a setting (or a default) needs every run it
would serve: a knob that meets issue 7's targets on the fp8-cache runs can lose them on the fp16-cache
ones (inlaid_step_time_ratio did, docs/results.md "A latency target for the running pool"). For each
run this builds sim_vs_fp16's cost models and traces once, replays fifo on the 4-bit and the fp16
engine once per seed, then inlaid once per grid point; each point's row gives, per run, on how many
seeds all four targets are met against fifo fp16, and the geometric means of the four ratios against
fifo fp16 and against fifo on the same 4-bit base. Writes <out>.json and <out>.md. CPU only.

  python benchmarks/sim_inlaid_grid.py --runs benchmarks/results/serve_gpu_24gib_long_drain30_tokens_8d39b65:tokens \\
      --grid inlaid_step_time_ratio=0,3 --grid inlaid_slo_scale=0,5
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import read_steps, write_result  # noqa: E402
from serve_gpu_ratios import HEADLINE, TARGETS, geomean, ratios  # noqa: E402
from serve_gpu_workload import LOAD_UNITS  # noqa: E402
from services.engine.policies import POLICIES  # noqa: E402
from services.engine.scheduler import SchedulerConfig  # noqa: E402
from sim_vs_fp16 import RunWorkload, engines, headline_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHED_FIELDS = {f.name: f.type for f in dataclasses.fields(SchedulerConfig)}


def parse_run(spec: str) -> tuple[str, str]:
    """"STEM[:LOAD_UNIT]" → (stem, load unit): STEM.json and STEM.steps.csv of a bench_serve_gpu run."""
    stem, _, unit = spec.partition(":")
    unit = unit or "requests"
    if unit not in LOAD_UNITS:
        raise SystemExit(f"--runs {spec!r}: load unit must be one of {LOAD_UNITS}")
    for suffix in (".json", ".steps.csv"):
        if not Path(stem + suffix).is_file():
            raise SystemExit(f"--runs {spec!r}: {stem}{suffix} not found")
    return stem, unit


def parse_grid(specs: list[str]) -> list[dict]:
    """["field=v1,v2", ...] → every combination as {field: value} (SchedulerConfig fields, floats)."""
    axes = []
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in SCHED_FIELDS or not values:
            raise SystemExit(f"--grid {spec!r}: expected FIELD=V1,V2,... with FIELD a SchedulerConfig field")
        try:
            axes.append([(name, float(v)) for v in values.split(",")])
        except ValueError:
            raise SystemExit(f"--grid {spec!r}: values must be numbers") from None
    points = [dict(p) for p in itertools.product(*axes)] if axes else [{}]
    for point in points:
        try:
            SchedulerConfig(**point)
        except ValueError as e:
            raise SystemExit(f"--grid: {point}: {e}") from None
    return points


def simulate_run(stem: str, unit: str, points: list[dict], frac: float, seeds: list[int], window_s: float) -> dict:
    """One run: fifo 4-bit / fp16 per seed, inlaid per (point, seed), as ratio summaries per point."""
    run = json.loads(Path(stem + ".json").read_text())
    eng = engines(run, read_steps(stem + ".steps.csv"))
    workload = RunWorkload.of(run)
    traces = [workload.trace(frac, seed, window_s, unit)[1] for seed in seeds]
    fifo = [{base: headline_metrics(workload.replay(POLICIES["fifo"], eng["sched"], *eng[engine], trace))
             for base, engine in (("fifo", "4-bit"), ("fifo fp16", "fp16"))} for trace in traces]
    out = []
    for point in points:
        sched = dataclasses.replace(eng["sched"], **point)
        per_seed = [ratios(headline_metrics(workload.replay(POLICIES["inlaid"], sched, *eng["4-bit"], trace)), base)
                    for trace, base_pair in zip(traces, fifo) for base in (base_pair["fifo fp16"], base_pair["fifo"])]
        vs16, vs4 = per_seed[0::2], per_seed[1::2]
        out.append({"point": point,
                    "all_four_vs_fp16": sum(all(r[k] >= TARGETS[k] for k, _ in HEADLINE) for r in vs16),
                    "vs_fp16": {k: geomean([r[k] for r in vs16]) for k, _ in HEADLINE},
                    "vs_fifo": {k: geomean([r[k] for r in vs4]) for k, _ in HEADLINE},
                    "met_vs_fifo": {k: sum(r[k] >= TARGETS[k] for r in vs4) for k, _ in HEADLINE}})
        print(f"{Path(stem).name} {point}: all four vs fp16 on {out[-1]['all_four_vs_fp16']} of {len(seeds)}",
              flush=True)
    return {"stem": stem, "load_unit": unit, "run_commit": run["meta"]["git_commit"],
            "run_device": run["meta"].get("device", "GPU"), "points": out}


def point_text(point: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in point.items()) or "the run's settings"


def report(res: dict) -> str:
    meta = res["meta"]
    n = len(meta["seeds"])
    lines = [f"# Inlaid's settings on several runs' steps, simulated (commit {meta['commit']})", "",
             f"Device: this CPU, simulated (sim_vs_fp16's cost models and workload per run); nothing here ran on a "
             f"GPU. Command: `{meta['command']}` ({meta['wall_s']:.0f} s). {meta['load_frac']:g} × C, "
             f"{meta['window_s']:g} s of arrivals, drained, seeds {meta['seeds'][0]}–{meta['seeds'][-1]} ({n}); "
             "fifo's replays are the same for every point. Ratios > 1 mean inlaid on 4 bits is better.", "",
             "Runs:", ""]
    lines += [f"- `{Path(r['stem']).name}` ({r['run_device']}, commit {r['run_commit']}, load in {r['load_unit']})"
              for r in res["runs"]]
    short = {"throughput": "thr", "avg latency": "lat", "JCT": "JCT", "SLO": "SLO"}
    lines += ["", "Each cell: seeds meeting all four targets against fifo fp16, then the geometric means against "
              "fifo fp16 (thr / lat / JCT / SLO) and against fifo on the same base (same order, with the seeds "
              "meeting each target in brackets).", ""]
    names = [Path(r["stem"]).name.replace("serve_gpu_24gib_long_drain30_", "") for r in res["runs"]]
    lines += ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, point in enumerate(res["points"]):
        cells = []
        for r in res["runs"]:
            p = r["points"][i]
            v16 = " / ".join(f"{p['vs_fp16'][k]:.2f}" for k, _ in HEADLINE)
            v4 = " / ".join(f"{p['vs_fifo'][k]:.2f} ({p['met_vs_fifo'][k]})" for k, _ in HEADLINE)
            cells.append(f"**{p['all_four_vs_fp16']} of {n}**; fp16 {v16}; same base {v4}")
        lines.append(f"| {point_text(point)} | " + " | ".join(cells) + " |")
    lines += ["", "Targets: " + ", ".join(f"{short[name]} ≥ {TARGETS[k]:g}×" for k, name in HEADLINE) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True,
                    help="STEM[:requests|tokens]: bench_serve_gpu runs with an fp16 section (STEM.json, STEM.steps.csv)")
    ap.add_argument("--grid", action="append", default=[],
                    help="FIELD=V1,V2,...: a SchedulerConfig field and its values for inlaid (repeat: every combination)")
    ap.add_argument("--rate", type=float, default=3.2, help="fraction of each run's FIFO capacity C")
    ap.add_argument("--seeds", type=int, default=20, help="traces per run (seeds 100, 101, ...)")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sim_inlaid_grid"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs = [parse_run(spec) for spec in args.runs]
    points = parse_grid(args.grid)
    seeds = list(range(100, 100 + args.seeds))
    results = [simulate_run(stem, unit, points, args.rate, seeds, args.window_s) for stem, unit in runs]
    meta = {"commit": args.commit, "load_frac": args.rate, "seeds": seeds, "window_s": args.window_s,
            "command": " ".join(["python", "benchmarks/sim_inlaid_grid.py"] + sys.argv[1:]),
            "wall_s": time.perf_counter() - t0}
    res = {"meta": meta, "points": points, "runs": results}
    write_result(args.out, res, report(res))


if __name__ == "__main__":
    main()
