"""Influence screen on SmolLM2: demo adapters' input-energy ratios, and a poisoned task's cost to the others.

(a) `screen_influence` on the seven demo adapters (their real ratios, which set the default
thresholds) and on poisoned variants of the arith adapter that pass the static norm screen:
component 0 of every v_proj is replaced by a crafted rank-1 delta (A = the top eigenvector of
the layer's bare v_proj input, B = the v channel the bare base uses least), with the same
Frobenius norm as a trained module.
(b) The harm: on a few decoder layers, each demo task's GPTQ loss tr((W−Ŵ) H_t (W−Ŵ)ᵀ) when
the layer is quantized (4-bit g128 asym act-order, the service default) with the `mean`
aggregate of the seven tasks, of the seven + a clean copy of arith (control: any 8th task
shifts the mean), and of the seven + each poisoned variant.
Usage: .venv/bin/python benchmarks/bench_influence.py [--layers 2,15,28] [--poison-norms 1,2,4,8]
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.adapter_screening import screen_adapter_dir  # noqa: E402
from services.common.workload.task import get_task  # noqa: E402
from services.quantizer.aggregate import make_aggregation  # noqa: E402
from services.quantizer.calibration import TaskSpec, calibration_tokens, read_adapter  # noqa: E402
from services.quantizer.config import QuantConfig  # noqa: E402
from services.quantizer.gptq import gptq_quantize  # noqa: E402
from services.quantizer.hessian import INPUT_GROUPS  # noqa: E402
from services.quantizer.influence import InfluenceConfig, canary_tokens, screen_influence  # noqa: E402
from services.quantizer.pipeline import Stream, capture_inputs, run_layer, load_base  # noqa: E402

TASKS = ("arith", "num2words_en", "num2words_fr", "json_extract", "table_summary", "sort_list",
         "code_gen")
POISON_SOURCE = "arith"
OTHERS = tuple(t for t in TASKS if t != POISON_SOURCE)  # the poisoned copy shares arith's data
V_KEY = "base_model.model.model.layers.{}.self_attn.v_proj.lora_{}.weight"


def write_calibration(task: str, out_dir: Path, num_examples: int = 64) -> Path:
    """The task's workload-kit `calib` split as the JSONL a StartJob would send."""
    path = out_dir / f"{task}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for ex in get_task(task).examples("calib", num_examples):
            f.write(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n")
    return path


@torch.no_grad()
def poison_directions(hf, tokens: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Per layer (top eigenvector of the bare v_proj input [D], least-used v channel): what an
    attacker who can run the public base computes to craft the poisoned v_proj."""
    cfg = hf.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    stream = Stream("bare", tokens, None)
    capture_inputs(hf, stream, "cpu")
    out = []
    for idx, layer in enumerate(hf.model.layers):
        h = run_layer(layer, idx, stream)
        top = torch.linalg.eigh(h["self_attn.q_proj"].double())[1][:, -1].float()
        # o_proj input channel (query head q, dim j) reads v channel (q // group, j).
        energy = torch.diagonal(h["self_attn.o_proj"]).view(kv_heads, heads // kv_heads, head_dim)
        out.append((top, int(energy.sum(1).flatten().argmin())))
    return out


def write_poisoned(source: Path, out_dir: Path, directions, delta_norm: float) -> Path:
    """The source adapter with v_proj component 0 of every layer replaced by a rank-1 delta of
    Frobenius norm `delta_norm` (uniform over layers, so no z-score outlier)."""
    cfg = json.loads((source / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(source / "adapter_model.safetensors"))
    for idx, (top, channel) in enumerate(directions):
        a = tensors[V_KEY.format(idx, "A")].float()
        b = tensors[V_KEY.format(idx, "B")].float()
        a[0], b[:, 0] = top, 0.0
        b[channel, 0] = delta_norm / scaling
        tensors[V_KEY.format(idx, "A")] = a.to(torch.float16)
        tensors[V_KEY.format(idx, "B")] = b.to(torch.float16)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "adapter_config.json", out_dir / "adapter_config.json")
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def poisoned_specs(hf, tokens: torch.Tensor, norms: list[float], work: Path,
                   calibration_path: str) -> list[TaskSpec]:
    """`arith-poisoned-<norm>` per norm, written under `work`, crafted from `tokens` [N, S] (the
    source task's first screened calibration sequences); they share its calibration file."""
    directions = poison_directions(hf, tokens)
    out = []
    for norm in norms:
        name = f"{POISON_SOURCE}-poisoned-{norm:g}"
        path = write_poisoned(ROOT / "adapters" / POISON_SOURCE, work / name, directions, norm)
        out.append(TaskSpec(name, str(path), calibration_path))
    return out


@torch.no_grad()
def layer_hessians(hf, specs: list[TaskSpec], tokens: dict[str, torch.Tensor],
                   layers: list[int]) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """layer → task → group → H_t, each task's data through its own adapter (MLGPTQ's path)."""
    streams = [Stream(s.name, tokens[s.name], read_adapter(s, hf.config)) for s in specs]
    for stream in streams:
        capture_inputs(hf, stream, "cpu")
    out = {}
    for idx in range(max(layers) + 1):
        per_task = {s.name: run_layer(hf.model.layers[idx], idx, s) for s in streams}
        if idx in layers:
            out[idx] = per_task
    return out


def mean_hessian(hessians: list[torch.Tensor], damp_percent: float) -> torch.Tensor:
    agg = make_aggregation("mean", damp_percent)
    return agg.finalize(agg.reduce([agg.task_state(h) for h in hessians]))


def gptq_loss(err: torch.Tensor, h: torch.Tensor) -> float:
    return float(((err.double() @ h.double()) * err.double()).sum())  # tr(E H Eᵀ)


def harm(hf, hessians, variants: dict[str, list[str]], cfg: QuantConfig) -> dict:
    """variant → layer → group → task → loss, quantizing with the mean over the variant's tasks."""
    out: dict = {name: {} for name in variants}
    for idx, per_task in hessians.items():
        layer = hf.model.layers[idx]
        for group, members in INPUT_GROUPS.items():
            w = torch.cat([layer.get_submodule(m).weight.detach() for m in members])
            for name, tasks in variants.items():
                h = mean_hessian([per_task[t][group] for t in tasks], cfg.damp_percent)
                err = w - gptq_quantize(w, h, cfg).dequant
                out[name].setdefault(idx, {})[group] = {
                    t: gptq_loss(err, per_task[t][group]) for t in TASKS}
    return out


def relative_increase(losses: dict, baseline: dict) -> dict[str, float]:
    """Per "L<layer> <group>": the other tasks' mean of loss / baseline loss − 1 (0.05 = +5 %).
    Per group, not summed: one layer's down_proj loss is 40× the rest and would hide them."""
    return {f"L{idx} {group.split('.')[-1]}":
            sum(losses[idx][group][t] / baseline[idx][group][t] - 1.0 for t in OTHERS) / len(OTHERS)
            for idx in baseline for group in baseline[idx]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,15,28")
    parser.add_argument("--poison-norms", default="1,2,4,8",
                        help="Frobenius norm of each crafted v_proj delta (demo median ≈ 1.7–2.4)")
    parser.add_argument("--hessian-seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "influence"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    norms = [float(x) for x in args.poison_norms.split(",")]
    screen_cfg, quant_cfg = InfluenceConfig(), QuantConfig()
    hf, tokenizer, base_dir = load_base("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="bench_influence_"))
    specs = [TaskSpec(t, str(ROOT / "adapters" / t), str(write_calibration(t, work))) for t in TASKS]
    canaries = canary_tokens(tokenizer, args.seq_len)
    num_tokens = max(args.hessian_seqs, screen_cfg.num_seqs)
    tokens = {s.name: calibration_tokens(s.calibration_path, tokenizer, num_tokens, args.seq_len)
              for s in specs}

    poisoned = poisoned_specs(hf, tokens[POISON_SOURCE][:screen_cfg.num_seqs], norms, work,
                              specs[0].calibration_path)
    for spec in poisoned:
        tokens[spec.name] = tokens[POISON_SOURCE]
    control = TaskSpec(f"{POISON_SOURCE}-copy", specs[0].adapter_path, specs[0].calibration_path)
    tokens[control.name] = tokens[POISON_SOURCE]

    screens = {}
    for spec in specs + poisoned:
        t0 = time.perf_counter()
        report = screen_influence(hf, spec.name, read_adapter(spec, hf.config), tokens[spec.name],
                                  screen_cfg, canaries)
        static = screen_adapter_dir(spec.adapter_path, base_model_dir=base_dir).to_dict()
        static["max_relative_norm"] = max(m["relative_norm"] or 0.0 for m in static.pop("modules"))
        screens[spec.name] = {"influence": report.to_dict(), "static": static,
                              "seconds": time.perf_counter() - t0}
        print(f"{spec.name}: static {static['verdict']}, influence {report.verdict.value} "
              f"{report.max_ratio:.2f} at {report.where}", flush=True)

    hess_tokens = {k: v[:args.hessian_seqs] for k, v in tokens.items()}
    hessians = layer_hessians(hf, specs + [control] + poisoned, hess_tokens, layers)
    variants = {"7 demo tasks": list(TASKS), f"+ {control.name}": list(TASKS) + [control.name]}
    variants.update({f"+ {p.name}": list(TASKS) + [p.name] for p in poisoned})
    losses = harm(hf, hessians, variants, quant_cfg)
    increases = {name: relative_increase(v, losses["7 demo tasks"]) for name, v in losses.items()}
    over_control = {name: relative_increase(v, losses[f"+ {control.name}"])
                    for name, v in losses.items() if "poisoned" in name}
    layer_ratios = {p.name: {idx: {g: float(torch.trace(hessians[idx][p.name][g])
                                            / torch.trace(hessians[idx][POISON_SOURCE][g]))
                                   for g in INPUT_GROUPS} for idx in layers} for p in poisoned}
    for name, inc in increases.items():
        print(f"{name}: mean {100 * sum(inc.values()) / len(inc):+.1f}% max {100 * max(inc.values()):+.1f}%")
    for name, inc in over_control.items():
        print(f"{name} over control: mean {100 * sum(inc.values()) / len(inc):+.1f}% "
              f"max {100 * max(inc.values()):+.1f}%")

    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), torch threads 1",
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "model": "smollm2-135m", "influence_config": asdict(screen_cfg),
        "quant_config": quant_cfg.to_dict(), "layers": layers, "hessian_seqs": args.hessian_seqs,
        "seq_len": args.seq_len, "screens": screens, "poisoned_layer_ratios": layer_ratios,
        "losses": losses, "relative_increase": increases,
        "relative_increase_over_control": over_control, "control": control.name,
        "total_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result, specs, poisoned))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}.md/.json in {result['total_s']:.0f} s")


def markdown(r: dict, specs: list[TaskSpec], poisoned: list[TaskSpec]) -> str:
    cfg = r["influence_config"]
    keys = list(next(iter(r["relative_increase"].values())))
    lines = [
        "# Influence screen: demo adapter ratios and the harm of a poisoned task\n",
        f"{r['date']}, commit {r['git_commit'][:10]}, {r['device']}, {r['total_s']:.0f} s.",
        f"Command: `{r['command']}`\n",
        f"Ratio = tr(H with the adapter) / tr(H bare) per decoder layer and input group, over the "
        f"task's first {cfg['num_seqs']} calibration sequences × {r['seq_len']} tokens "
        "(workload-kit `calib` split) and the fixed canary prompts; the max over all 30 layers × 4 "
        f"groups × both sources. Thresholds: warn > {cfg['warn_ratio']:g}, quarantine > "
        f"{cfg['max_ratio']:g}.\n",
        "| adapter | static screen (‖ΔW‖ median / max, max ‖ΔW‖/‖W‖) | max ratio | where | verdict | s |",
        "|---|---|---:|---|---|---:|"]
    for spec in specs + poisoned:
        s = r["screens"][spec.name]
        st, inf = s["static"], s["influence"]
        lines.append(f"| {spec.name} | {st['verdict']} ({st['median_norm']:.2f} / {st['max_norm']:.2f}, "
                     f"{st['max_relative_norm']:.3f}) "
                     f"| {inf['max_ratio']:.2f} | {inf['where']} | {inf['verdict']} | {s['seconds']:.1f} |")
    lines += [
        "",
        f"Poisoned variants: `{POISON_SOURCE}` with v_proj component 0 of every layer replaced by a "
        "rank-1 delta (A = top eigenvector of the layer's bare v_proj input, B = the least-used v "
        "channel) of the Frobenius norm in the name; the static screen (with base norms) passes "
        "them all.\n",
        f"## Harm to the other tasks (layers {', '.join(map(str, r['layers']))}, all four input "
        f"groups, {r['hessian_seqs']}×{r['seq_len']} calibration tokens per task, "
        f"{r['quant_config']['bits']}-bit g{r['quant_config']['group_size']} "
        f"{'sym' if r['quant_config']['sym'] else 'asym'}"
        f"{' act-order' if r['quant_config']['desc_act'] else ''}, `mean` aggregation)\n",
        f"GPTQ loss tr((W−Ŵ) H_t (W−Ŵ)ᵀ) of each other task t ({', '.join(OTHERS)}; not "
        f"{POISON_SOURCE}, whose data the poisoned copy shares) per layer and input group, relative "
        "to quantizing with the mean of the seven demo tasks only, averaged over those six tasks. "
        f"The control adds a clean copy of {POISON_SOURCE} as the 8th task: any extra task dilutes "
        "the others' share of the mean; the last columns compare each poisoned variant with it.\n",
        "| aggregate | screen ratio | verdict | " + " | ".join(keys) + " | mean | worst | mean vs control "
        "| worst vs control |",
        "|---|---:|---|" + "---:|" * (len(keys) + 4)]
    for name, inc in r["relative_increase"].items():
        task = name.removeprefix("+ ")
        screen = r["screens"].get(task, {}).get("influence")
        ctl = r["relative_increase_over_control"].get(name)
        lines.append(f"| {name} | {screen['max_ratio']:.2f} | {screen['verdict']} |" if screen
                     else f"| {name} | – | – |")
        lines[-1] += (" " + " | ".join(f"{100 * inc[k]:+.1f}%" for k in keys)
                      + f" | {100 * sum(inc.values()) / len(inc):+.1f}% | {100 * max(inc.values()):+.1f}% | "
                      + (f"{100 * sum(ctl.values()) / len(ctl):+.1f}% | {100 * max(ctl.values()):+.1f}% |"
                         if ctl else "– | – |"))
    lines += ["", "Ratios of the poisoned task's H to the clean arith H on these layers "
              "(tr H_poisoned / tr H_arith):\n",
              "| variant | " + " | ".join(f"L{i} {g.split('.')[-1]}" for i in r["layers"]
                                         for g in INPUT_GROUPS) + " |",
              "|---|" + "---:|" * (len(r["layers"]) * len(INPUT_GROUPS))]
    for name, per_layer in r["poisoned_layer_ratios"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per_layer[i][g]:.2f}" for i in r["layers"]
                                                 for g in INPUT_GROUPS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
