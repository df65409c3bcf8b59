"""Task quality of quantized bases: unquantized, RTN, GPTQ (mixed data / per task), MLGPTQ variants.

One calibration pass through the unquantized base gives every Hessian needed (each task's
data with and without its adapter), so all methods share it; each method then quantizes
every decoder linear with GPTQ and is scored per task with the workload kit's evaluation
(greedy generation + the task's metric), with the task's adapter on top of the quantized base.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.workload.evaluation import evaluate  # noqa: E402
from services.common.workload.report import provenance  # noqa: E402
from services.common.workload.task import get_task  # noqa: E402
from services.quantizer.aggregate import make_aggregation  # noqa: E402
from services.quantizer.calibration import read_adapter  # noqa: E402
from services.quantizer.calibration import TaskSpec, format_example  # noqa: E402
from services.quantizer.checkpoint import dequantize, packed_tensors  # noqa: E402
from services.quantizer.config import AGGREGATIONS, QuantConfig  # noqa: E402
from services.quantizer.gptq import gptq_quantize  # noqa: E402
from services.quantizer.hessian import INPUT_GROUPS  # noqa: E402
from services.quantizer.pipeline import Stream, _capture_inputs, _run_layer, load_base  # noqa: E402
from services.quantizer.rtn import QuantResult, rtn_quantize  # noqa: E402


def calib_tokens(task: str, tokenizer, num_seqs: int, seq_len: int) -> torch.Tensor:
    """[num_seqs, seq_len] of the task's train split, chat-formatted like served requests."""
    ids: list[int] = []
    for ex in get_task(task).examples("train", num_seqs * 8):
        ids += tokenizer(format_example(tokenizer, ex.prompt, ex.completion), add_special_tokens=False)["input_ids"]
        if len(ids) >= num_seqs * seq_len:
            break
    if len(ids) < num_seqs * seq_len:
        raise SystemExit(f"task {task}: only {len(ids)} calibration tokens")
    return torch.tensor(ids[:num_seqs * seq_len]).view(num_seqs, seq_len)


def method_hessians(base_h, lora_h, tasks, group, aggs, with_mean) -> dict[str, torch.Tensor]:
    out = {"gptq-mixed": sum(h[group] for h in base_h) / len(base_h)}  # equal tokens per task
    for t, h in zip(tasks, base_h):
        out[f"gptq:{t}"] = h[group]
    for name in aggs:
        agg = make_aggregation(name)
        out[f"mlgptq-{name}"] = agg.finalize(agg.reduce([agg.task_state(h[group]) for h in lora_h]))
    if with_mean:
        out["lora-mean"] = sum(h[group] for h in lora_h) / len(lora_h)
    return out


@torch.no_grad()
def quantize_all(hf, tokenizer, tasks, adapters, args) -> dict[str, dict[str, torch.Tensor]]:
    """{config "<method>@<bits>": {linear prefix: dequantized fp32 weight (stored packed)}}."""
    base_streams, lora_streams = [], []
    for t in tasks:
        tokens = calib_tokens(t, tokenizer, args.num_seqs, args.seq_len)
        base_streams.append(Stream(t, tokens, None))
        lora_streams.append(Stream(t, tokens, adapters[t]))
    for s in base_streams + lora_streams:
        _capture_inputs(hf, s, "cpu")
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for idx, layer in enumerate(hf.model.layers):
        t0 = time.perf_counter()
        base_h = [_run_layer(layer, idx, s) for s in base_streams]
        lora_h = [_run_layer(layer, idx, s) for s in lora_streams]
        for group, members in INPUT_GROUPS.items():
            hs = method_hessians(base_h, lora_h, tasks, group, args.aggregations, args.with_mean)
            for bits in args.bits:
                cfg = QuantConfig(bits=bits, group_size=args.group_size)
                # Members share H: one GPTQ sweep over their stacked rows (as the pipeline does).
                weights = [layer.get_submodule(name).weight.detach() for name in members]
                stacked = torch.cat(weights)
                results = {"rtn": rtn_quantize(stacked, cfg)}
                for method, h in hs.items():
                    if method.startswith("gptq:") and bits not in args.per_task_bits:
                        continue
                    results[method] = gptq_quantize(stacked, h, cfg)
                for method, res in results.items():
                    start = 0
                    for name, w in zip(members, weights):
                        rows = slice(start, start + w.shape[0])
                        start += w.shape[0]
                        part = QuantResult(res.codes[rows].clone(), res.scales[:, rows].clone(),
                                           res.zeros[:, rows].clone(), res.g_idx.clone(), res.dequant[rows])
                        packed.setdefault(f"{method}@{bits}", {}).update(
                            packed_tensors(f"model.layers.{idx}.{name}", part, bits))
        print(f"layer {idx}: {time.perf_counter() - t0:.1f}s", flush=True)
    return packed


def load_config(hf, tensors: dict[str, torch.Tensor], bits: int) -> None:
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".qweight")]:
            p = key[: -len(".qweight")]
            w = dequantize(tensors[key], tensors[f"{p}.qzeros"], tensors[f"{p}.scales"],
                           tensors[f"{p}.g_idx"], bits)
            params[f"{p}.weight"].copy_(w)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="", help="comma list; default: every adapters/<task>/ present")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--per-task-bits", default="4,3", help="bit widths that also get per-task GPTQ")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--aggregations", default=",".join(AGGREGATIONS))
    ap.add_argument("--with-mean", action="store_true", help="also H = mean of adapter-aware H_t (ablation)")
    ap.add_argument("--num-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--num-examples", type=int, default=32, help="test examples per task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    args = ap.parse_args()
    args.bits = [int(b) for b in args.bits.split(",")]
    args.per_task_bits = [int(b) for b in args.per_task_bits.split(",") if b]
    args.aggregations = [a for a in args.aggregations.split(",") if a]
    torch.set_num_threads(args.threads)

    tasks = ([t for t in args.tasks.split(",") if t] or
             sorted(p.name for p in (ROOT / "adapters").iterdir()
                    if (p / "adapter_model.safetensors").is_file()))
    hf, tokenizer, _ = load_base(args.model)
    adapters = {t: read_adapter(TaskSpec(t, str(ROOT / "adapters" / t), ""), hf.config) for t in tasks}
    original = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    t0 = time.perf_counter()
    packed = quantize_all(hf, tokenizer, tasks, adapters, args)
    quant_s = time.perf_counter() - t0
    hf.load_state_dict(original)

    out = Path(args.out)
    result = {"model": args.model, "tasks": tasks, "group_size": args.group_size,
              "num_calibration": f"{args.num_seqs}x{args.seq_len} tokens per task",
              "num_examples": args.num_examples, "quantize_all_s": round(quant_s, 1),
              **provenance("cpu"), "command": " ".join(["python"] + sys.argv), "scores": {}}

    def score(config: str, task_list):
        for t in task_list:
            r = evaluate(t, hf, tokenizer, ROOT / "adapters" / t, num_examples=args.num_examples)
            result["scores"].setdefault(config, {})[t] = r["score"]
            print(f"{config:24s} {t:16s} {r['score']:.3f} ({r['seconds']}s)", flush=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    score("unquantized", tasks)
    for config in sorted(packed, key=lambda c: (-int(c.split("@")[1]), c)):
        method, bits = config.split("@")
        load_config(hf, packed[config], int(bits))
        score(config, [method.split(":")[1]] if method.startswith("gptq:") else tasks)
    hf.load_state_dict(original)
    summarize(result, out)
    return 0


def summarize(result: dict, out: Path) -> None:
    """Relative drop vs unquantized per task; average and worst task per method."""
    scores, tasks = result["scores"], result["tasks"]
    ref = scores["unquantized"]
    rows = {}
    for config, per_task in scores.items():
        if config == "unquantized":
            continue
        method, bits = config.split("@")
        if method.startswith("gptq:"):
            method = "gptq (per task)"
        rows.setdefault((method, int(bits)), {}).update(per_task)
    summary = []
    for (method, bits), per_task in sorted(rows.items(), key=lambda r: (-r[0][1], r[0][0])):
        drops = {t: 100.0 * (ref[t] - per_task[t]) / ref[t] if ref[t] > 0 else 0.0
                 for t in tasks if t in per_task}
        summary.append({"method": method, "bits": bits, "scores": per_task, "drop_pct": drops,
                        "avg_drop_pct": sum(drops.values()) / len(drops),
                        "worst_drop_pct": max(drops.values())})
    result["summary"] = summary
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    head = "| method | bits | " + " | ".join(tasks) + " | avg drop % | worst drop % |"
    lines = [f"# Quantized base quality per task ({result['model']}, g{result['group_size']})", "",
             f"Score of each task's adapter on the quantized base; N = {result['num_examples']} test "
             f"examples per task (greedy, workload-kit metric); calibration {result['num_calibration']}. "
             "Drop = (unquantized − quantized) / unquantized. `gptq (per task)` quantizes one base "
             "per task with that task's data only (cannot be shared; an upper bound for GPTQ).", "",
             head, "|---|---|" + "---:|" * (len(tasks) + 2),
             "| unquantized | 16/32 | " + " | ".join(f"{ref[t]:.3f}" for t in tasks) + " | 0 | 0 |"]
    for row in summary:
        cells = " | ".join(f"{row['scores'][t]:.3f} ({row['drop_pct'][t]:+.1f})" if t in row["scores"]
                           else "–" for t in tasks)
        lines.append(f"| {row['method']} | {row['bits']} | {cells} | {row['avg_drop_pct']:.2f} | "
                     f"{row['worst_drop_pct']:.2f} |")
    lines += ["", f"Device {result['device']}, commit {result['git_commit']}, {result['date_utc']}, "
              f"quantization of all methods {result['quantize_all_s']} s.", f"Command: `{result['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
