"""Quantization time of one Llama-2-7B-shaped decoder layer on the GPU: gptq vs mlgptq with T tasks.

Random weights and random calibration activations (no real 7B weights can reach the GPU
machine). Each timed run is the pipeline's per-layer work, through the pipeline's own code
(`run_layer` + `LayerQuantizer.quantize`): calibration activations forward through the layer
with Hessian hooks, (mlgptq) one stream per task with that task's random LoRA adapter and the
per-task aggregation, then GPTQ of the layer's 4 Hessian groups, results copied to the CPU.

Two GPTQ baselines: `gptq (pooled T tasks)` sees the same T·n calibration tokens as mlgptq
(the paper's comparison: same data, no per-task treatment); `gptq (1 task)` sees n tokens.
Configurations are timed round-robin (one run each per round) and summarised by medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.adapters import LoraAdapter  # noqa: E402
from services.common.model_source import RANDOM_SHAPES  # noqa: E402
from services.common.workload.report import provenance  # noqa: E402
from services.quantizer.config import QuantConfig  # noqa: E402
from services.quantizer.pipeline import LayerQuantizer, Stream, run_layer  # noqa: E402


# A small shape to check the script on a CPU (not a result).
SMOKE_SHAPE = dict(hidden_size=256, intermediate_size=640, num_attention_heads=4, num_key_value_heads=4,
                   vocab_size=1000, max_position_embeddings=1024)


def build_layer(shape: str, device: str):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dims = SMOKE_SHAPE if shape == "smoke" else RANDOM_SHAPES[shape]
    config = LlamaConfig(**{**dims, "num_hidden_layers": 1})
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    layer.eval()
    return config, layer, LlamaRotaryEmbedding(config).to(device)


def task_inputs(config, rotary, num_seqs: int, seq_len: int, batch: int, seed: int, device: str):
    """One task's calibration activations: [(hidden [B, S, D], layer kwargs)] per batch."""
    g = torch.Generator(device=device).manual_seed(seed)
    positions = torch.arange(seq_len, device=device)[None]
    out = []
    for _ in range(0, num_seqs, batch):
        hidden = torch.randn(batch, seq_len, config.hidden_size, generator=g, device=device)
        cos, sin = rotary(hidden, positions)
        out.append((hidden, {"position_embeddings": (cos, sin), "position_ids": positions,
                             "attention_mask": None}))
    return out


def random_adapter(config, seed: int, rank: int, device: str) -> LoraAdapter:
    """Rank-r LoRA on q_proj and v_proj of layer 0 (the demo adapters' targets)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    d = config.hidden_size
    outs = {"q_proj": d, "v_proj": config.num_key_value_heads * (d // config.num_attention_heads)}
    weights = {(0, m): (torch.randn(rank, d, generator=g) / d ** 0.5,
                        torch.randn(o, rank, generator=g) * 0.02) for m, o in outs.items()}
    return LoraAdapter(name=f"t{seed}", path=Path("."), rank=rank, targets=tuple(outs),
                       weights=weights, scaling={k: 2.0 for k in weights})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_run(layer, cfg: QuantConfig, streams: list[Stream], inputs: list[list], device: str) -> float:
    """Seconds of one layer's quantization; host clock around synchronised GPU work."""
    for stream, inp in zip(streams, inputs):
        stream.inputs = list(inp)
    sync(device)
    t0 = time.perf_counter()
    per_stream = [run_layer(layer, 0, s) for s in streams]
    LayerQuantizer(cfg, device).quantize(layer, per_stream, None)
    sync(device)
    return time.perf_counter() - t0


def report(times: dict[str, list[float]], counts: list[int], args, meta: dict) -> None:
    """Write <out>.md/.json from the runs so far (called after every round: a cut run keeps them)."""
    times = {name: v for name, v in times.items() if v}
    med = {name: statistics.median(v) for name, v in times.items()}
    rows = []
    for t in counts:
        if f"mlgptq ({t} tasks)" not in med or "gptq (1 task)" not in med:
            continue
        single = med["gptq (1 task)"]
        ml, pooled = med[f"mlgptq ({t} tasks)"], med.get(f"gptq (pooled {t} tasks)", single)
        rows.append({"tasks": t, "mlgptq_s": ml, "gptq_pooled_s": pooled, "gptq_1task_s": single,
                     "ratio_vs_pooled": ml / pooled, "ratio_vs_1task": ml / single,
                     "target_ratio": 1 + 0.1 * t, "meets_target_vs_pooled": ml / pooled <= 1 + 0.1 * t,
                     "meets_target_vs_1task": ml / single <= 1 + 0.1 * t})
    result = {"shape": args.shape, "bits": args.bits, "group_size": 128, "aggregation": args.aggregation,
              "calibration_per_task": f"{args.num_seqs}x{args.seq_len} tokens", "lora_rank": args.rank,
              **provenance(meta["device"] if "device_name" not in meta else "cpu"),
              "command": " ".join(["python"] + sys.argv),
              "times_s": times, "median_s": med, "rows": rows}
    result["git_commit"] = os.environ.get("BENCH_COMMIT", result["git_commit"])
    result.update({k: v for k, v in meta.items() if k not in ("device", "device_name")})
    if "device_name" in meta:  # a report rebuilt from a device run's log, here
        result["device"] = meta["device_name"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Quantization time of one {args.shape}-shaped decoder layer on the GPU", "",
             f"Random weights, random calibration activations ({args.num_seqs}×{args.seq_len} tokens per "
             f"task), {args.bits}-bit g128 sym, mlgptq aggregation `{args.aggregation}`, random rank-"
             f"{args.rank} LoRA on q/v per task. One run = forward of the calibration data through the "
             "layer with Hessian hooks (+ LoRA per task for mlgptq) + aggregation + GPTQ of all 7 linears "
             f"(4 Hessian groups) + copy to CPU; medians of {min(len(v) for v in times.values())}–"
             f"{max(len(v) for v in times.values())} round-robin runs after a warm-up, same process. "
             "Target: mlgptq ≤ (1 + 0.1·T) × gptq.", "",
             "| tasks T | gptq, 1 task's data (s) | gptq, T tasks' data pooled (s) | mlgptq (s) | "
             "mlgptq / gptq pooled | mlgptq / gptq 1 task | target |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tasks']} | {r['gptq_1task_s']:.3f} | {r['gptq_pooled_s']:.3f} | {r['mlgptq_s']:.3f} | "
                     f"{r['ratio_vs_pooled']:.3f} | {r['ratio_vs_1task']:.3f} | ≤ {r['target_ratio']:.1f} |")
    lines += ["", "Every run (s): " + "; ".join(f"{k}: {', '.join(f'{x:.3f}' for x in v)}" for k, v in times.items()),
              "", *meta.get("notes", []),
              "", f"Device {result['device']}, commit {result['git_commit']}, {result['date_utc']}.",
              f"Command: `{result['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--tasks", default="1,5,10")
    ap.add_argument("--num-seqs", type=int, default=8, help="calibration sequences per task")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=100.0, help="stop adding rounds after this")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--aggregation", default="mean")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_gpu_layer"))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = args.device
    counts = [int(t) for t in args.tasks.split(",")]
    config, layer, rotary = build_layer(args.shape, device)
    inputs = [task_inputs(config, rotary, args.num_seqs, args.seq_len, args.batch, t, device)
              for t in range(max(counts))]
    adapters = [random_adapter(config, t, args.rank, device) for t in range(max(counts))]
    gptq_cfg = QuantConfig(bits=args.bits, group_size=128, method="gptq-mixed")
    ml_cfg = QuantConfig(bits=args.bits, group_size=128, method="mlgptq", aggregation=args.aggregation)

    runs = {"gptq (1 task)": (gptq_cfg, [Stream("pooled", None, None)], [inputs[0]])}
    for t in counts:
        pooled = [b for task in inputs[:t] for b in task]
        if t > 1:
            runs[f"gptq (pooled {t} tasks)"] = (gptq_cfg, [Stream("pooled", None, None)], [pooled])
        runs[f"mlgptq ({t} tasks)"] = (ml_cfg, [Stream(f"t{i}", None, adapters[i]) for i in range(t)],
                                       inputs[:t])
    # Warm-up (kernels, cuBLAS/cuSOLVER handles): one run of each code path, not of every size.
    for name in ["gptq (1 task)", f"mlgptq ({counts[0]} tasks)"]:
        cfg, streams, inp = runs[name]
        one_run(layer, cfg, streams, inp, device)
        print(f"warm-up {name} done", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    t_start = time.perf_counter()
    for rnd in range(args.repeats):
        if rnd > 0 and time.perf_counter() - t_start > args.budget_s:
            break
        for name, (cfg, streams, inp) in runs.items():
            times[name].append(one_run(layer, cfg, streams, inp, device))
            print(f"round {rnd} {name}: {times[name][-1]:.3f}s", flush=True)
        report(times, counts, args, {"device": device})
    return 0


if __name__ == "__main__":
    sys.exit(main())
