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
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    return out


def make_tasks(names: list[str], model_dir: Path, tmp: Path, demo: bool, num_examples: int) -> list[TaskSpec]:
    specs = []
    for i, name in enumerate(names):
        demo_dir = ROOT / "adapters" / name
        if demo and (demo_dir / "adapter_config.json").is_file():
            adapter = demo_dir
        else:
            adapter = random_adapter(model_dir, tmp / f"adapter_{i}", seed=i)
        calib = write_calibration(name, tmp / f"calib_{i}.jsonl", num_examples)
        specs.append(TaskSpec(name.replace("#", "_"), str(adapter), str(calib)))
    return specs


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--t1", type=int, default=3, help="tasks already quantized")
    ap.add_argument("--t2", type=int, default=2, help="tasks added")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--aggregation", default="max-inv")
    ap.add_argument("--num-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--demo-adapters", action="store_true", help="use adapters/<task>/ when present")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "incremental"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = resolve_model(args.model).path
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, aggregation=args.aggregation,
                      num_seqs=args.num_seqs, seq_len=args.seq_len)
    tmp = Path(tempfile.mkdtemp(prefix="bench_incr_"))
    try:
        specs = make_tasks(task_names(args.t1 + args.t2), model_dir, tmp,
                           args.demo_adapters, num_examples=4 * args.num_seqs)
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
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
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
    md = [f"# Incremental MLGPTQ vs full quantization\n",
          f"{args.model}, {args.bits}-bit g{args.group_size}, aggregation {args.aggregation}, "
          f"{args.num_seqs}×{args.seq_len} calibration tokens per task, device {args.device} "
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
