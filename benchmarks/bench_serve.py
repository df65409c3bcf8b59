"""Serving benchmark on the real engine: replay a trace in real time under each scheduling policy.

Measures the same metrics as bench_sim (throughput, latency, TTFT, JCT, SLO
attainment, adapters per step, preemptions) on services.engine.llm_engine.LLMEngine,
and writes every step's batch composition and wall time so the simulator's
cost model can be fitted to this machine (bench_sim.py --cost-model ...steps.csv).

Output lengths come from the trace: EOS is ignored and a request is ended
(aborted) when it reaches its trace length, so max_tokens stays a loose cap
and leaks nothing to the policies' length predictions. Without --adapter-dir
each task gets a synthetic PEFT LoRA adapter with random weights (rank 8,
q/v, written from the base shape): right for timing, meaningless for quality.
With --model random:llama-2-7b (random weights in the exact shape) it runs on a GPU.

    .venv/bin/python benchmarks/bench_serve.py --num-requests 60 --rate 2 --num-tasks 4
    .venv/bin/python benchmarks/bench_serve.py --trace trace.jsonl --adapter-dir adapters/
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sim import generate_trace, git_commit, make_tasks, table  # noqa: E402
from engine_replay import replay  # noqa: E402
from services.engine.simulator.cost_model import FEATURES, CostModel  # noqa: E402
from services.engine.simulator.metrics import summarize  # noqa: E402
from services.engine.simulator.simulator import solo_latency_s  # noqa: E402
from services.engine.simulator.trace import TraceRequest, load_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_random_adapter(dims, out_dir: Path, seed: int, rank: int = 8) -> Path:
    """Write a PEFT LoRA directory (q_proj, v_proj; random A, small random B) for timing only.

    Written directly from the base shape (`BaseDims`), so it also works for
    random-weight models that have no Hugging Face checkpoint to wrap.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(dims.num_layers):
        for module in ("q_proj", "v_proj"):
            d_in, d_out = dims.features(module)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = 0.01 * torch.randn(d_out, rank, generator=gen)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
         "bias": "none", "lora_dropout": 0.0}))
    return out_dir


def make_prompts(engine, trace: list[TraceRequest], vocab: int, seed: int) -> dict[str, list[int]]:
    """Token ids per request: the trace's prompt text when it has one, else random ids of its length."""
    rng = random.Random(seed)
    prompts = {}
    for req in trace:
        if req.prompt is not None and engine.tokenizer is not None:
            prompts[req.request_id] = engine.encode(req.prompt)
        else:
            prompts[req.request_id] = [rng.randrange(100, vocab) for _ in range(req.prompt_tokens)]
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", help="JSONL trace (default: synthetic, as in bench_sim)")
    ap.add_argument("--policies", default="inlaid,fifo,mlfq,wfq")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=2.0, help="req/s of the synthetic trace")
    ap.add_argument("--num-tasks", type=int, default=4)
    ap.add_argument("--scale-lengths", type=float, default=0.25,
                    help="multiply synthetic output/prompt lengths (small scale for CPU)")
    ap.add_argument("--adapter-dir", help="directory with one PEFT adapter subdirectory per task name")
    ap.add_argument("--max-tokens", type=int, default=512, help="cap (requests end at their trace length)")
    ap.add_argument("--num-kv-blocks", type=int, default=0, help="0 = engine default")
    ap.add_argument("--beta", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "serve"))
    args = ap.parse_args()

    import torch

    from services.engine.config import EngineConfig
    from services.engine.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)
    if args.trace:
        trace = load_trace(args.trace)[: args.num_requests]
    else:
        tasks = [dataclasses.replace(t, output_mean=max(2.0, t.output_mean * args.scale_lengths),
                                     prompt_mean=max(8.0, t.prompt_mean * args.scale_lengths))
                 for t in make_tasks(args.num_tasks, random.Random(args.seed))]
        trace = generate_trace(args.num_requests, args.rate, tasks, seed=args.seed, max_output=args.max_tokens)
    task_names = sorted({r.task for r in trace if r.task})
    rows, all_steps, t_start = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        adapter_paths: dict[str, Path] = {}
        for policy in args.policies.split(","):
            cfg = EngineConfig.from_env(model=args.model, device=args.device, policy=policy,
                                        max_adapters=max(16, args.beta), max_adapters_per_batch=args.beta,
                                        num_kv_blocks=args.num_kv_blocks, max_decode_streak=2)
            engine = LLMEngine(cfg)
            for i, name in enumerate(task_names):
                if name not in adapter_paths:
                    adapter_paths[name] = (Path(args.adapter_dir) / name if args.adapter_dir else
                                           make_random_adapter(engine.runner.shape.dims(), Path(tmp) / name, i))
                engine.add_adapter(name, adapter_paths[name])
            engine.generate([[101] * 16], tasks=[task_names[0] if task_names else ""])   # warm up
            prompts = make_prompts(engine, trace, engine.runner.shape.vocab_size, args.seed)
            result = replay(engine, trace, prompts, args.max_tokens)
            records, steps = result.records, result.steps
            cost = CostModel.fit([dict(dataclasses.asdict(s)) for s in steps], source=f"{policy} run")
            records = [dataclasses.replace(r, solo_latency_s=solo_latency_s(cost, next(
                t for t in trace if t.request_id == r.request_id))) for r in records]
            m = summarize(records, steps)
            m.update(variant=policy, device=str(engine.runner.device) if hasattr(engine.runner, "device") else "?",
                     num_kv_blocks=engine.block_manager.num_blocks)
            rows.append(m)
            all_steps += [dict(dataclasses.asdict(s), policy=policy) for s in steps]
            print(f"{policy:8s} thr {m['throughput_req_s']:.2f} req/s {m['throughput_tok_s']:.1f} tok/s | "
                  f"JCT avg {m['jct_avg_s']:.2f} p99 {m['jct_p99_s']:.2f} s | TTFT avg {m['ttft_avg_s']:.2f} s | "
                  f"SLO {m['slo_attainment']:.2f} | adapters/step {m['adapters_per_step_avg']:.2f} | "
                  f"preempt {m['num_preemptions']} | steps {m['num_steps']}", flush=True)
            del engine
            # After every policy, so a run cut short still leaves what it measured.
            write_results(Path(args.out), args, trace, rows, all_steps, time.perf_counter() - t_start)


def _fit_error(source: str) -> float:
    return float(source.split("median relative error ")[1].split("%")[0]) / 100


def device_name(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        import torch
        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU, {threads} torch threads (shared machine)"


def write_results(out: Path, args, trace, rows, all_steps, wall_s: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    steps_csv = out.parent / f"{out.name}_steps.csv"
    with steps_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*FEATURES, "step_s", "policy"])
        writer.writeheader()
        writer.writerows(all_steps)
    fit = CostModel.fit(all_steps, source=str(steps_csv.name))
    meta = {"benchmark": "bench_serve (real engine, real-time replay)",
            "device": device_name(rows[0].get("device", "cpu"), args.threads),
            "git_commit": git_commit(), "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "model": args.model,
            "num_requests": len(trace), "trace": args.trace or "synthetic", "wall_s": wall_s,
            "cost_model_fit_all_steps": fit.to_dict()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
    cols = [("variant", "policy", ""), ("throughput_req_s", "req/s", ".3f"), ("throughput_tok_s", "tok/s", ".1f"),
            ("latency_avg_s_per_token", "latency s/tok", ".3f"), ("jct_avg_s", "JCT avg s", ".2f"),
            ("jct_p99_s", "JCT p99 s", ".2f"), ("ttft_avg_s", "TTFT avg s", ".2f"),
            ("ttft_p99_s", "TTFT p99 s", ".2f"), ("slo_attainment", "SLO", ".3f"),
            ("adapters_per_step_avg", "adapters/step", ".2f"), ("num_preemptions", "preempt", "d"),
            ("num_steps", "steps", "d")]
    md = [f"# Real-engine serving benchmark ({meta['date_utc']}, commit {meta['git_commit']})", "",
          f"Command: `{meta['command']}`; model {args.model}; device: {meta['device']}; "
          f"{len(trace)} requests ({meta['trace']}); {wall_s:.0f} s wall in all.", "",
          "Measured wall-clock numbers from one real-time replay per policy, on a shared machine "
          "(other processes were running; expect noise of tens of percent). Output lengths follow the "
          "trace (EOS ignored); adapters are random PEFT LoRAs unless --adapter-dir was given. "
          "SLO reference (latency served alone) comes from a cost model fitted to that policy's own "
          "measured steps.", "",
          table(rows, cols), "",
          f"Per-step measurements: `{steps_csv.name}` ({len(all_steps)} steps). Cost model fitted to all of "
          f"them: a={fit.a_s:.3e} s, b={fit.b_s_per_prefill_token:.3e} s/prefill token, "
          f"c={fit.c_s_per_decode_seq:.3e} s/decode seq, d={fit.d_s_per_adapter:.3e} s/adapter, "
          f"e={fit.e_s_per_kv_token:.3e} s/KV token ({fit.source}).", ""]
    if "median relative error" in fit.source and _fit_error(fit.source) > 0.25:
        md += ["**The linear model does not fit these steps (median relative error above 25 %): step times "
               "were dominated by something else (on a shared CPU, other processes). Do not use this fit "
               "for bench_sim, and do not read the SLO column: its solo-latency reference comes from such fits.**",
               ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out.with_suffix('.md')}, .json and {steps_csv}")


if __name__ == "__main__":
    main()
