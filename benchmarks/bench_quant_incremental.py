"""Incremental MLGPTQ timing: full quantization with T1+T2 tasks vs adding T2 tasks to a T1 checkpoint.

Also checks that the incremental result equals the full one bit for bit. Adapters: the demo
adapters in adapters/<task>/ where present (--demo-adapters), else random PEFT LoRA adapters
(rank 8, q/v — the demo adapters' shape); calibration data from the workload generators.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import git_commit  # noqa: E402
from services.common.model_source import resolve_model  # noqa: E402
from services.common.workload.task import builtin_tasks, get_task  # noqa: E402
from services.quantizer.calibration import TaskSpec  # noqa: E402
from services.quantizer.checkpoint import load_checkpoint  # noqa: E402
from services.quantizer.config import QuantConfig  # noqa: E402
from services.quantizer.incremental import add_tasks  # noqa: E402
from services.quantizer.pipeline import quantize  # noqa: E402


def task_names(count: int) -> list[str]:
    """Built-in tasks, then their variants (sort_list#1, ...) when more are asked for."""
    base = list(builtin_tasks())
    return [base[i % len(base)] if i < len(base) else f"{base[i % len(base)]}#{i // len(base)}"
            for i in range(count)]


def write_calibration(name: str, path: Path, num: int) -> Path:
    with open(path, "w") as f:
        for ex in get_task(name).examples("train", num):
            f.write(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n")
    return path


def random_adapter(config, out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT-format LoRA (rank 8 on q/v, the demo adapters' shape) with random A and B."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    head_dim = config.hidden_size // config.num_attention_heads
    outs = {"q_proj": config.num_attention_heads * head_dim, "v_proj": config.num_key_value_heads * head_dim}
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, out_features in outs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, config.hidden_size, generator=g) / config.hidden_size ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(outs),
        "bias": "none", "task_type": "CAUSAL_LM"}))
    return out


def random_model(shape: str, num_layers: int, tokenizer_dir: Path, out: Path) -> Path:
    """Random weights in a public model's layer shapes (vocab of our tokenizer), saved as HF dir."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from services.common.model_source import RANDOM_SHAPES
    dims = dict(RANDOM_SHAPES[shape], num_hidden_layers=num_layers, vocab_size=49152)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dims))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def make_tasks(names: list[str], model_dir: Path, tmp: Path, demo: bool, num_examples: int) -> list[TaskSpec]:
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir)
    specs = []
    for i, name in enumerate(names):
        demo_dir = ROOT / "adapters" / name
        if demo and (demo_dir / "adapter_config.json").is_file():
            adapter = demo_dir
        else:
            adapter = random_adapter(config, tmp / f"adapter_{i}", seed=i)
        calib = write_calibration(name, tmp / f"calib_{i}.jsonl", num_examples)
        specs.append(TaskSpec(name.replace("#", "_"), str(adapter), str(calib)))
    return specs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--t1", type=int, default=3, help="tasks already quantized")
    ap.add_argument("--t2", type=int, default=2, help="tasks added")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--aggregation", default="mean")
    ap.add_argument("--num-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--demo-adapters", action="store_true", help="use adapters/<task>/ when present")
    ap.add_argument("--random-shape", default="", help="e.g. llama-2-7b: random weights in that shape")
    ap.add_argument("--num-layers", type=int, default=8, help="decoder layers of the random model")
    ap.add_argument("--tokenizer-dir", default="", help="tokenizer files for the random model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "incremental"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_incr_"))
    if args.random_shape:
        model_dir = random_model(args.random_shape, args.num_layers, Path(args.tokenizer_dir), tmp / "model")
        args.model = f"random {args.random_shape} shape, {args.num_layers} layers, vocab 49152"
    else:
        model_dir = resolve_model(args.model).path
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, aggregation=args.aggregation,
                      num_seqs=args.num_seqs, seq_len=args.seq_len)
    try:
        specs = make_tasks(task_names(args.t1 + args.t2), model_dir, tmp,
                           args.demo_adapters, num_examples=max(4 * args.num_seqs, args.num_seqs * args.seq_len // 40))
        old, new = specs[:args.t1], specs[args.t1:]
        t = time.perf_counter()
        quantize(str(model_dir), specs, cfg, tmp / "full", device=args.device)
        full_s = time.perf_counter() - t
        quantize(str(model_dir), old, cfg, tmp / "inc", device=args.device)
        t = time.perf_counter()
        add_tasks(tmp / "inc", new, device=args.device)
        inc_s = time.perf_counter() - t
        full, inc = load_checkpoint(tmp / "full"), load_checkpoint(tmp / "inc")
        equal = full.tensors.keys() == inc.tensors.keys() and all(
            torch.equal(full.tensors[k], inc.tensors[k]) for k in full.tensors)
        full_t = json.loads((full.path / "timings.json").read_text())
        inc_t = json.loads((inc.path / "timings.json").read_text())
        adapters = sorted({"demo" if "adapters/" in s.adapter_path and str(ROOT) in s.adapter_path
                           else "random" for s in specs})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "model": args.model, "t1": args.t1, "t2": args.t2, "tasks": [s.name for s in specs],
        "adapters": adapters, "config": cfg.to_dict(), "device": args.device,
        "device_name": (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                        else f"CPU {platform.processor() or platform.machine()}"),
        "threads": args.threads,
        "full_s": round(full_s, 2), "incremental_s": round(inc_s, 2),
        "ratio": round(inc_s / full_s, 3), "bit_identical": equal,
        "full_breakdown_s": {k: round(v, 2) for k, v in full_t.items()},
        "incremental_breakdown_s": {k: round(v, 2) for k, v in inc_t.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "git_commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Incremental MLGPTQ vs full quantization\n",
          f"{args.model}, {args.bits}-bit g{args.group_size}, aggregation {args.aggregation}, "
          f"{args.num_seqs}×{args.seq_len} calibration tokens per task, device {result['device_name']} "
          f"({args.threads} threads), adapters: {', '.join(adapters)}.\n",
          "| run | tasks with statistics computed | seconds | calibration s | quantize s |",
          "|---|---|---|---|---|",
          f"| full (T1+T2) | {args.t1 + args.t2} | {full_s:.1f} | {full_t['stats_s']:.1f} | {full_t['quantize_s']:.1f} |",
          f"| incremental (add T2) | {args.t2} | {inc_s:.1f} | {inc_t['stats_s']:.1f} | {inc_t['quantize_s']:.1f} |",
          "", f"**ratio incremental / full = {inc_s / full_s:.3f}** (paper: 0.59 for 5+5 tasks); "
          f"incremental result bit-identical to full: **{equal}**.", "",
          f"Seconds are wall time of `quantize`/`add_tasks` (model load, calibration, GPTQ, writing). "
          f"Peak RSS {result['peak_rss_mb']} MB. Commit {result['git_commit']}, {result['date']}.",
          f"Command: `{result['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
