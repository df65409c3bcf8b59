"""Task quality with an fp8 KV cache (EngineConfig.kv_cache_dtype = "fp8_e4m3") beside the default one.

Our engine (CPU, SmolLM2-135M, fp32 compute) serves each demo task's test split through that task's
adapter in adapters/, greedy, stopping at EOS or the task's token budget, once with the KV cache in
the model's dtype and once in fp8 (e4m3, no scale); every request of a configuration goes into one
engine, batched as the engine schedules it. Per task: the metric (workload kit) under both caches, its
change, and how many outputs are token-for-token identical; and, from the default cache after its
run, how the cached K and V magnitudes sit against e4m3's range (below 2^-6 it has no normal numbers,
above 448 none at all), which says whether a per-tensor scale could help. Writes <out>.json and <out>.md.

  .venv/bin/python benchmarks/bench_kv_fp8_quality.py --num-examples 50
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import cpu_name, git_commit, write_result  # noqa: E402
from services.common.workload.chat import prompt_token_ids  # noqa: E402
from services.common.workload.metrics import get_metric  # noqa: E402
from services.common.workload.task import get_task  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.engine.llm_engine import LLMEngine  # noqa: E402
from services.engine.sequence import SamplingParams  # noqa: E402

TASKS = ("arith", "num2words_en", "num2words_fr", "json_extract", "table_summary", "sort_list", "code_gen")
KV_DTYPES = ("auto", "fp8_e4m3")


def run(kv_dtype: str, tasks: list[str], num_examples: int) -> dict:
    """{task: [(output token ids, score)]} and the wall time, every task's requests in one engine."""
    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", kv_cache_dtype=kv_dtype,
                                    max_num_seqs=64, max_adapters=len(tasks), max_adapters_per_batch=len(tasks)))
    for name in tasks:
        engine.add_adapter(name, ROOT / "adapters" / name)
    prompts, params, names, examples = [], [], [], []
    for name in tasks:
        task = get_task(name)
        for ex in task.examples("test", num_examples):
            prompts.append(prompt_token_ids(engine.tokenizer, ex.prompt))
            params.append(SamplingParams(max_tokens=task.max_new_tokens))
            names.append(name)
            examples.append(ex)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params, tasks=names)
    wall = time.perf_counter() - t0
    out: dict[str, list] = {name: [] for name in tasks}
    metrics = {name: get_metric(get_task(name).metric) for name in tasks}
    for name, ex, res in zip(names, examples, results, strict=True):
        out[name].append((res.token_ids, metrics[name](res.text, ex)))
    return {"outputs": out, "wall_s": wall, "kv_bytes_per_block": engine.runner.kv_bytes_per_block,
            "kv_dtype": str(engine.runner.kv_dtype), "magnitudes": cache_magnitudes(engine.runner.kv_caches)}


def cache_magnitudes(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Per K / V: quantiles of |x| over every nonzero cached element (a sample of 10^6 for the
    quantiles), the share below 2^-6 (e4m3's subnormals) and the largest."""
    res = {}
    for name, i in (("K", 0), ("V", 1)):
        vals = torch.cat([c[i].flatten().float() for c in caches])
        vals = vals[vals != 0].abs()
        sample = vals[torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(0))[:10**6]]
        qs = torch.quantile(sample, torch.tensor([0.01, 0.5, 0.99])).tolist()
        res[name] = {"p01": qs[0], "p50": qs[1], "p99": qs[2], "max": float(vals.max()),
                     "below_2^-6": float((vals < 2.0 ** -6).float().mean()), "count": vals.numel()}
    return res


def report(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Task quality with an fp8 KV cache (commit {m['commit']})\n",
             f"Device: {m['device']} (CPU), torch {m['torch']}; SmolLM2-135M, fp32 compute, each demo task's "
             f"adapter; greedy, EOS or the task's budget; {m['num_examples']} test examples per task. "
             f"Command: `{m['command']}` ({m['wall_s']:.0f} s).\n",
             "KV cache: `auto` keeps the model's dtype (fp32 here; fp16 on the GPU), `fp8_e4m3` one byte per "
             "element, clamped to ±448, no scale. Bytes per 16-token block: "
             + ", ".join(f"{k} {v['kv_bytes_per_block']}" for k, v in res["runs"].items()) + ".\n",
             "| task | metric | score, auto | score, fp8 | change (points) | identical outputs |",
             "|---|---|---|---|---|---|"]
    for row in res["rows"]:
        lines.append(f"| {row['task']} | {row['metric']} | {row['auto']:.3f} | {row['fp8']:.3f} | "
                     f"{100 * (row['fp8'] - row['auto']):+.1f} | {row['identical']}/{row['n']} |")
    a, f = res["mean"]["auto"], res["mean"]["fp8"]
    lines.append(f"| mean | | {a:.3f} | {f:.3f} | {100 * (f - a):+.1f} | |")
    mags = res["runs"]["auto"].get("magnitudes")
    if mags:
        lines += ["\nCached magnitudes after the default cache's run (every request's K and V, all layers):\n",
                  "| | elements | p1 | median | p99 | max | share below 2^-6 (e4m3 subnormal) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {m['count']} | {m['p01']:.4f} | {m['p50']:.3f} | {m['p99']:.2f} | {m['max']:.1f} | "
                  f"{100 * m['below_2^-6']:.1f} % |" for k, m in mags.items()]
    lines.append("\nThe fp8 cache halves the KV bytes of an fp16 engine, so a memory budget holds twice the tokens "
                 "and decode attention reads half the bytes; the rows above are what it costs in task quality "
                 "on this model.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-examples", type=int, default=50, help="test examples per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_fp8_quality"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    t0 = time.perf_counter()
    runs = {kv: run(kv, tasks, args.num_examples) for kv in KV_DTYPES}
    rows = []
    for name in tasks:
        auto, fp8 = runs["auto"]["outputs"][name], runs["fp8_e4m3"]["outputs"][name]
        rows.append({"task": name, "metric": get_task(name).metric, "n": len(auto),
                     "auto": sum(s for _, s in auto) / len(auto), "fp8": sum(s for _, s in fp8) / len(fp8),
                     "identical": sum(a == b for (a, _), (b, _) in zip(auto, fp8))})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("auto", "fp8")}
    meta = {"commit": git_commit(), "device": cpu_name(), "torch": torch.__version__,
            "num_examples": args.num_examples, "tasks": tasks, "wall_s": time.perf_counter() - t0,
            "command": "python benchmarks/bench_kv_fp8_quality.py " + shlex.join(sys.argv[1:])}
    res = {"meta": meta, "rows": rows, "mean": mean,
           "runs": {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in runs.items()}}
    write_result(args.out, res, report(res))


if __name__ == "__main__":
    main()
